"""A label-supervised reference: how much does a model trained *with labels* use the texture cue?

    python -m fastneg.experiments.supervised --data ROOT --out RUN_DIR
    python -m fastneg.experiments.supervised --data ROOT --out RUN_DIR --epochs 0   # untrained

Trains the backbone and a linear classifier with cross entropy on ROOT/train (random resized
crop and flip, the MoCo crop range), then evaluates the frozen backbone exactly as `fastneg
eval` does a MoCo checkpoint (linear probe and kNN on cached features, corruptions, shape bias),
so the numbers sit in the same table. Writes RUN_DIR/eval.json and RUN_DIR/summary.json.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastneg.augment import MoCoV2Augment
from fastneg.eval.corrupt import DEFAULT_CORRUPTIONS
from fastneg.eval.suite import evaluate_backbone
from fastneg.loaders import build_loader
from fastneg.moco import ARCHS, build_backbone


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset root holding train/ and the splits")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--arch", choices=ARCHS, default="resnet10s")
    p.add_argument("--size", type=int, default=32, help="resolution (default 32)")
    p.add_argument("--epochs", type=int, default=15,
                   help="epochs (default 15; 0 evaluates the randomly initialized backbone)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (default 0.1)")
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay (default 5e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: cores)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: a small model on shared cores runs fastest "
                        "single-threaded)")
    p.add_argument("--corrupt-dir", help="shared corruption cache (default: the eval default)")
    p.add_argument("--corruptions", default=",".join(DEFAULT_CORRUPTIONS),
                   help="corruptions for the evaluation, or 'none'")
    return p


def train(args) -> tuple[torch.nn.Module, float]:
    """(trained backbone, training seconds)."""
    torch.set_num_threads(args.threads)
    loader = build_loader("torch", Path(args.data) / "train", batch_size=args.batch_size, views=1,
                          size=args.size, device="cpu", seed=args.seed, workers=args.workers,
                          drop_last=True, shuffle=True)
    torch.manual_seed(args.seed)   # initial weights
    backbone, features = build_backbone(args.arch)
    model = torch.nn.Sequential(backbone, torch.nn.Linear(features, len(loader.classes)))
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
    flip_only = MoCoV2Augment(jitter_p=0.0, gray_p=0.0, blur_p=0.0)   # flip + normalize
    total = args.epochs * len(loader)
    step, start = 0, time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            for g in opt.param_groups:   # cosine schedule, per step
                g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            x = flip_only.apply(batch.views[0],
                                flip_only.sample(len(batch.labels), seed=args.seed, step=step))
            loss = F.cross_entropy(model(x), batch.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f}", flush=True)
    return backbone, time.perf_counter() - start


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs < 0:
        parser.error(f"--epochs must be >= 0, got {args.epochs}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backbone, seconds = train(args)
    corruptions = () if args.corruptions == "none" else tuple(args.corruptions.split(","))
    result = evaluate_backbone(backbone, args.data, size=args.size, corruptions=corruptions,
                               corrupt_dir=args.corrupt_dir)
    result["args"] = vars(args)
    (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "summary.json").write_text(json.dumps({"train_s": seconds, "args": vars(args)},
                                                 indent=1) + "\n")


if __name__ == "__main__":
    main()

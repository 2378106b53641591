"""`fastneg eval`: linear probe, kNN, corruptions and shape bias of a trainer checkpoint."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastneg.eval.corrupt import DEFAULT_CORRUPTIONS, SEVERITIES


def register(sub) -> None:
    e = sub.add_parser(
        "eval", help="evaluate a checkpoint: linear probe, kNN, corruptions, shape bias",
        description="Frozen-backbone evaluation of a trainer checkpoint. A linear probe "
                    "(on cached float16 feature shards: L-BFGS for small sets, mini-batch on --device for "
                    "large ones) and a kNN classifier are fitted on ROOT/train "
                    "and scored on every other ImageFolder under ROOT, on ImageNet-C style "
                    "corruptions of ROOT/val (split 'corrupt': the mean) and on --ood folders; "
                    "the shape bias comes from ROOT/conflict/metadata.csv when present. "
                    "--suite paper --ood-root DIR adds the paper's table on the real "
                    "out-of-domain sets found under DIR (docs/ood-eval.md).")
    e.add_argument("checkpoint", help="trainer checkpoint (RUN_DIR/*.pt), or a backbone file "
                                      "of `fastneg export` (.safetensors, .pt)")
    e.add_argument("--arch", help="architecture of a backbone file that does not record it "
                                  "(a state dict without metadata), e.g. resnet50")
    e.add_argument("--size", type=int, help="image side of a backbone file that does not "
                                            "record its training size")
    e.add_argument("--data", required=True, help="dataset root holding train/ and the splits")
    e.add_argument("--json", help="write the results to this JSON file")
    e.add_argument("--ood", action="append", default=[], metavar="NAME=DIR",
                   help="an extra out-of-domain ImageFolder (classes named as in train); "
                        "repeatable")
    e.add_argument("--suite", choices=("default", "paper"), default="default",
                   help="default: every split of --data, corruptions of val, the embedded "
                        "shape bias. paper: also the paper's out-of-domain table (IN-val, "
                        "ImageNet-C, Sketch, Stylized, ImageNet-R, shape bias on the cue-conflict "
                        "stimuli), linear probe, on the sets found under --ood-root; the "
                        "synthetic corruptions of val are off unless --corruptions is given "
                        "(default: default)")
    e.add_argument("--ood-root", metavar="DIR",
                   help="with --suite paper: the folder holding the out-of-domain sets under "
                        "their usual names: imagenet-c/<corruption>/<1..5>/<wnid>/, sketch/ (or "
                        "imagenet-sketch/), stylized-imagenet/[val/], imagenet-r/, cue-conflict/ "
                        "(or texture-vs-shape/ or style-transfer-preprocessed-512/); those "
                        "found are run, the others named (docs/ood-eval.md)")
    e.add_argument("--corruptions", default=None,
                   help="comma-separated corrupt-tta names applied to val, or 'none' "
                        f"(default: {','.join(DEFAULT_CORRUPTIONS)}; with --suite paper: none)")
    e.add_argument("--severities", default=",".join(map(str, SEVERITIES)),
                   help="comma-separated severities 1..5 (default: %(default)s)")
    e.add_argument("--corrupt-dir", help="where the corrupted val split is cached "
                                         "(default: ROOT/.fastneg-corrupt/val)")
    e.add_argument("--cache-dir", help="feature cache (default: RUN_DIR/eval-cache/<checkpoint>)")
    e.add_argument("--k", type=int, default=20, help="kNN neighbours (default 20)")
    e.add_argument("--temperature", type=float, default=0.07,
                   help="kNN vote temperature (default 0.07)")
    e.add_argument("--batch-size", type=int, default=256, help="feature batch (default 256)")
    e.add_argument("--untrained", action=argparse.BooleanOptionalAction, default=True,
                   help="also report the untrained network of the same architecture (computed "
                        "once per dataset, cached in ROOT/.fastneg-untrained) (default on)")
    e.add_argument("--device", default="cpu", help="torch device (default cpu)")
    e.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice). 1 is fastest for "
                        "small models on shared cores: threads that wait on each other while a "
                        "core is busy elsewhere can slow a forward pass many times over")
    e.set_defaults(func=run)


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"{flag} expects comma-separated integers, got {text!r}") from None


def run(args) -> None:
    from fastneg.eval.suite import evaluate_checkpoint, parse_ood
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data} is not a folder")
    if (args.suite == "paper") != (args.ood_root is not None):
        raise ValueError("--suite paper and --ood-root DIR go together (the suite reads its "
                         "out-of-domain sets from DIR)")
    if args.ood_root is not None:   # a wrong root is named before the checkpoint is loaded
        from fastneg.eval.ood import discover
        discover(args.ood_root)
    spec = args.corruptions
    if spec is None:
        spec = "none" if args.suite == "paper" else ",".join(DEFAULT_CORRUPTIONS)
    corruptions = () if spec.strip() == "none" else \
        tuple(s.strip() for s in spec.split(",") if s.strip())
    print(f"fastneg eval {args.checkpoint} on {data}")
    result = evaluate_checkpoint(
        args.checkpoint, data, ood=parse_ood(args.ood), cache_dir=args.cache_dir,
        corrupt_dir=args.corrupt_dir, corruptions=corruptions,
        severities=_int_list(args.severities, "--severities"), k=args.k,
        temperature=args.temperature, batch_size=args.batch_size, device=args.device,
        untrained=args.untrained, ood_root=args.ood_root, arch=args.arch, size=args.size)
    from fastneg.eval.report import summary_table
    if "shape_bias" in result:
        # None when no prediction matched either cue (the ratio is undefined)
        print("  shape bias   " + "  ".join(
            f"{name} {'n/a' if result[key] is None else format(result[key], '.3f')}"
            for name, key in (("linear", "shape_bias"), ("knn", "shape_bias_knn"))))
    print(summary_table(result))
    if "paper" in result:
        from fastneg.eval.ood import paper_table
        print(paper_table(result["paper"], label=Path(args.checkpoint).name))
    if args.json:
        from fastneg.fs import atomic_file
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out) as tmp:   # a killed run leaves no half-written JSON
            Path(tmp).write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")

"""A MoCo-v2 training step: its model-bound ceiling and how close the real data path gets to it.

    python benchmarks/moco_step.py --device cuda --loaders torch,dali --json moco_step.json

1. ceiling: fastneg.moco.MoCo (query encoder, momentum update, key + NS encoding, queue, NS loss,
   backward, SGD step) on synthetic normalized batches already on the device, so nothing waits
   for data: the most the model lets a data path deliver.
2. per loader: the same step fed by finished batches from the real data path (loader ->
   aug-plus on both views -> negatives, by the trainer's fastneg.step through
   throughput.FastnegBatches). Reported: img/s, its ratio to the ceiling (the target: >= 0.9),
   data-wait % (host time spent getting the next finished batch, i.e. waiting for the loader
   plus launching the augmentation and NS kernels, over the wall time), and CPU cores used
   (CPU-seconds of the process tree per wall second).

Timing: no per-step synchronisation (it would serialise host and device); the device is
synchronised once after the warm-up steps and once after the measured steps.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# First, before torch: importing fastneg makes idle OpenMP threads sleep instead of spinning
# (OMP_WAIT_POLICY=PASSIVE unless set; fastneg/__init__.py says why).
import fastneg  # noqa: E402,F401
import torch  # noqa: E402

from fastneg.benchmarking.common import (ProcessTree, comma_list,  # noqa: E402
                                         non_negative, positive, resolve_device)
from fastneg.benchmarking.data import (BANK_DIR, LOADERS, NEGATIVES,  # noqa: E402
                                       TEXTURE_BETON, FastnegBatches, default_data,
                                       prepare_ffcv, write_texture_bank)

PRECISIONS = ("bf16", "fp32")
DATA_ROOT = Path(__file__).resolve().parents[1] / "data"   # the checkout's data/ (default_data)
CONVERT_TIMEOUT_S = 600   # one .beton conversion of the dataset, cached next to it


def build_model(args, device):
    from fastneg.moco import MoCo
    model = MoCo(arch=args.arch, K=args.queue, alpha=2.0).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    return model, opt


def trainer_step(model, opt, views, negatives, step, precision):
    """The trainer's own optimizer step (fastneg.train.loop.train_step) in `precision`."""
    from fastneg.train.loop import train_step
    autocast = torch.autocast(views[0].device.type, dtype=torch.bfloat16,
                              enabled=precision == "bf16")
    scaler = torch.amp.GradScaler(views[0].device.type, enabled=False)   # no fp16 here
    train_step(model, opt, scaler, autocast, views, negatives, step)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batches(args, device):
    """The same (views, negatives) every step: normalized tensors, channels_last as
    fastneg.augment makes them."""
    gen = torch.Generator(device=device).manual_seed(args.seed)
    shape = (args.batch_size, 3, args.size, args.size)
    images = [torch.randn(shape, generator=gen, device=device).contiguous(
        memory_format=torch.channels_last) for _ in range(3)]
    while True:
        yield images[:2], (images[2:] if args.negatives != "none" else [])


def run_steps(model, opt, batches, args, device, tree):
    """Time args.steps steps after args.warmup; (img/s, data-wait fraction, CPU cores)."""
    it = iter(batches)
    for step in range(args.warmup):
        trainer_step(model, opt, *next(it), step, args.precision)
    _sync(device)
    cpu0, start, wait = tree.cpu_seconds(), time.perf_counter(), 0.0
    for step in range(args.warmup, args.warmup + args.steps):
        t = time.perf_counter()
        views, negatives = next(it)
        wait += time.perf_counter() - t
        trainer_step(model, opt, views, negatives, step, args.precision)
    _sync(device)
    wall = time.perf_counter() - start
    return (args.steps * args.batch_size / wall, wait / wall,
            (tree.cpu_seconds() - cpu0) / wall)


def loader_row(args, kind, device, model, opt, tree, ceiling, workdir) -> dict:
    row = {"loader": kind, "negatives": args.negatives, "status": "ok", "reason": "",
           "img_per_s": None, "vs_ceiling": None, "data_wait_pct": None, "cpu_cores": None}
    try:
        source = prepare_ffcv(args.data, CONVERT_TIMEOUT_S) if kind == "ffcv" else args.data
        bank = None
        if args.negatives == "texture":
            # a JPEG texture bank fetched by the loader (throughput.write_texture_bank), once
            bank = workdir / BANK_DIR
            if not bank.exists():
                write_texture_bank(args.data, args.size, workdir)
            if kind == "ffcv":     # the .beton with the bank's texture field
                source = workdir / TEXTURE_BETON
                if not source.exists():
                    prepare_ffcv(args.data, CONVERT_TIMEOUT_S, texture_bank=bank, beton=source)
        batches = FastnegBatches(kind, source, batch_size=args.batch_size, size=args.size,
                                 device=device, workers=args.workers, negatives=args.negatives,
                                 texture_bank=bank, seed=args.seed)
    except (ImportError, RuntimeError) as e:   # the loader contract's "not available here"
        return {**row, "status": "unavailable", "reason": f"{type(e).__name__}: {e}"}
    try:
        img_s, wait, cores = run_steps(model, opt, batches, args, device, tree)
    except Exception as e:  # a broken backend is a result to report; the other rows still run
        return {**row, "status": "failed", "reason": f"{type(e).__name__}: {e}"}
    return {**row, "img_per_s": img_s, "vs_ceiling": img_s / ceiling,
            "data_wait_pct": 100 * wait, "cpu_cores": cores}


def build_parser():
    p = argparse.ArgumentParser(description="MoCo-v2 step: synthetic-data ceiling vs the real "
                                            "data path (img/s, data-wait %, CPU cores).")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--arch", default="resnet50",
                   help="encoder, one of fastneg.moco.ARCHS (default resnet50)")
    p.add_argument("--batch-size", type=positive, default=128, help="images per step (default 128)")
    p.add_argument("--size", type=positive, default=224, help="training resolution (default 224)")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16",
                   help="bf16 autocast or plain fp32 (default bf16)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last model and inputs (default on)")
    p.add_argument("--queue", type=positive, default=16384,
                   help="MoCo queue size K (default 16384)")
    p.add_argument("--steps", type=positive, default=20, help="measured steps (default 20)")
    p.add_argument("--warmup", type=non_negative, default=5, help="warm-up steps (default 5)")
    p.add_argument("--negatives", choices=NEGATIVES, default="patch",
                   help="negatives per step (default patch)")
    p.add_argument("--loaders", type=comma_list(LOADERS), default=["torch"],
                   help="comma list of loaders fed to the step after the ceiling (default torch)")
    p.add_argument("--no-loaders", action="store_true", help="measure the ceiling only")
    p.add_argument("--data", type=Path, default=None,
                   help="ImageFolder root for the loaders (default: the throughput benchmark's)")
    p.add_argument("--workers", type=non_negative, default=None,
                   help="loader workers/threads (default: the loader's own)")
    p.add_argument("--seed", type=non_negative, default=0, help="seed (default 0)")
    p.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = torch.device(resolve_device(args.device))
        if args.queue % args.batch_size:
            raise ValueError(f"--queue {args.queue} must be a multiple of --batch-size "
                             f"{args.batch_size}")
        if args.json is not None and not args.json.parent.is_dir():
            raise FileNotFoundError(f"output folder {args.json.parent} does not exist")
        if not args.no_loaders:
            args.data = (args.data or default_data(DATA_ROOT)).resolve()
            from fastneg.data.imagefolder import scan_image_folder
            scan_image_folder(args.data)
        model, opt = build_model(args, device)
        # Fixed input shapes: let cuDNN time its convolution algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = True
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"moco_step.py: error: {e}", file=sys.stderr)
        return 2
    tree = ProcessTree()
    ceiling, wait, cores = run_steps(model, opt, synthetic_batches(args, device), args, device,
                                     tree)
    result = {"device": str(device), "device_name": (torch.cuda.get_device_name(device)
                                                     if device.type == "cuda" else "cpu"),
              "arch": args.arch, "batch_size": args.batch_size, "size": args.size,
              "precision": args.precision, "channels_last": args.channels_last,
              "negatives": args.negatives, "steps": args.steps,
              "ceiling": {"img_per_s": ceiling, "cpu_cores": cores}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="fastneg-moco-step-") as tmp:
        for kind in ([] if args.no_loaders else args.loaders):
            row = loader_row(args, kind, device, model, opt, tree, ceiling, Path(tmp))
            result["rows"].append(row)
    result["peak_rss_mb"] = tree.close() / 2 ** 20
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"# MoCo step: {args.arch}, batch {args.batch_size}, {args.size} px, {args.precision}, "
          f"channels_last={args.channels_last}, negatives={args.negatives}, "
          f"{result['device_name']}")
    print(f"{'data':<12}{'img/s':>9}{'x ceiling':>11}{'data wait %':>13}{'CPU cores':>11}  note")
    print(f"{'synthetic':<12}{ceiling:>9.1f}{1.0:>11.2f}{'-':>13}{cores:>11.2f}")
    for r in result["rows"]:
        if r["status"] == "ok":
            print(f"{r['loader']:<12}{r['img_per_s']:>9.1f}{r['vs_ceiling']:>11.2f}"
                  f"{r['data_wait_pct']:>13.1f}{r['cpu_cores']:>11.2f}")
        else:
            print(f"{r['loader']:<12}{'-':>9}{'-':>11}{'-':>13}{'-':>11}  "
                  f"{r['status']}: {r['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""img/s of fastneg.augment (MoCo-v2 aug-plus on whole batches) against torchvision.transforms.v2
applied image by image, the way a per-sample Dataset pipeline runs it, in the same run.

    python benchmarks/augment.py                          # CPU, 256 x 224 x 224, ~1 min on 2 cores
    python benchmarks/augment.py --device cuda --json out.json

Both sides get the same uint8 batch [N, H, W, 3] already on the device and produce normalized
float32 [N, 3, H, W] there. fastneg: sample() (the draws) and apply() are timed apart; the
figure of the issue is apply() alone. torchvision: RandomHorizontalFlip, RandomApply(ColorJitter
(0.4, 0.4, 0.4, 0.1), p 0.8), RandomGrayscale(0.2), RandomApply(GaussianBlur(kernel as fastneg's,
sigma 0.1..2), p 0.5), ToDtype(float32, scale), Normalize, on each image's CHW view in a loop
over the first --baseline-images images (a per-image loop costs the same per image at any
batch size; the default 64 keeps the run short).
The measurements alternate (fastneg, torchvision, fastneg, ...) so that load from other processes
on a shared machine hits both sides alike; each figure is the median over --repeats.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torchvision.transforms import v2

from fastneg.augment import IMAGENET_MEAN, IMAGENET_STD, MoCoV2Augment, blur_kernel_size


def torchvision_aug_plus(size: int) -> v2.Compose:
    """aug-plus after the crop, per image, as torchvision.transforms.v2 spells it."""
    k = blur_kernel_size(size)
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def timed(fn, device) -> float:
    """Seconds fn() takes, with the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    ap.add_argument("--batch", type=int, default=256, help="images per batch (default 256)")
    ap.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (default 3)")
    ap.add_argument("--baseline-images", type=int, default=64,
                    help="images per timed torchvision loop (default 64, at most --batch)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="fastneg's output dtype (torchvision's is float32)")
    ap.add_argument("--threads", type=int,
                    help="torch CPU threads (default: torch's; 1 is steadier on a busy machine)")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    args = ap.parse_args(argv)
    threads = 1 if args.threads is None else args.threads
    if min(args.batch, args.repeats, args.baseline_images, threads) < 1:
        ap.error("--batch, --repeats, --baseline-images and --threads must be >= 1")
    if args.size < 8:
        ap.error(f"--size must be >= 8, got {args.size}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    n_base = min(args.batch, args.baseline_images)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is available")

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8,
                      generator=gen).to(device)
    aug = MoCoV2Augment(dtype=getattr(torch, args.dtype))
    reference = torchvision_aug_plus(args.size)
    torch.manual_seed(0)   # torchvision's transforms draw from the global generator

    def ours_sample():
        return aug.sample(args.batch, seed=0, step=0, device=device)

    params = ours_sample()

    def ours_apply():
        aug.apply(x, params)

    def baseline():
        for i in range(n_base):
            reference(x[i].permute(2, 0, 1))

    ours_apply()                    # warm-up: Numba compile, allocator, cuDNN/oneDNN plans
    reference(x[0].permute(2, 0, 1))
    t_sample, t_apply, t_base = [], [], []
    for _ in range(args.repeats):
        t_sample.append(timed(ours_sample, device))
        t_apply.append(timed(ours_apply, device))
        t_base.append(timed(baseline, device))
    n = args.batch
    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "batch": n, "size": args.size, "dtype": args.dtype, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "fastneg_apply_img_per_s": n / statistics.median(t_apply),
        "fastneg_sample_img_per_s": n / statistics.median(t_sample),
        "fastneg_sample_apply_img_per_s": n / (statistics.median(t_sample)
                                               + statistics.median(t_apply)),
        "torchvision_loop_img_per_s": n_base / statistics.median(t_base),
        "torchvision_images_timed": n_base,
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }
    result["speedup_apply_vs_torchvision"] = (result["fastneg_apply_img_per_s"]
                                             / result["torchvision_loop_img_per_s"])
    print(f"device {result['device']}, batch {n} x {args.size} x {args.size} "
          f"(torchvision loop: {n_base} images), {result['torch_threads']} torch threads, "
          f"median of {args.repeats}")
    for key in ("fastneg_apply_img_per_s", "fastneg_sample_img_per_s",
                "fastneg_sample_apply_img_per_s", "torchvision_loop_img_per_s"):
        print(f"  {key:34s} {result[key]:12,.0f}")
    print(f"  {'speedup_apply_vs_torchvision':34s} {result['speedup_apply_vs_torchvision']:12.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

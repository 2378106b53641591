"""ms per image of fastneg.augment (MoCo-v2 aug-plus on whole batches): the fused CPU kernel, the
batched torch path and torchvision.transforms.v2 applied image by image (the way a per-sample
Dataset pipeline runs it), in one process, on the same inputs, at each thread count.

    python benchmarks/augment.py                          # CPU, 256 x 224 x 224, 1 and 2 threads
    python benchmarks/augment.py --device cuda --json out.json

All sides get the same uint8 batch [N, H, W, 3] already on the device and produce normalized
[N, 3, H, W] there, with the same draws for both fastneg paths (sample() is timed apart).
fused: MoCoV2Augment.apply (one Numba kernel: fastneg.augment.cpu on CPU tensors,
fastneg.augment.cuda on CUDA ones; its first call, untimed, loads or compiles it). torch: the
batched torch-op chain (MoCoV2Augment._apply_torch, the reference). *_ms_per_batch: the same
medians per batch of --batch images (the GPU check reports 224 px batches of 256). torchvision: RandomHorizontalFlip, RandomApply(ColorJitter
(0.4, 0.4, 0.4, 0.1), p 0.8), RandomGrayscale(0.2), RandomApply(GaussianBlur(kernel as fastneg's,
sigma 0.1..2), p 0.5), ToDtype(float32, scale), Normalize, on each image's CHW view in a loop over
the first --baseline-images images (a per-image loop costs the same per image at any batch size).
Threads: torch.set_num_threads and numba.set_num_threads both get each --threads value.
The measurements alternate (fused, torch, torchvision, fused, ...) so that load from other
processes on a shared machine hits every side alike; each figure is the median over --repeats.
x_vs_torch / x_vs_tv: how many times faster apply (fused on CPU) is than the torch path / the
torchvision loop, per image (wall time). CPU ms per image: the same runs in process CPU time.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numba
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


def timed(fn, device) -> tuple[float, float]:
    """(wall, CPU) seconds fn() takes, with the device's queued work included. CPU time sums
    the process's threads: at 1 thread it is the work itself, without the time other processes
    on a shared machine held the core."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0


def ms_per_image(timings, column, images) -> float:
    """Median of column 0 (wall) or 1 (CPU) of timed()'s pairs, in ms per image."""
    return 1e3 * statistics.median(t[column] for t in timings) / images


def thread_counts(text: str) -> list[int]:
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    ap.add_argument("--batch", type=int, default=256, help="images per batch (default 256)")
    ap.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per side (default 5)")
    ap.add_argument("--baseline-images", type=int, default=64,
                    help="images per timed torchvision loop (default 64, at most --batch)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="fastneg's output dtype (torchvision's is float32)")
    ap.add_argument("--threads", type=thread_counts,
                    help="comma-separated CPU thread counts to measure (default: 1,2 on cpu, "
                         "torch's on cuda)")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    args = ap.parse_args(argv)
    if min(args.batch, args.repeats, args.baseline_images) < 1:
        ap.error("--batch, --repeats and --baseline-images must be >= 1")
    if args.size < 8:
        ap.error(f"--size must be >= 8, got {args.size}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is available")
    on_cpu = device.type == "cpu"
    threads = args.threads or ([1, 2] if on_cpu else [torch.get_num_threads()])
    if on_cpu and max(threads) > numba.config.NUMBA_NUM_THREADS:
        ap.error(f"--threads: Numba has at most {numba.config.NUMBA_NUM_THREADS} threads here")
    n, n_base = args.batch, min(args.batch, args.baseline_images)

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, args.size, args.size, 3), dtype=torch.uint8,
                      generator=gen).to(device)
    aug = MoCoV2Augment(dtype=getattr(torch, args.dtype))
    reference = torchvision_aug_plus(args.size)
    torch.manual_seed(0)   # torchvision's transforms draw from the global generator
    params = aug.sample(n, seed=0, step=0, device=device)

    def baseline():
        for i in range(n_base):
            reference(x[i].permute(2, 0, 1))

    sides = {"fused": (lambda: aug.apply(x, params), n),
             "torch": (lambda: aug._apply_torch(x, params), n), "torchvision": (baseline, n_base)}
    for fn, _ in sides.values():   # warm-up: Numba load/compile, allocator, cuDNN/oneDNN plans
        fn()

    runs = []
    for t in threads:
        torch.set_num_threads(t)
        if on_cpu:
            numba.set_num_threads(t)
        times = {name: [] for name in sides}
        t_sample = []
        for _ in range(args.repeats):
            t_sample.append(timed(lambda: aug.sample(n, seed=0, step=0, device=device), device))
            for name, (fn, _) in sides.items():
                times[name].append(timed(fn, device))
        run = {"threads": t, "sample_ms_per_img": ms_per_image(t_sample, 0, n)}
        for name, (_, images) in sides.items():
            run[f"{name}_ms_per_img"] = ms_per_image(times[name], 0, images)
            run[f"{name}_cpu_ms_per_img"] = ms_per_image(times[name], 1, images)
        for name in ("fused", "torch"):
            run[f"{name}_ms_per_batch"] = run[f"{name}_ms_per_img"] * n
        run["speedup_apply_vs_torchvision"] = (run["torchvision_ms_per_img"]
                                               / run["fused_ms_per_img"])
        run["speedup_fused_vs_torch"] = run["torch_ms_per_img"] / run["fused_ms_per_img"]
        runs.append(run)

    result = {
        "device": str(device) if on_cpu else torch.cuda.get_device_name(device),
        "batch": n, "size": args.size, "dtype": args.dtype, "repeats": args.repeats,
        "torchvision_images_timed": n_base, "runs": runs,
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "numba": numba.__version__, "python": platform.python_version(),
    }
    print(f"device {result['device']}, batch {n} x {args.size} x {args.size} "
          f"(torchvision loop: {n_base} images), {args.dtype}, median of {args.repeats}; "
          f"ms per image")
    columns = [name for name in sides] + ["sample"]
    print(f"  {'threads':>7} " + " ".join(f"{c:>12}" for c in columns)
          + f" {'x_vs_torch':>11} {'x_vs_tv':>8}"
          + "   CPU ms per image: " + " ".join(f"{c:>11}" for c in sides))
    for run in runs:
        line = f"  {run['threads']:>7} " + " ".join(f"{run[f'{c}_ms_per_img']:12.3f}"
                                                   for c in columns)
        line += f" {run['speedup_fused_vs_torch']:10.2f}x"
        line += f" {run['speedup_apply_vs_torchvision']:7.2f}x" + " " * 21
        line += " ".join(f"{run[f'{c}_cpu_ms_per_img']:11.3f}" for c in sides)
        print(line)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

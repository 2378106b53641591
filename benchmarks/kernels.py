"""fastneg.kernels against a plain copy of the same tensor (the bandwidth yardstick) and against
the paper's per-sample Python loop (the anchor), in one process on one device.

    python benchmarks/kernels.py                        # CPU, 256 x 224 x 224, ~1 min on 2 cores
    python benchmarks/kernels.py --device cuda --json out.json

Rows: patch_negatives on uint8 NHWC, float32 NCHW and bfloat16 NCHW channels_last batches (the
trainer's case), each once allocating its output (yardstick: torch.clone, which allocates too)
and once into a preallocated out= (yardstick: out.copy_(x)); sample_textures from a bank of
224 x 224 textures into uint8 [N, size, size, 3] (yardstick: clone of a tensor that size).
GB/s counts one read and one write of the output's bytes (what a copy moves); "of copy" is
that over the yardstick's GB/s. sample_textures runs with check_ids=False, as in the trainer
(the id check costs a host sync on CUDA). The anchors (reference.patch_negatives, the paper's
loop with its canvas; torchvision resized_crop + hflip image by image) run on --anchor-samples
images and are scaled to the batch (median of three runs). Measurements alternate between a
row and its yardstick so that load from other processes hits both alike; each figure is the
median over --repeats of --inner back-to-back calls.

Timing on CUDA: device time from CUDA events around the --inner calls, queued behind a short
spin kernel so that the GPU never waits for Python to launch the next call (at H200 speed a
38 MB copy takes ~20 us, less than launching it); the host's own cost, microseconds of wall
time per call to queue the work, is reported apart (host_us). host_bound marks a row whose
host time per call exceeds its device time: there the GPU would idle between calls in a loop
like this one, and only a longer queue ahead of it (as in training) hides the launches.
On CPU both are the wall time per call. The JSON is rewritten after every row, so a time-out
keeps the rows already measured.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

# First, before torch: importing fastneg makes idle OpenMP threads sleep instead of spinning
# (OMP_WAIT_POLICY=PASSIVE unless set; fastneg/__init__.py says why).
import fastneg  # noqa: E402,F401
import torch  # noqa: E402
import torchvision.transforms.v2.functional as TF  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402

from fastneg.benchmarking.timing import (alternate, cache_evictor,  # noqa: E402
                                        seconds_per_call)
from fastneg.kernels import patch_negatives, reference, sample_textures  # noqa: E402
from fastneg.kernels.textures import draw_texture_params  # noqa: E402

BANK_SIZE = 64          # textures in the bank
BANK_SIDE = 224
ANCHOR_REPEATS = 3      # the anchors are slow and only set the scale: a median of three


def patch_anchor(x, layout, samples, repeats):
    """Seconds per batch of the per-sample Python loop (median), from `samples` images."""
    def loop():
        reference.patch_negatives(x[:samples], layout=layout, seed=0, step=1)
    runs = [seconds_per_call(loop, x.device, 1) for _ in range(repeats)]
    return statistics.median(runs) * x.shape[0] / samples


def texture_anchor(bank, ids, size, samples, repeats):
    """Seconds per batch (median) of torchvision resized_crop + hflip image by image, same boxes."""
    params = draw_texture_params(samples, bank.shape[1], bank.shape[2], seed=0, step=1).tolist()

    def loop():
        for i, (top, left, h, w, flip) in enumerate(params):
            image = TF.resized_crop(bank[ids[i]].permute(2, 0, 1), top, left, h, w, [size, size],
                                    interpolation=InterpolationMode.BILINEAR, antialias=False)
            (TF.horizontal_flip(image) if flip else image).permute(1, 2, 0).contiguous()
    runs = [seconds_per_call(loop, bank.device, 1) for _ in range(repeats)]
    return statistics.median(runs) * ids.shape[0] / samples


def run(args, on_row=lambda rows: None):
    """The benchmark's rows; on_row(rows so far) after each one."""
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    n, s = args.batch, args.size
    pixels = torch.randint(0, 256, (n, s, s, 3), dtype=torch.uint8, generator=gen)
    inputs = {
        "uint8 NHWC": ("nhwc", pixels),
        "float32 NCHW": ("nchw", pixels.permute(0, 3, 1, 2).float().contiguous()),
        "bfloat16 NCHW channels_last": ("nchw", pixels.permute(0, 3, 1, 2).to(torch.bfloat16)
                                        .contiguous(memory_format=torch.channels_last)),
    }
    rows = []

    def record(op, name, timing, yardstick, copy_timing, nbytes, anchor_seconds):
        (seconds, host), (copy_seconds, copy_host) = timing, copy_timing
        gbps = 2 * nbytes / seconds / 1e9
        rows.append({"op": op, "input": name, "yardstick": yardstick, "ms": seconds * 1e3,
                     "gb_per_s": gbps, "copy_ms": copy_seconds * 1e3,
                     "of_copy": copy_seconds / seconds,
                     "host_us": host * 1e6, "copy_host_us": copy_host * 1e6,
                     "host_bound": host > seconds,
                     "speedup_vs_loop": anchor_seconds / seconds})
        on_row(rows)

    for name, (layout, cpu_x) in inputs.items():
        x = cpu_x.to(device)
        out = torch.empty_like(x)
        anchor = patch_anchor(x, layout, args.anchor_samples, ANCHOR_REPEATS)
        kwargs = dict(layout=layout, seed=0, step=1)
        t, copy = alternate([lambda: patch_negatives(x, **kwargs), x.clone], device,
                            args.repeats, args.inner)
        record("patch_negatives", name, t, "clone", copy, x.nbytes, anchor)
        t, copy = alternate([lambda: patch_negatives(x, out=out, **kwargs), lambda: out.copy_(x)],
                            device, args.repeats, args.inner)
        record("patch_negatives out=", name, t, "copy_", copy, x.nbytes, anchor)
        del x, out

    bank = torch.randint(0, 256, (BANK_SIZE, BANK_SIDE, BANK_SIDE, 3), dtype=torch.uint8,
                         generator=gen).to(device)
    ids = torch.randint(0, BANK_SIZE, (n,), generator=gen).to(device)
    like = torch.empty((n, s, s, 3), dtype=torch.uint8, device=device)
    like_source = pixels.to(device)
    anchor = texture_anchor(bank, ids, s, args.anchor_samples, ANCHOR_REPEATS)
    t, copy = alternate([lambda: sample_textures(bank, ids, size=s, seed=0, step=1,
                                                 check_ids=False), like.clone],
                        device, args.repeats, args.inner)
    record("sample_textures", f"bank {BANK_SIZE} x {BANK_SIDE}^2", t, "clone", copy, like.nbytes,
           anchor)
    t, copy = alternate([lambda: sample_textures(bank, ids, size=s, seed=0, step=1, out=like,
                                                 check_ids=False), lambda: like.copy_(like_source)],
                        device, args.repeats, args.inner)
    record("sample_textures out=", f"bank {BANK_SIZE} x {BANK_SIDE}^2", t, "copy_",
           copy, like.nbytes, anchor)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    ap.add_argument("--batch", type=int, default=256, help="images per batch (default 256)")
    ap.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed measurements per row (default 5 on CPU, 20 on CUDA)")
    ap.add_argument("--inner", type=int, default=None,
                    help="calls per measurement (default 1 on CPU, 20 on CUDA)")
    ap.add_argument("--anchor-samples", type=int, default=8,
                    help="images the Python-loop anchors run on (default 8)")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device {args.device}: must be cpu or cuda[:i]")
    args.repeats = args.repeats or (20 if device.type == "cuda" else 5)
    args.inner = args.inner or (20 if device.type == "cuda" else 1)
    if args.batch < 1 or args.size < 80 or args.repeats < 1 or args.inner < 1 \
            or not 1 <= args.anchor_samples <= args.batch:
        ap.error("need --batch, --repeats, --inner >= 1, --size >= 80 (the paper's patch sizes "
                 "go up to 72) and 1 <= --anchor-samples <= --batch")

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"

    def write_json(rows):
        if args.json:
            args.json.write_text(json.dumps({
                "device": str(device), "device_name": where, "batch": args.batch,
                "size": args.size, "repeats": args.repeats, "inner": args.inner,
                "timing": "cuda events" if device.type == "cuda" else "wall",
                "torch": torch.__version__, "rows": rows}, indent=2) + "\n")

    rows = run(args, on_row=write_json)
    print(f"fastneg.kernels on {device} ({where}): batch {args.batch} x {args.size} x "
          f"{args.size}, median of {args.repeats} x {args.inner} calls")
    print(f"{'op':<34}{'input':<30}{'ms':>9}{'GB/s':>8}  {'of copy':>14}{'vs loop':>9}"
          f"{'host us':>9}")
    for r in rows:
        print(f"{r['op']:<34}{r['input']:<30}{r['ms']:>9.3f}{r['gb_per_s']:>8.1f}  "
              f"{r['of_copy']:>7.0%} {r['yardstick']:<6}{r['speedup_vs_loop']:>8.0f}x"
              f"{r['host_us']:>9.0f}{' (host-bound)' if r['host_bound'] else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

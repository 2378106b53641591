"""Timing on CPU and CUDA for the benchmarks: calls measured back to back and in alternation
with a yardstick, caches evicted on demand, and patch_negatives against a plain copy.

Timing on CUDA: device time from CUDA events around the calls, queued behind a short spin
kernel so that the GPU never waits for Python to launch the next call (at H200 speed a 38 MB
copy takes ~20 us, less than launching it); the host's own cost, wall seconds per call to queue
the work, is returned apart. On CPU both are the wall time per call.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from fastneg.step import scaled_patch_range

SPIN_SECONDS = 0.005    # GPU busy-wait queued ahead of each timed CUDA measurement


def _spin_cycles(device) -> int:
    """GPU clock cycles that last about SPIN_SECONDS on `device`."""
    try:
        rate_khz = torch.cuda.get_device_properties(device).clock_rate
    except AttributeError:          # torch builds without the field: assume 2 GHz
        rate_khz = 2_000_000
    return int(SPIN_SECONDS * rate_khz * 1e3)


def timed_calls(fn, device, inner) -> tuple[float, float]:
    """(device seconds per call, host seconds per call) over `inner` back-to-back calls of fn
    (module docstring). On CPU both are the wall time per call."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        wall = (time.perf_counter() - t0) / inner
        return wall, wall
    with torch.cuda.device(device):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(_spin_cycles(device))   # the GPU is busy while the calls are queued
        start.record()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        host = (time.perf_counter() - t0) / inner
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner, host


def seconds_per_call(fn, device, inner) -> float:
    """Wall seconds per call of fn over `inner` calls, queued device work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / inner


def alternate(pair, device, repeats, inner, before=None):
    """[(median device seconds, median host seconds) per call] for each function of `pair`,
    measured in alternation; before(), when given, runs untimed ahead of every measurement."""
    times = [[], []]
    for fn in pair:                                   # warm-up: JIT compile, allocator
        fn()
    for _ in range(repeats):
        for k, fn in enumerate(pair):
            if before is not None:
                before()
            times[k].append(timed_calls(fn, device, inner))
    return [(statistics.median(t[0] for t in runs), statistics.median(t[1] for t in runs))
            for runs in times]


def last_level_cache_bytes() -> int | None:
    """Size of this CPU's largest cache in bytes (Linux sysfs), or None where unknown."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=None)


def cache_evictor(device):
    """A function that pushes every earlier tensor out of the caches (CPU: the last-level cache;
    CUDA: L2) by writing a buffer four times their size, at least 128 MB."""
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    else:
        cache = last_level_cache_bytes() or 0
    junk = torch.empty(max(4 * cache, 128 << 20), dtype=torch.uint8, device=device)
    return lambda: junk.fill_(1)



def patch_vs_copy(batch_size: int, size: int, device: str, repeats: int = 15,
                  trials: int = 5) -> dict:
    """{"float32 NCHW": {"memory": f, "cache": f, "memory_trials": [...], "cache_trials": [...]},
    "uint8 NHWC": {...}}: patch_negatives into a preallocated output as a fraction of
    out.copy_(x)'s speed on the same tensor (the batch's shape), measured in alternation
    (benchmarks/kernels.py has the full comparison); f is the median over `trials` trials, each
    on freshly allocated tensors (on a 2-core VM the fraction moved by up to 30 points from one
    allocation to the next, and by a few within one).

    "memory": a buffer four times the last-level cache is written before every timed call, so
    both read x and write out from memory: the bandwidth comparison the goal is about. Both
    functions then run once on a tiny tensor, untimed, so that the timed call finds its code
    and Python's objects in the cache again and only the data comes from memory (with the
    eviction alone, patch_negatives' Python checks took ~80 us instead of ~12).
    "cache": back-to-back calls, so x and out stay in the cache as far as they fit (a 64-image
    uint8 batch, 9.6 MB, fits a 32 MB L3, and the copy then runs at cache speed, several times
    memory bandwidth)."""
    from fastneg.kernels import patch_negatives
    dev = torch.device(device)
    evict = cache_evictor(dev)
    gen = torch.Generator().manual_seed(0)
    shapes = {"float32 NCHW": ((batch_size, 3, size, size), torch.float32, "nchw"),
              "uint8 NHWC": ((batch_size, size, size, 3), torch.uint8, "nhwc")}
    fractions = {}
    for name, (shape, dtype, layout) in shapes.items():
        memory, cache = [], []
        tiny_shape = shape[:1] + tuple(min(s, 16) for s in shape[1:])
        tiny = torch.zeros(tiny_shape, dtype=dtype, device=dev)
        tiny_out = torch.empty_like(tiny)

        def evict_data_only():
            evict()
            patch_negatives(tiny, layout=layout, patch_range=(2, 5), seed=0, out=tiny_out)
            tiny_out.copy_(tiny)

        for _ in range(trials):
            x = torch.randint(0, 256, shape, generator=gen).to(dtype).to(dev)
            out = torch.empty_like(x)
            pair = (lambda: patch_negatives(x, layout=layout,
                                            patch_range=scaled_patch_range(size), seed=0,
                                            out=out),
                    lambda: out.copy_(x))
            (patch_s, _), (copy_s, _) = alternate(pair, dev, repeats, 1, before=evict_data_only)
            memory.append(copy_s / patch_s)                 # device seconds, one call each
            inner = min(64, max(1, (64 << 20) // (2 * x.nbytes)))   # ~64 MB per timing
            (patch_s, _), (copy_s, _) = alternate(pair, dev, repeats, inner)
            cache.append(copy_s / patch_s)
            del x, out, pair
        fractions[name] = {"memory": statistics.median(memory),
                           "cache": statistics.median(cache),
                           "memory_trials": memory, "cache_trials": cache}
    return fractions

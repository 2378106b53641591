"""Cost of launching a parallel CPU kernel, per Numba threading layer, as launches accumulate.

    python benchmarks/launch_overhead.py                      # ~1 min on 2 cores
    python benchmarks/launch_overhead.py --launches 60000 --layers tbb,omp

Each layer runs in a fresh process (Numba picks its threading layer once per process): it calls
fastneg.kernels.patch_negatives on a tiny batch (2 x 3 x 16 x 16 float32, so the call is all
launch and no work) --launches times and prints the wall microseconds per call of every block
of --block calls. A layer whose cost per call grows with the number of calls made before it
slows every long CPU run (fastneg.kernels.jit explains the layer fastneg picks). A layer that
Numba cannot load here is reported as unavailable.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from fastneg.benchmarking.common import hardware

LAYERS = ("omp", "tbb", "workqueue")


def child(launches: int, block: int) -> dict:
    """Run in the child: {"layer": name, "us_per_call": [per block]}."""
    import numba
    import torch

    from fastneg.kernels import patch_negatives
    x = torch.rand(2, 3, 16, 16)
    out = torch.empty_like(x)

    def call():
        patch_negatives(x, layout="nchw", patch_range=(2, 5), seed=0, out=out)

    call()                                                    # compile or load, start the pool
    per_block = []
    for _ in range(max(1, launches // block)):
        t0 = time.perf_counter()
        for _ in range(block):
            call()
        per_block.append((time.perf_counter() - t0) / block * 1e6)
    return {"layer": numba.threading_layer(), "us_per_call": per_block}


def measure(layer: str, launches: int, block: int, timeout: float) -> dict:
    env = {**os.environ, "NUMBA_THREADING_LAYER": layer}
    cmd = [sys.executable, __file__, "--child", "--launches", str(launches), "--block", str(block)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"layer": layer, "status": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"layer": layer, "status": f"unavailable: {last}"}
    return {**json.loads(done.stdout), "status": "ok"}


def layer_list(text: str) -> list:
    names = [t for t in text.split(",") if t]
    bad = [n for n in names if n not in LAYERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"layers must be a comma list of {', '.join(LAYERS)}, "
                                         f"got {text!r}")
    return names


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=layer_list, default=list(LAYERS),
                   help=f"comma list of {', '.join(LAYERS)} (default: all)")
    p.add_argument("--launches", type=positive, default=40000,
                   help="calls per layer (default 40000)")
    p.add_argument("--block", type=positive, default=5000,
                   help="calls per reported figure (default 5000)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds per layer before it is given up (default 300)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.launches, args.block)))
        return 0
    print(f"# launch cost of a parallel kernel (patch_negatives, 2 x 3 x 16 x 16), microseconds "
          f"per call per block of {args.block}; {hardware()}")
    for layer in args.layers:
        r = measure(layer, args.launches, args.block, args.timeout)
        if r["status"] != "ok":
            print(f"{layer:<10} {r['status']}")
            continue
        blocks = " ".join(f"{us:.1f}" for us in r["us_per_call"])
        print(f"{r['layer']:<10} {blocks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

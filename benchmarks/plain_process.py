"""Is the library fast where users call it? The CPU kernels and a plain training-data loop, each
in a fresh Python process started with none of the benchmarks' tuning, beside the same code in
the throughput benchmark's tuned environment, in one run.

    python benchmarks/plain_process.py [--json F] [--data PHOTOS/train] [--batches 20]

"plain": a child process whose environment has no OMP_*, KMP_*, NUMBA_* or MALLOC_* variable,
which imports torch before fastneg and calls nothing of fastneg.host: what a library user's
script gets from `import torch` then `import fastneg...`.
"tuned": the throughput benchmark's rows (OMP_WAIT_POLICY=PASSIVE in the environment and
fastneg.host.keep_freed_memory() called first).

Measured in each:
1. patch_negatives into a preallocated output as a fraction of out.copy_(x) on float32 NCHW
   256 x 3 x 224 x 224 and uint8 NHWC 256 x 224 x 224 x 3, from memory
   (fastneg.benchmarking.timing.patch_vs_copy: caches evicted before each call, median over
   trials on fresh tensors);
2. the loop a user writes: build_loader("torch") + MoCoV2Augment on both views +
   patch_negatives of the query, img/s over --batches batches after 2 warm-up, and the bare
   loader's img/s in the same process (the goal: the loop at the throughput benchmark's rate).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

DATA_ROOT = Path(__file__).resolve().parents[1] / "data"   # the checkout's data/ (default_data)
SCRUBBED_PREFIXES = ("OMP_", "KMP_", "NUMBA_", "MALLOC_", "GOMP_")

CHILD = textwrap.dedent("""
    import torch            # first, as a user's script would: torch's OpenMP runtime loads now
    import json, sys, time
    mode, what, data, batches, out = sys.argv[1:6]
    batches = int(batches)
    if mode == "tuned":
        from fastneg.host import keep_freed_memory
        keep_freed_memory()
    result = {}
    if what == "copy":
        from fastneg.benchmarking.timing import patch_vs_copy
        result = patch_vs_copy(256, 224, "cpu", trials=3)
    else:
        import torch
        from fastneg.augment import MoCoV2Augment
        from fastneg.kernels import patch_negatives
        from fastneg.loaders import build_loader
        loader = build_loader("torch", data, batch_size=64, size=224, device="cpu", seed=0)
        aug = MoCoV2Augment()

        def rate(work):
            n, start, step = 0, None, 0
            epoch = 0
            while True:
                loader.set_epoch(epoch)
                for batch in loader:
                    if step == 2:
                        start, n = time.perf_counter(), 0
                    work(batch, step)
                    n += batch.views[0].shape[0]
                    step += 1
                    if step == batches + 2:
                        return n / (time.perf_counter() - start)
                epoch += 1

        def full(batch, step):
            views = [aug.apply(v, aug.sample(len(v), seed=0, step=step, view=i))
                     for i, v in enumerate(batch.views)]
            patch_negatives(views[0], layout="nchw", patch_range=(16, 72), seed=0, step=step)

        result = {"loader_img_s": rate(lambda batch, step: None),
                  "loop_img_s": rate(full)}
        result["of_loader"] = result["loop_img_s"] / result["loader_img_s"]
    open(out, "w").write(json.dumps(result))
""")


def environment(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED_PREFIXES)}
    if mode == "tuned":
        from fastneg.benchmarking.common import row_environment   # throughput's rows' exactly
        env = {**env, "OMP_WAIT_POLICY": row_environment()["OMP_WAIT_POLICY"]}
    return env


def measure(mode: str, what: str, data: Path, batches: int, workdir: Path) -> dict:
    out = workdir / f"{mode}-{what}.json"
    code = CHILD
    done = subprocess.run([sys.executable, "-c", code, mode, what, str(data), str(batches),
                           str(out)], env=environment(mode), capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"plain_process: the {mode} {what} child failed: "
                         f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.read_text())


def main(argv=None) -> int:
    import tempfile

    from fastneg.benchmarking.common import hardware
    from fastneg.benchmarking.data import default_data
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="an ImageFolder's train split (default: the "
                   "benchmark photos, made on first use)")
    p.add_argument("--batches", type=int, default=20, help="measured batches per loop rate")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    data = args.data or default_data(DATA_ROOT)
    if not data.is_dir():
        print(f"plain_process: error: --data {data} is not a folder", file=sys.stderr)
        return 2
    results = {"hardware": hardware(), "data": str(data)}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("plain", "tuned"):
            results[mode] = {what: measure(mode, what, data, args.batches, Path(tmp))
                             for what in ("copy", "loop")}
    print(f"{results['hardware']}; data {data}")
    print("| process | patch NS of copy, float32 NCHW | uint8 NHWC | loader img/s | "
          "loop img/s | loop of loader |")
    print("|---|---|---|---|---|---|")
    for mode in ("plain", "tuned"):
        copy, loop = results[mode]["copy"], results[mode]["loop"]
        print(f"| {mode} | {copy['float32 NCHW']['memory']:.0%} | "
              f"{copy['uint8 NHWC']['memory']:.0%} | {loop['loader_img_s']:.0f} | "
              f"{loop['loop_img_s']:.0f} | {loop['of_loader']:.0%} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Linear probe and kNN at ImageNet scale, on synthetic features: time and memory per phase.

    python benchmarks/probe.py                                  # 200k x 2048, 1,000 classes, cpu
    python benchmarks/probe.py --device cuda --json probe.json
    python benchmarks/probe.py --n 20000 --classes 100 --epochs 5 --baseline-n 5000   # quick

Data: `--n` training rows and `--queries` query rows of `--dim` features over `--classes`
balanced classes, x = separation * centre[class] + N(0, 1) (centres N(0, 1), one seeded
generator), written in blocks as the float16 shard cache of fastneg.eval.shards (the format
`fastneg eval` caches features in) to a temporary folder (or --out, kept).

Phases (wall time; memory of this process sampled every 20 ms from /proc/self/status):
- write: generating and writing the shards (the analogue of feature extraction's writes);
- stats: one streaming pass for the standardization statistics (also inside the probe);
- probe: fastneg.eval.linear.train_linear_probe_sgd, `--epochs` epochs on `--device` (its
  own statistics pass included);
- predict: the probe on the queries; knn: knn_predict_chunked of the queries on the bank;
- baseline: today's full-batch L-BFGS (train_linear_probe) on the first `--baseline-n` rows
  held in memory as float32 (`--baseline-iter` iterations; 300 is its default), then the
  mini-batch probe on the same rows, for accuracy and time at equal N.

Memory: peak_rss_mb is the process's VmHWM at the end of the phase (the counter is reset before
each phase where the kernel allows it, /proc/self/clear_refs); it counts resident pages of the
memory-mapped shards too, which the kernel drops under pressure. peak_anon_mb is the sampled
peak of RssAnon: the memory the process itself allocated (what bounds N). Extrapolation to
`--target` rows (1,281,167 = ImageNet-1k): time linear in N (kNN: for the same query count),
the L-BFGS baseline's memory growth linear in N. Prints a table and writes --json.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from fastneg.eval.knn import knn_predict_chunked  # noqa: E402
from fastneg.eval.linear import EPOCHS, STEPS, default_epochs, feature_stats, \
    train_linear_probe, train_linear_probe_sgd  # noqa: E402
from fastneg.eval.shards import ShardWriter, open_shards  # noqa: E402

IMAGENET_1K = 1_281_167
BLOCK = 8192   # rows generated at a time
MARKER = ".fastneg-probe-bench"   # in an --out folder this benchmark wrote


def status_kb() -> dict:
    """{field: kB} of the VmHWM, VmRSS, RssAnon and RssFile lines of /proc/self/status."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[name] = int(rest.split()[0])
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: 5 > /proc/self/clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def release_freed() -> None:
    """Hand memory freed by earlier phases back to the system (glibc's malloc_trim), so that a
    phase's RSS is its own and not the heap an earlier phase left behind."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Phase:
    """Times a block and samples its memory: .seconds, .peak_rss_mb, .peak_anon_mb."""

    def __init__(self, name: str, rows: list):
        self.name, self.rows = name, rows

    def __enter__(self):
        release_freed()
        self.reset = reset_peak()
        self.anon, self._stop = status_kb()["RssAnon"], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.anon = max(self.anon, status_kb()["RssAnon"])

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        s = status_kb()
        self.anon = max(self.anon, s["RssAnon"])
        self.row = {"phase": self.name, "seconds": round(self.seconds, 2),
                    "peak_rss_mb": round(s["VmHWM"] / 1024, 1),
                    "peak_anon_mb": round(self.anon / 1024, 1),
                    "peak_reset": self.reset}
        self.rows.append(self.row)
        print(f"  {self.name:<16} {self.seconds:8.1f} s   peak RSS {s['VmHWM'] / 1024:8.0f} MB"
              f"   peak anon {self.anon / 1024:8.0f} MB", flush=True)
        return False


def write_synthetic(folder: Path, n: int, dim: int, classes: int, separation: float,
                    seed: int, stream: int) -> np.ndarray:
    """Write n rows as a shard folder; returns their int64 labels (balanced, shuffled)."""
    centres = np.random.default_rng([seed, 0]).standard_normal((classes, dim), np.float32)
    gen = np.random.default_rng([seed, stream])
    labels = gen.permutation(np.arange(n) % classes)
    with ShardWriter(folder, n) as writer:
        for start in range(0, n, BLOCK):
            y = labels[start:start + BLOCK]
            x = gen.standard_normal((len(y), dim), np.float32)
            x += separation * centres[y]
            writer.write(np.arange(start, start + len(y)), x)
    return labels


def check_out(root: Path) -> None:
    """--out must be absent, empty or a folder this benchmark wrote (it replaces train/ and
    queries/ inside it): never a folder of someone else's data."""
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"--out {root} is not a folder")
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        raise ValueError(f"--out {root} is not empty and was not written by this benchmark "
                         f"(no {MARKER}); give an empty or new folder")
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("benchmarks/probe.py shard folders\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000, help="training rows (default 200000)")
    p.add_argument("--dim", type=int, default=2048, help="features per row (default 2048)")
    p.add_argument("--classes", type=int, default=1000, help="classes (default 1000)")
    p.add_argument("--queries", type=int, default=10_000,
                   help="query rows scored by the probe and kNN (default 10000)")
    p.add_argument("--separation", type=float, default=0.15,
                   help="scale of the class centres against unit noise (default 0.15: at "
                        "2048 features neither the probe nor kNN is near 0 or 1)")
    p.add_argument("--device", default="cpu", help="torch device of probe and kNN (default cpu)")
    p.add_argument("--epochs", type=int, default=None,
                   help="mini-batch probe epochs (default: the probe's default for --n, "
                        f"{EPOCHS} cut to about {STEPS} steps)")
    p.add_argument("--k", type=int, default=20, help="kNN neighbours (default 20)")
    p.add_argument("--baseline-n", type=int, default=20_000,
                   help="rows for the in-memory L-BFGS baseline, 0 to skip (default 20000)")
    p.add_argument("--baseline-iter", type=int, default=300,
                   help="L-BFGS iterations of the baseline (default 300, its default)")
    p.add_argument("--target", type=int, default=IMAGENET_1K,
                   help=f"rows to extrapolate to (default {IMAGENET_1K})")
    p.add_argument("--seed", type=int, default=0, help="data and probe seed (default 0)")
    p.add_argument("--out", help="write the shard folders here and keep them "
                                 "(default: a temporary folder, removed)")
    p.add_argument("--json", help="write the results to this JSON file")
    return p


def check_args(args) -> None:
    for flag in ("n", "dim", "classes", "queries", "epochs", "k", "target"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.baseline_n < 0 or args.baseline_n > args.n:
        raise ValueError(f"--baseline-n must lie in [0, --n = {args.n}], got {args.baseline_n}")
    if args.baseline_iter < 1 or args.separation < 0:
        raise ValueError("--baseline-iter must be >= 1 and --separation >= 0")
    torch.device(args.device)   # a malformed device name raises here, before any work


def run(args) -> dict:
    if args.epochs is None and args.n >= 1:
        args.epochs = default_epochs(args.n)
    check_args(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fastneg-probe-"))
    if args.out:
        check_out(root)
    phases: list = []
    result = {"n": args.n, "dim": args.dim, "classes": args.classes, "queries": args.queries,
              "device": str(device), "epochs": args.epochs, "torch_threads":
              torch.get_num_threads(), "phases": phases}
    print(f"probe benchmark: {args.n} x {args.dim}, {args.classes} classes, {args.queries} "
          f"queries, device {device}, {args.epochs} epochs", flush=True)
    try:
        with Phase("write", phases):
            train_y = write_synthetic(root / "train", args.n, args.dim, args.classes,
                                      args.separation, args.seed, 1)
            query_y = write_synthetic(root / "queries", args.queries, args.dim, args.classes,
                                      args.separation, args.seed, 2)
        bank, queries = open_shards(root / "train"), open_shards(root / "queries")
        result["cache_mb"] = round(sum(f.stat().st_size for f in (root / "train").iterdir())
                                   / 2 ** 20, 1)
        train_t, query_t = torch.from_numpy(train_y), torch.from_numpy(query_y)
        with Phase("stats", phases):
            feature_stats(bank, device=device)
        with Phase("probe", phases):
            probe = train_linear_probe_sgd(bank, train_t, num_classes=args.classes,
                                           epochs=args.epochs, seed=args.seed, device=device,
                                           progress=True)
        with Phase("predict", phases):
            result["probe_top1"] = float((probe.predict(queries) == query_t).float().mean())
        with Phase("knn", phases):
            pred = knn_predict_chunked(bank, train_t, queries, num_classes=args.classes,
                                       k=args.k, device=device)
            result["knn_top1"] = float((pred == query_t).float().mean())
        del probe, pred
        if args.baseline_n:
            m = args.baseline_n
            sub = torch.from_numpy(bank.rows(np.arange(m)))   # float32, in memory, as today
            with Phase("baseline-lbfgs", phases) as ph:
                t0 = time.perf_counter()
                lb = train_linear_probe(sub, train_t[:m], num_classes=args.classes,
                                        max_iter=args.baseline_iter)
                ph_seconds = time.perf_counter() - t0
                result["baseline_lbfgs_top1"] = float((lb.predict(queries) == query_t)
                                                      .float().mean())
            result["baseline_lbfgs_fit_s"] = round(ph_seconds, 2)
            del lb
            with Phase("baseline-sgd", phases):
                sg = train_linear_probe_sgd(sub, train_t[:m], num_classes=args.classes,
                                            epochs=args.epochs, seed=args.seed, device=device)
                result["baseline_sgd_top1"] = float((sg.predict(queries) == query_t)
                                                    .float().mean())
            del sub, sg
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    result["peak_rss_mb_process"] = round(status_kb()["VmHWM"] / 1024, 1) \
        if not any(p["peak_reset"] for p in phases) else max(p["peak_rss_mb"] for p in phases)
    result["extrapolated"] = extrapolate(result, args)
    return result


def extrapolate(result: dict, args) -> dict:
    """Linear extrapolation of every phase to --target rows (see the module docstring)."""
    scale = args.target / args.n
    by = {p["phase"]: p for p in result["phases"]}
    out = {"target": args.target,
           "write_s": round(by["write"]["seconds"] * scale, 1),
           "stats_s": round(by["stats"]["seconds"] * scale, 1),
           "probe_s": round(by["probe"]["seconds"] * scale, 1),
           "probe_s_per_epoch": round(by["probe"]["seconds"] * scale / args.epochs, 1),
           "knn_s": round(by["knn"]["seconds"] * scale, 1),
           "cache_gb": round(result["cache_mb"] * scale / 1024, 2),
           "sgd_peak_anon_mb": by["probe"]["peak_anon_mb"]}   # bounded: does not grow with N
    if "baseline-lbfgs" in by:
        base = by["stats"]["peak_anon_mb"]
        grow = max(0.0, by["baseline-lbfgs"]["peak_anon_mb"] - base)
        out["lbfgs_peak_anon_gb"] = round(grow * args.target / args.baseline_n / 1024, 1)
        out["lbfgs_fit_s"] = round(result["baseline_lbfgs_fit_s"] * args.target
                                   / args.baseline_n, 1)
        # today's default is 300 iterations; fewer measured ones are scaled (at most: L-BFGS
        # may stop early on its tolerances)
        out["lbfgs_fit_s_300_iter"] = round(out["lbfgs_fit_s"] * 300 / args.baseline_iter, 1)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (ValueError, OSError) as e:
        print(f"benchmarks/probe.py: {e}", file=sys.stderr)
        return 2
    ex = result["extrapolated"]
    print(f"\nprobe top-1 {result['probe_top1']:.3f}   kNN top-1 {result['knn_top1']:.3f}"
          + (f"   L-BFGS at {args.baseline_n} rows {result['baseline_lbfgs_top1']:.3f}"
             f" (mini-batch at the same rows {result['baseline_sgd_top1']:.3f})"
             if "baseline_lbfgs_top1" in result else ""))
    print(f"at {ex['target']} rows (linear): write {ex['write_s']:.0f} s, stats "
          f"{ex['stats_s']:.0f} s, probe {ex['probe_s']:.0f} s ({ex['probe_s_per_epoch']:.0f} "
          f"s/epoch), kNN of {result['queries']} queries {ex['knn_s']:.0f} s, cache "
          f"{ex['cache_gb']} GB, probe memory {ex['sgd_peak_anon_mb']:.0f} MB"
          + (f"; L-BFGS would need ~{ex['lbfgs_peak_anon_gb']} GB and ~{ex['lbfgs_fit_s']:.0f} s"
             f" for {args.baseline_iter} iterations (<= {ex['lbfgs_fit_s_300_iter']:.0f} s for "
             "its default 300)" if "lbfgs_peak_anon_gb" in ex else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

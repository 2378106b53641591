"""Tar shards against the ImageFolder on the same images: conversion, raw reading, loaders.

    python benchmarks/shards.py                          # the benchmark photos, torch + dali
    python benchmarks/shards.py --small 100000           # also 100k tiny files (scale.py's)
    python benchmarks/shards.py --batches 20 --json shards.json

Datasets: the benchmark photos (benchmarks/throughput.py's default: data/photos/train, 1,600
ImageNet-sized JPEG q90 crops, made once) and, with --small N, a folder of N tiny JPEGs written
by benchmarks/scale.py's generator (the many-small-files case, in a temporary folder). Each is
converted once with `fastneg convert --to wds` (timed: convert_s) into a temporary folder.

Per dataset:
- read img/s: every image's bytes read once in one thread, no decode: open + read per file
  (listing from the dataset index) against one sequential pass over the tar shards; each
  measured twice after a first pass, so both come from the page cache (the file-system cost
  of opening a file remains: the shards' advantage on a cold disk or a network file system is
  larger than shown here);
- per loader (`--loaders`, default torch and dali) and source (folder, shards): the bare
  loader's img/s (its two uint8 crops of --size, nothing after) over --batches batches after
  --warmup, batch --batch-size, on this machine's CPU with --workers (default: its cores).
Each loader row runs in a fresh child process, one after another. Prints the figures and
writes --json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastneg.benchmarking.data import default_data, generate_folder
from fastneg.data.files import available_cpus
from fastneg.data.index import load_index
from fastneg.data.shards import iter_tar, open_shard, resolve_shards, write_shards
from fastneg.loaders import available_kinds, build_loader

DATA_ROOT = Path(__file__).resolve().parents[1] / "data"   # the checkout's data/ (default_data)


def read_folder(root: Path) -> tuple[int, float]:
    index = load_index(root)
    t0 = time.perf_counter()
    total = 0
    for name in index.files:
        with open(root / name, "rb") as f:
            total += len(f.read())
    return len(index.files), time.perf_counter() - t0


def read_shards(folder: Path) -> tuple[int, float]:
    shards = resolve_shards(folder)
    t0 = time.perf_counter()
    count = 0
    for name in shards.shards:
        with open_shard(name) as stream:
            count += sum(1 for _ in iter_tar(stream, name))
    return count, time.perf_counter() - t0


def best_rate(fn, *args, repeats: int = 2) -> float:
    fn(*args)                                   # warm the page cache
    return max(n / max(s, 1e-9) for n, s in (fn(*args) for _ in range(repeats)))


def loader_rate(kind: str, source, args) -> dict:
    t0 = time.perf_counter()
    loader = build_loader(kind, str(source), batch_size=args.batch_size, size=args.size,
                          device="cpu", workers=args.workers, drop_last=True)
    epoch, done, images, start, first = 0, 0, 0, None, None
    while done < args.warmup + args.batches:
        loader.set_epoch(epoch)
        for batch in loader:
            if first is None:
                first = time.perf_counter() - t0
            done += 1
            if done == args.warmup:
                start = time.perf_counter()
            elif done > args.warmup:
                images += len(batch.indices)
            if done == args.warmup + args.batches:
                break
        epoch += 1
    seconds = time.perf_counter() - start
    return {"img_s": images / seconds, "first_batch_s": first, "batches": args.batches}


def loader_rate_in_child(kind: str, source, args) -> dict:
    """loader_rate in a fresh process (no earlier loader's threads or workers around)."""
    cmd = [sys.executable, __file__, "--row", kind, str(source), "--batches", str(args.batches),
           "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--size",
           str(args.size), "--workers", str(args.workers)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"img_s": float("nan"), "first_batch_s": float("nan"),
                "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_dataset(name: str, root: Path, workdir: Path, args) -> dict:
    out_dir = workdir / f"{name}-shards"
    t0 = time.perf_counter()
    manifest = write_shards(root, out_dir, shard_size=args.shard_size, progress=False)
    row = {"dataset": name, "images": manifest["samples"], "shards": len(manifest["shards"]),
           "convert_s": time.perf_counter() - t0,
           "read_folder_img_s": best_rate(read_folder, root),
           "read_shards_img_s": best_rate(read_shards, out_dir), "loaders": {}}
    print(f"{name}: {row['images']} images, {row['shards']} shards, convert "
          f"{row['convert_s']:.1f} s; read {row['read_folder_img_s']:,.0f} img/s (files) vs "
          f"{row['read_shards_img_s']:,.0f} img/s (shards)", flush=True)
    for kind in args.loaders:
        for source, data in (("folder", root), ("shards", out_dir)):
            r = loader_rate_in_child(kind, data, args)
            row["loaders"][f"{kind}/{source}"] = r
            print(f"  {kind:5s} {source:6s} {r['img_s']:8.0f} img/s  (first batch "
                  f"{r['first_batch_s']:.1f} s)", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="ImageFolder to compare on (default: the benchmark photos)")
    ap.add_argument("--small", type=int, default=0,
                    help="also a generated folder of this many tiny JPEGs (e.g. 100000)")
    ap.add_argument("--loaders", default="torch,dali",
                    help="comma-separated loader kinds (default torch,dali)")
    ap.add_argument("--batches", type=int, default=10, help="measured batches per row (10)")
    ap.add_argument("--warmup", type=int, default=2, help="batches before timing (2)")
    ap.add_argument("--batch-size", type=int, default=64, help="batch size (64)")
    ap.add_argument("--size", type=int, default=224, help="crop side (224)")
    ap.add_argument("--workers", type=int, default=None,
                    help="loader threads / processes (default: the cores this process may use)")
    ap.add_argument("--shard-size", default="64MB", help="bytes per shard (64MB)")
    ap.add_argument("--json", type=Path, default=Path("shards.json"), help="result file")
    ap.add_argument("--row", nargs=2, metavar=("KIND", "DATA"),
                    help="measure one loader row and print it as JSON (used internally)")
    args = ap.parse_args(argv)
    args.workers = args.workers or available_cpus()
    if args.row:
        print(json.dumps(loader_rate(args.row[0], args.row[1], args)))
        return 0
    args.loaders = [k for k in args.loaders.split(",") if k]
    missing = [k for k in args.loaders if k not in available_kinds() or k == "ffcv"]
    if missing:
        ap.error(f"--loaders: {', '.join(missing)} cannot run here (torch and dali read shards)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastneg-shards-") as tmp:
        work = Path(tmp)
        if args.data is None:
            args.data = default_data(DATA_ROOT)
        rows.append(bench_dataset("photos" if args.data.name == "train" else args.data.name,
                                  args.data, work, args))
        if args.small:
            small = work / "small"
            seconds = generate_folder(small, args.small, 1000)
            print(f"generated {args.small} tiny files in {seconds:.0f} s", flush=True)
            rows.append(bench_dataset(f"small-{args.small}", small, work, args))
    result = {"cpus": available_cpus(), "args": {k: str(v) for k, v in vars(args).items()},
              "rows": rows}
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

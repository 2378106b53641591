"""Start-up at ImageNet scale, simulated: the dataset index (fastneg.data.index) and the loaders'
path to the first batch with 8 ranks on one machine.

    python benchmarks/scale.py                          # 100,000 files + a 1.28M-entry list
    python benchmarks/scale.py --images 20000 --json scale.json
    python benchmarks/scale.py --keep data/scale        # keep the generated folder (and reuse it)

Two datasets:
- a generated ImageFolder of `--images` tiny JPEGs (the same few encoded images written under
  many names, `--classes` class folders), in a temporary folder removed at the end unless --keep;
- a synthetic index of `--entries` (1,281,167 = ImageNet-1k) entries with ImageNet-like paths,
  written straight to an index file: no image files needed. It measures what does not depend on
  the files: reading the index, its memory per rank, the epoch order and shard.

Measured:
- generate_s: writing the folder (not a cost of fastneg; shown for context);
- build_s: `load_index` with no index: listing, stat and check of every file, write (the once
  per dataset cost, with `--workers` threads);
- per rank (`--ranks` processes started together, world_size = --ranks; all at once, so on a
  machine with fewer cores than ranks the times include waiting for a core):
  check_s (listing + one stat per file + key: what tells that the index is fresh),
  read_s (map the index and build the FileCheck), index_rss_mb / index_pss_mb (memory of the
  index in that process: RSS counts the mapped pages in every process, PSS splits shared pages
  between the processes mapping them), first_batch_s (build_loader("torch") with a warm index
  to the first batch: the start-up a rank pays at every run; measured twice, the first time
  with the compiles a new process does), process_rss_mb (the whole process after that);
- the same read for the synthetic index, and the epoch order + shard of 1.28M samples.

Extrapolation to --target (1,281,167) files: linear in the number of files, from the folder's
per-file costs for build, check and start-up, from the synthetic index for read and memory.
For start-up, the first loader's extra time over the second (compiles) is kept fixed and the
second's time is scaled (conservative: its own fixed costs are scaled too). The per-rank phase
also runs with 1 rank alone: with more ranks than cores, the ranks' times include waiting for a
core, which a node with a core per rank does not have. Prints a table and writes --json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fastneg.benchmarking.data import generate_folder

IMAGENET_1K = 1_281_167
BATCH = 32             # per rank, for the first batch
MARKER = ".fastneg-scale"   # in a generated folder: "<images> <classes>"


def memory_mb() -> dict:
    """RSS and PSS of this process in MB (PSS from /proc/self/smaps_rollup, Linux)."""
    out = {}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("Rss", "Pss"):
                    out[key.lower()] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def synthetic_index(path: Path, entries: int, classes: int) -> float:
    """Write an index of `entries` ImageNet-like paths (no files); seconds."""
    from fastneg.data.index import KIND_JPEG_RGB, DatasetIndex, PathTable, write_index

    t0 = time.perf_counter()
    per_class = -(-entries // classes)
    labels = np.arange(entries, dtype=np.int64) // per_class
    names = [f"n{y:08d}/n{y:08d}_{k}.JPEG" for k, y in enumerate(labels.tolist())]
    rng = np.random.default_rng(0)
    index = DatasetIndex(
        root=Path("/nonexistent"), key="synthetic", files=PathTable.from_strings(names),
        labels=labels, classes=tuple(f"n{c:08d}" for c in range(classes)),
        sizes=rng.integers(20_000, 200_000, entries), mtimes=np.full(entries, 1, np.int64),
        heights=rng.integers(200, 500, entries), widths=rng.integers(200, 500, entries),
        kinds=np.full(entries, KIND_JPEG_RGB, np.uint8), bad=())
    write_index(path, index)
    return time.perf_counter() - t0


def _rank(task: str, target: str, rank: int, world: int, barrier, queue) -> None:
    """One simulated rank: time its part, measure memory while every rank holds its result."""
    try:
        import torch

        import fastneg.loaders.torch_loader  # noqa: F401 - imported before the clock starts
        from fastneg.data.index import INDEX_NAME, folder_state, list_folder, read_index
        from fastneg.loaders import build_loader
        from fastneg.loaders.common import epoch_order, shard

        torch.set_num_threads(1)
        result = {"rank": rank}
        before = memory_mb()
        barrier.wait()
        t0 = time.perf_counter()
        if task == "index":        # load_index's warm path, step by step
            images, sizes, mtimes = list_folder(target)
            key = folder_state(images, sizes, mtimes)
            result["check_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            index = read_index(Path(target) / INDEX_NAME, root=target)
            assert index is not None and index.key == key, "the index is not fresh"
            del images
        else:                      # the synthetic index file
            t1 = t0
            index = read_index(Path(target))
        check = index.file_check()
        good = check.good                      # what the loaders compute first
        touched = int(index.files.blob.sum()) + int(check.heights.sum() + check.widths.sum())
        result["read_s"] = time.perf_counter() - t1
        held = memory_mb()
        barrier.wait()                         # every rank maps the index now
        shared = memory_mb()
        result["index_rss_mb"] = held.get("rss", 0) - before.get("rss", 0)
        result["index_pss_mb"] = shared.get("pss", 0) - before.get("pss", 0)
        if task == "synthetic":
            epoch_order(good[:2], 0, 0, True)        # compile the key kernel first
            t2 = time.perf_counter()
            shard(epoch_order(good, 0, 0, True), rank, world, 256, True)
            result["order_shard_s"] = time.perf_counter() - t2
        del check, good, touched
        if task == "index":
            # Twice: the first loader of a process also compiles (a fixed cost, whatever the
            # dataset size); the second shows the part that grows with the dataset.
            for name in ("first_batch_s", "first_batch_warm_s"):
                barrier.wait()
                t3 = time.perf_counter()
                loader = build_loader("torch", target, batch_size=BATCH, size=32, device="cpu",
                                      rank=rank, world_size=world, workers=0)
                next(iter(loader))
                result[name] = time.perf_counter() - t3
                del loader
            result["process_rss_mb"] = memory_mb().get("rss", 0)
        queue.put(result)
    except BaseException as e:   # noqa: BLE001 - reported by the parent, which would wait
        queue.put({"rank": rank, "error": repr(e)})
        barrier.abort()


def run_ranks(task: str, target: Path, world: int) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")      # fresh processes, like torchrun's
    barrier, queue = ctx.Barrier(world), ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(task, str(target), r, world, barrier, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=3600) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"a simulated rank failed: {errors[0]}")
    return results


def summarize(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows if key in r]
    return {"max": max(values), "mean": float(np.mean(values))} if values else {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=100_000, help="files in the generated folder")
    ap.add_argument("--classes", type=int, default=1000, help="class folders (default 1000)")
    ap.add_argument("--entries", type=int, default=IMAGENET_1K,
                    help="entries of the synthetic index (default 1,281,167)")
    ap.add_argument("--target", type=int, default=IMAGENET_1K, help="extrapolate to this many")
    ap.add_argument("--ranks", type=int, default=8, help="simulated ranks (processes)")
    ap.add_argument("--workers", type=int, default=None,
                    help="threads checking files while building (default: the cores)")
    ap.add_argument("--keep", type=Path, help="generate the folder here and keep it (reused if "
                                              "it holds --images files already)")
    ap.add_argument("--json", type=Path, default=Path("scale.json"),
                    help="write the results here (default scale.json)")
    args = ap.parse_args(argv)
    for name in ("images", "classes", "entries", "target", "ranks"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.images < BATCH * args.ranks:
        ap.error(f"--images must be at least {BATCH} per rank ({BATCH * args.ranks})")

    from fastneg.data.files import available_cpus
    from fastneg.data.index import INDEX_NAME, load_index

    workers = args.workers or available_cpus()
    work = Path(tempfile.mkdtemp(prefix="fastneg-scale-"))
    root = args.keep or work / "imagefolder"
    out = {"load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
           "images": args.images, "classes": args.classes, "entries": args.entries,
           "ranks": args.ranks, "cpus": available_cpus(), "workers": workers}
    try:
        marker = root / MARKER
        if root.exists() and any(root.iterdir()) and not marker.exists():
            ap.error(f"--keep {root} exists and was not written by this benchmark")
        wanted = f"{args.images} {args.classes}"
        if not marker.exists() or marker.read_text() != wanted:
            shutil.rmtree(root, ignore_errors=True)
            print(f"writing {args.images} files into {root} ...", flush=True)
            out["generate_s"] = generate_folder(root, args.images, args.classes)
            marker.write_text(wanted)
        for stale in root.glob(INDEX_NAME + "*"):
            stale.unlink()
        print("building the index (cold) ...", flush=True)
        t0 = time.perf_counter()
        built = load_index(root, workers=workers)
        out["build_s"] = time.perf_counter() - t0
        out["index_bytes"] = built.path.stat().st_size
        print(f"{args.ranks} ranks: check + read the index, then a torch loader's first "
              "batch ...", flush=True)
        folder_rows = run_ranks("index", root, args.ranks)
        print("the same with 1 rank alone ...", flush=True)
        solo_rows = run_ranks("index", root, 1)
        print(f"synthetic index of {args.entries} entries ...", flush=True)
        synthetic = work / "synthetic-index"
        out["synthetic_write_s"] = synthetic_index(synthetic, args.entries, args.classes)
        out["synthetic_index_bytes"] = synthetic.stat().st_size
        synthetic_rows = run_ranks("synthetic", synthetic, args.ranks)
        report(args, out, folder_rows, solo_rows, synthetic_rows)
    finally:
        print("removing the generated files ...", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(args, out: dict, folder_rows: list[dict], solo_rows: list[dict],
           synthetic_rows: list[dict]) -> None:
    """Print the table and write the JSON."""
    scale = args.target / args.images
    scale_synthetic = args.target / args.entries    # memory and read: from the synthetic index
    per_rank = {k: summarize(folder_rows, k) for k in
                ("check_s", "read_s", "index_rss_mb", "index_pss_mb", "first_batch_s",
                 "first_batch_warm_s", "process_rss_mb")}
    solo = solo_rows[0]
    solo_fixed = max(0.0, solo["first_batch_s"] - solo["first_batch_warm_s"])
    synth = {k: summarize(synthetic_rows, k) for k in
             ("read_s", "index_rss_mb", "index_pss_mb", "order_shard_s")}
    out |= {"folder_ranks": folder_rows, "solo": solo, "synthetic_ranks": synthetic_rows,
            "per_rank": per_rank, "synthetic": synth}
    # The first loader's start-up less the second's does not grow with the dataset.
    fixed = max(0.0, per_rank["first_batch_s"]["max"] - per_rank["first_batch_warm_s"]["max"])
    rows = [
        ("index build, once per dataset (s)", out["build_s"], out["build_s"] * scale,
         None, None, None),
        ("freshness check per rank: list + stat (s, max)", per_rank["check_s"]["max"],
         per_rank["check_s"]["max"] * scale, solo["check_s"], solo["check_s"] * scale, None),
        ("index read per rank (s, max)", per_rank["read_s"]["max"],
         synth["read_s"]["max"] * scale_synthetic, solo["read_s"], None,
         synth["read_s"]["max"]),
        ("epoch order + shard per rank (s, max)", None, None, None, None,
         synth["order_shard_s"]["max"]),
        ("start-up to first batch, warm index (s, max)", per_rank["first_batch_s"]["max"],
         fixed + per_rank["first_batch_warm_s"]["max"] * scale, solo["first_batch_s"],
         solo_fixed + solo["first_batch_warm_s"] * scale, None),
        ("  of which fixed: compiles, imports excluded (s)", fixed, fixed, solo_fixed,
         solo_fixed, None),
        ("index memory per rank, RSS (MB, max)", per_rank["index_rss_mb"]["max"],
         synth["index_rss_mb"]["max"] * scale_synthetic, solo["index_rss_mb"], None,
         synth["index_rss_mb"]["max"]),
        ("index memory per rank, PSS (MB, max)", per_rank["index_pss_mb"]["max"],
         synth["index_pss_mb"]["max"] * scale_synthetic, solo["index_pss_mb"], None,
         synth["index_pss_mb"]["max"]),
        ("process RSS per rank after the first batch (MB, max)",
         per_rank["process_rss_mb"]["max"], None, solo["process_rss_mb"], None, None),
        ("index file size (MB)", out["index_bytes"] / 2 ** 20,
         out["index_bytes"] / 2 ** 20 * scale, None, None,
         out["synthetic_index_bytes"] / 2 ** 20),
    ]
    columns = ("metric", "measured", "extrapolated", "measured_1_rank", "extrapolated_1_rank",
               "synthetic")
    out["table"] = [dict(zip(columns, r)) for r in rows]

    def cell(v):
        return "-" if v is None else f"{v:.2f}" if v < 100 else f"{v:.0f}"

    print(f"\n{args.ranks} ranks on {out['cpus']} cores; folder of {args.images} files, "
          f"synthetic index of {args.entries} entries; load average before: "
          f"{out['load_before']}\n")
    print(f"| metric | {args.images} files, {args.ranks} ranks | extrapolated to {args.target} "
          f"| {args.images} files, 1 rank | extrapolated, 1 rank | synthetic {args.entries}, "
          f"{args.ranks} ranks |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, *values in rows:
        print(f"| {name} | " + " | ".join(cell(v) for v in values) + " |")
    args.json.write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwrote {args.json}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of the fastneg data path against the pipeline users of the published code run.

    python benchmarks/throughput.py          # all loaders x negatives, ~3 min on 2 CPU cores
    python benchmarks/throughput.py --loaders torch --negatives patch --json out.json --plot out.png

One row = one (loader, negatives) pair, measured in a fresh child process (so peak RSS is the
row's own, a crashing or hanging backend cannot take the others down, and FFCV/DALI state never
leaks between rows). A row produces *finished training batches*, made by the trainer's own
step (fastneg.step.make_views_and_negatives): the loader's two uint8 crops, MoCo-v2 aug-plus on
both, and the negatives, all on the device and ready for the model:

    none      q, k
    patch     q, k, patch NS of the augmented query
    texture   q, k, texture NS: the image's texture, decoded by the loader from a JPEG texture
              bank with the images (Batch.textures) + the query's augmentation draws

Per row: img/s (source images per second) and batches/s over `--batches` batches after
`--warmup` batches (pipeline build, JIT compiles and the warm-up batches are timed apart, as
warmup_s); CPU-seconds per 1,000 images (user + system time of the child's whole live process
tree, worker processes included, over the measured batches); peak RSS (the largest sum of RSS
over that tree, sampled every 50 ms: pages shared by forked workers count once per process) and
the tree's PSS at the end of the measured batches (shared pages split between processes, so
the fair figure when comparing multi-process loaders with in-process ones).

The baseline, loader "published" (fastneg.benchmarking.published), is measured in the same run
for every requested negatives kind, and every row reports img/s as a ratio to the baseline row
with the same negatives.

Texture bank: fastneg's rows use a JPEG texture bank in the format `fastneg build-bank` writes
(one texture per image, fetched and decoded by the loader itself: build_loader(...,
texture_bank=BANK), and for FFCV a .beton converted with the texture field, as at ImageNet
scale); its textures are the images resized to the training size, JPEG q90 (the cost of reading,
decoding and augmenting texture NS does not depend on what the pixels show; quilting them would
take minutes). The bank and the FFCV texture .beton are written in a temporary folder each run,
apart from the timed rows. The baseline reads the first TEXTURE_BANK_SIZE of those images as JPEG
files, one per sample, as the published code reads its texture files. (The shared pieces, also
used by the other benchmarks, live in fastneg.benchmarking.)

Also per fastneg loader: "loader img/s", the bare loader's rate (its two uint8 crops, nothing
after; a row of its own, "loader-only", shown as a column) and the finished rate as a fraction of
it; "1st batch s", seconds from the row's process start to its first finished batch; and, for one
negatives kind per loader (patch when requested), the same start-up measured twice in fresh
processes that share an empty Numba cache (NUMBA_CACHE_DIR): "cold" compiles every kernel,
"warm" loads them from that cache, as any second start does. Then, in a process of its own,
patch_negatives into a preallocated output against out.copy_(x) (float32 NCHW and uint8 NHWC,
the batch's shape), once from memory (caches evicted before each call: copy bandwidth) and once
in cache (back-to-back calls; shown, not a goal).
The last line checks the CPU goals: the finished patch-NS rate >= 60% of the loader-only rate and
>= 3x the baseline for at least one loader, texture NS >= 85% of patch NS on the same loader
(the best loader's), patch NS >= 70% of copy bandwidth, a warm start's first batch within 5 s.

Default data: data/photos/train in the checkout, 1,600 ImageNet-sized JPEG q90 crops of
scikit-image's sample photos made once with the equivalent of `fastneg make-data --photos`
(made again when the folder holds another number, e.g. an older default's 640);
`--synthetic` takes the smooth synthetic set instead (data/imagenet-like, `fastneg make-data
--imagenet-like`, cheaper to decode than photos). A loader that cannot run here (a missing
package, no GPU decoder, a failed .beton conversion) is reported as unavailable, with the reason.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from fastneg.benchmarking.common import (ProcessTree, comma_list, hardware, last_line,
                                         non_negative, positive, resolve_device,
                                         row_environment)
from fastneg.benchmarking.data import (BANK_DIR, LOADERS, NEGATIVES, TEXTURE_BETON,
                                       FastnegBatches, default_data, prepare_ffcv,
                                       write_texture_bank)
from fastneg.benchmarking.timing import patch_vs_copy
from fastneg.data.files import available_cpus
from fastneg.host import keep_freed_memory
from fastneg.step import PAPER_SIZE, scaled_patch_range

BASELINE = "published"
DATA_ROOT = Path(__file__).resolve().parents[1] / "data"   # the checkout's data/ (default_data)
# (With 8 measured batches, about half a second per fastneg row, the same row moved by up to
# 40% from one run to the next on a 2-core VM: hence 20, one epoch of the default data.)
LOADER_ONLY = "loader-only"    # internal negatives kind: the bare loader's batches
# The CPU goals the summary line checks.
GOAL_OF_LOADER = 0.6           # finished patch-NS rate / loader-only rate
GOAL_VS_BASELINE = 3.0         # finished patch-NS rate / the published pipeline's
GOAL_OF_COPY = 0.7             # patch_negatives GB/s / out.copy_(x) GB/s
GOAL_WARM_START_S = 5.0        # process start -> first finished batch, kernels cached
GOAL_TEXTURE_OF_PATCH = 0.85   # finished texture-NS rate / finished patch-NS rate, same loader
RECORD_KEYS = ("loader", "negatives", "device", "img_per_s", "cpu_s_per_1k", "peak_rss_mb",
               "ratio_vs_baseline", "first_batch_s")


# ---------------------------------------------------------------- one row (child process)

def measure_row(args) -> dict:
    """Measure one row in this process; the record (status "ok", "unavailable" or "failed")."""
    import torch
    loader, negatives = args.row.split(":")
    device = torch.device(args.device)
    record = _record(loader, negatives, str(device))
    tree = ProcessTree()
    start = time.perf_counter()
    try:
        batches = _build_row(args, loader, negatives, device)
    except (ImportError, RuntimeError) as e:   # the loader contract's "not available here"
        tree.close()
        return {**record, "status": "unavailable", "reason": _reason(e)}
    try:
        it = iter(batches)
        next(it)                                 # the first batch counts as a warm-up batch
        _sync(device)
        first_batch_s = time.time() - tree.root.create_time()
        if args.first_batch_only:
            tree.close()
            return {**record, "status": "ok", "reason": "", "first_batch_s": first_batch_s}
        for _ in range(args.warmup - 1):
            next(it)
        _sync(device)
        warm = time.perf_counter()
        cpu0 = tree.cpu_seconds()
        for _ in range(args.batches):
            next(it)
        _sync(device)
        wall = time.perf_counter() - warm
        cpu = tree.cpu_seconds() - cpu0
    except ImportError as e:
        tree.close()
        return {**record, "status": "unavailable", "reason": _reason(e)}
    pss = tree.pss()
    peak = tree.close()
    images = args.batches * args.batch_size
    return {**record, "status": "ok", "reason": "",
            "img_per_s": images / wall, "batches_per_s": args.batches / wall,
            "cpu_s_per_1k": 1000 * cpu / images, "peak_rss_mb": peak / 2 ** 20,
            "pss_mb": pss / 2 ** 20, "warmup_s": warm - start, "first_batch_s": first_batch_s}


def _build_row(args, loader, negatives, device):
    if loader == BASELINE:
        from fastneg.benchmarking.published import published_batches, published_loader
        textures = (sorted(Path(args.workdir).glob("texture_*.jpg")) if negatives == "texture"
                    else ())
        dl = published_loader(args.data, batch_size=args.batch_size, size=args.size,
                              negatives=negatives, workers=args.baseline_workers, device=device,
                              seed=args.seed, patch_range=scaled_patch_range(args.size),
                              texture_files=textures)
        return published_batches(dl, device)
    if negatives == LOADER_ONLY:
        return _loader_batches(build_loader_for(args, loader, device))
    bank, source = None, args.source or args.data
    if negatives == "texture":
        bank = Path(args.workdir) / BANK_DIR
        if loader == "ffcv":     # the .beton with the texture field (prepare_ffcv)
            source = Path(args.workdir) / TEXTURE_BETON
            if not source.exists():
                raise RuntimeError(f"no texture .beton: {_texture_beton_problem(args.workdir)}")
    return FastnegBatches(loader, source, batch_size=args.batch_size,
                          size=args.size, device=device, workers=args.workers,
                          negatives=negatives, texture_bank=bank, seed=args.seed)


def _texture_beton_problem(workdir) -> str:
    why = Path(workdir) / "texture-beton-error.txt"
    return why.read_text().strip() if why.exists() else "its conversion did not run"


def build_loader_for(args, kind, device):
    from fastneg.loaders import build_loader
    return build_loader(kind, str(args.source or args.data), batch_size=args.batch_size,
                        size=args.size, device=str(device), seed=args.seed, workers=args.workers)


def _loader_batches(loader):
    """Endless bare loader batches (the two uint8 views), epoch after epoch."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch.views
        epoch += 1


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def _record(loader, negatives, device, **fields) -> dict:
    rec = {"loader": loader, "negatives": negatives, "device": device, "img_per_s": None,
           "batches_per_s": None, "cpu_s_per_1k": None, "peak_rss_mb": None,
           "pss_mb": None, "ratio_vs_baseline": None, "warmup_s": None, "first_batch_s": None,
           "loader_img_per_s": None, "of_loader": None, "first_batch_cold_s": None,
           "first_batch_warm_s": None, "status": "failed", "reason": ""}
    rec.update(fields)
    return rec


# ---------------------------------------------------------------- the whole run (parent)

def run_rows(args, rows, device: str, workdir: Path, sources: dict, unavailable: dict) -> list:
    records = []
    for i, (loader, negatives) in enumerate(rows, 1):
        label = f"[{i}/{len(rows)}] {loader}/{negatives}"
        if loader in unavailable:
            rec = _record(loader, negatives, device, status="unavailable",
                          reason=unavailable[loader])
        else:
            rec = _run_child(args, loader, negatives, device, workdir, sources.get(loader))
        records.append(rec)
        shown = (f"{rec['img_per_s']:.1f} img/s (warm-up {rec['warmup_s']:.1f} s, first batch "
                 f"{rec['first_batch_s']:.1f} s)"
                 if rec["status"] == "ok" else f"{rec['status']}: {rec['reason']}")
        print(f"{label}: {shown}", file=sys.stderr, flush=True)
    return records


def _run_child(args, loader, negatives, device, workdir, source, *, numba_cache=None,
               tag="") -> dict:
    """One row in a fresh process; numba_cache: its NUMBA_CACHE_DIR, and only its first batch
    is measured (a start-up probe)."""
    record_path = workdir / f"record-{loader}-{negatives}{tag}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--row", f"{loader}:{negatives}",
           "--data", str(args.data), "--device", device, "--batch-size", str(args.batch_size),
           "--batches", str(args.batches), "--warmup", str(args.warmup), "--size", str(args.size),
           "--seed", str(args.seed), "--baseline-workers", str(args.baseline_workers),
           "--workdir", str(workdir), "--record", str(record_path)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    if source is not None:
        cmd += ["--source", str(source)]
    env = row_environment()
    if numba_cache is not None:
        cmd += ["--first-batch-only"]
        env["NUMBA_CACHE_DIR"] = str(numba_cache)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        return _record(loader, negatives, device,
                       reason=f"timed out after {args.row_timeout:.0f} s (--row-timeout)")
    if done.returncode != 0 or not record_path.exists():
        return _record(loader, negatives, device,
                       reason=f"exit {done.returncode}: {last_line(done.stderr)}")
    return json.loads(record_path.read_text())


def measure_startup(args, loaders, negatives, device, workdir, sources, unavailable) -> dict:
    """{loader: (cold s, warm s)}: process start -> first finished batch, twice, in fresh
    processes sharing an empty Numba cache (NUMBA_CACHE_DIR); the second loads the kernels the
    first compiled. Loaders that are unavailable or fail are left out."""
    times = {}
    for loader in loaders:
        if loader in unavailable:
            continue
        cache = workdir / f"numba-cache-{loader}"
        runs = [_run_child(args, loader, negatives, device, workdir, sources.get(loader),
                           numba_cache=cache, tag=f"-{phase}") for phase in ("cold", "warm")]
        if all(r["status"] == "ok" for r in runs):
            times[loader] = tuple(r["first_batch_s"] for r in runs)
            print(f"start-up {loader}/{negatives}: first batch {times[loader][0]:.1f} s cold, "
                  f"{times[loader][1]:.1f} s warm", file=sys.stderr, flush=True)
    return times


def add_loader_rates(records: list, startup: dict, startup_negatives) -> list:
    """Fold the loader-only rows into the other rows of their loader (columns loader_img_per_s,
    of_loader) and the start-up probes into the probed rows; returns the rows without the
    loader-only ones."""
    bare = {r["loader"]: r["img_per_s"] for r in records
            if r["negatives"] == LOADER_ONLY and r["status"] == "ok"}
    kept = [r for r in records if r["negatives"] != LOADER_ONLY]
    for r in kept:
        if r["loader"] in bare:
            r["loader_img_per_s"] = bare[r["loader"]]
            if r["status"] == "ok":
                r["of_loader"] = r["img_per_s"] / bare[r["loader"]]
        if r["loader"] in startup and r["negatives"] == startup_negatives:
            r["first_batch_cold_s"], r["first_batch_warm_s"] = startup[r["loader"]]
    return kept


def measure_copy(args, device: str, workdir: Path) -> dict | None:
    """patch_vs_copy in a fresh process with the rows' environment (the main process's OpenMP
    threads would spin against Numba's: measured 2x slower patch_negatives), or None when it
    fails (the reason goes to stderr)."""
    record = workdir / "copy.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--copy-probe", str(record),
           "--device", device, "--batch-size", str(args.batch_size), "--size", str(args.size)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout,
                              env=row_environment())
    except subprocess.TimeoutExpired:
        print(f"patch vs copy: timed out after {args.row_timeout:.0f} s", file=sys.stderr)
        return None
    if done.returncode != 0 or not record.exists():
        print(f"patch vs copy: exit {done.returncode}: {last_line(done.stderr)}",
              file=sys.stderr)
        return None
    return json.loads(record.read_text())


def goals_line(records: list, copy: dict | None, startup: dict) -> str:
    """The CPU goals, each PASS/FAIL with the figures behind it ("n/a" when not measured)."""
    patch = [r for r in records if r["negatives"] == "patch" and r["loader"] != BASELINE
             and r["status"] == "ok"]
    both = [r for r in patch if r["of_loader"] is not None and r["ratio_vs_baseline"] is not None]
    parts = []
    if both:
        best = max(both, key=lambda r: min(r["of_loader"] / GOAL_OF_LOADER,
                                           r["ratio_vs_baseline"] / GOAL_VS_BASELINE))
        ok = best["of_loader"] >= GOAL_OF_LOADER and best["ratio_vs_baseline"] >= GOAL_VS_BASELINE
        detail = ", ".join(f"{r['loader']} {r['of_loader']:.0%} {r['ratio_vs_baseline']:.2f}x"
                           for r in both)
        parts.append(f"patch-NS path >= {GOAL_OF_LOADER:.0%} of loader-only and >= "
                     f"{GOAL_VS_BASELINE:g}x published, one loader: {_verdict(ok)} ({detail})")
    else:
        parts.append("patch-NS path vs loader-only and published: n/a (needs --negatives patch "
                     "and a fastneg loader that ran)")
    parts.append(texture_goal(records))
    if copy:
        ok = min(v["memory"] for v in copy.values()) >= GOAL_OF_COPY
        detail = ", ".join(f"{k} {v['memory']:.0%} from memory{_spread(v, 'memory')}, "
                           f"{v['cache']:.0%} in cache" for k, v in copy.items())
        parts.append(f"patch NS >= {GOAL_OF_COPY:.0%} of copy bandwidth: {_verdict(ok)} "
                     f"({detail})")
    else:
        parts.append("patch NS vs copy: n/a")
    if startup:
        ok = max(w for _, w in startup.values()) <= GOAL_WARM_START_S
        detail = ", ".join(f"{k} {c:.1f} s cold / {w:.1f} s warm" for k, (c, w) in startup.items())
        parts.append(f"warm first batch <= {GOAL_WARM_START_S:g} s: {_verdict(ok)} ({detail})")
    else:
        parts.append("warm first batch: n/a")
    return "# goals: " + "; ".join(parts)


def _spread(fractions: dict, key: str) -> str:
    """The text ' (lo-hi over n trials)' when the trials are recorded, else ''."""
    trials = fractions.get(f"{key}_trials") or []
    if len(trials) < 2:
        return ""
    return f" ({min(trials):.0%}-{max(trials):.0%} over {len(trials)} trials)"


def texture_goal(records: list) -> str:
    """The texture goal: finished texture-NS rate >= GOAL_TEXTURE_OF_PATCH of the patch-NS rate
    on the same loader, for the loader where that fraction is highest."""
    rate = {(r["loader"], r["negatives"]): r["img_per_s"] for r in records
            if r["loader"] != BASELINE and r["status"] == "ok"}
    of_patch = {k: rate[k, "texture"] / rate[k, "patch"] for k, n in rate
                if n == "texture" and (k, "patch") in rate}
    name = f"texture NS >= {GOAL_TEXTURE_OF_PATCH:.0%} of patch NS (same loader)"
    if not of_patch:
        return f"{name}: n/a (needs --negatives patch,texture and a fastneg loader that ran both)"
    best = max(of_patch, key=of_patch.get)
    detail = ", ".join(f"{k} {v:.0%}" for k, v in of_patch.items())
    return f"{name}: {_verdict(of_patch[best] >= GOAL_TEXTURE_OF_PATCH)} ({detail})"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def add_ratios(records: list) -> None:
    """ratio_vs_baseline = img/s over the baseline's img/s with the same negatives."""
    base = {r["negatives"]: r["img_per_s"] for r in records
            if r["loader"] == BASELINE and r["status"] == "ok"}
    for r in records:
        if r["status"] == "ok" and base.get(r["negatives"]):
            r["ratio_vs_baseline"] = r["img_per_s"] / base[r["negatives"]]


def format_table(records: list) -> str:
    head = ("loader", "negatives", "device", "img/s", "batch/s", "x baseline", "loader img/s",
            "of loader", "CPU s/1k img", "peak RSS MB", "PSS MB", "warm-up s", "1st batch s",
            "cold s", "warm s", "note")
    rows = []
    for r in records:
        ok = r["status"] == "ok"

        def num(key, fmt):
            return format(r[key], fmt) if ok and r[key] is not None else "-"
        rows.append((r["loader"], r["negatives"], r["device"], num("img_per_s", ".1f"),
                     num("batches_per_s", ".2f"), num("ratio_vs_baseline", ".2f"),
                     num("loader_img_per_s", ".1f"), num("of_loader", ".0%"),
                     num("cpu_s_per_1k", ".1f"), num("peak_rss_mb", ".0f"),
                     num("pss_mb", ".0f"), num("warmup_s", ".1f"), num("first_batch_s", ".1f"),
                     num("first_batch_cold_s", ".1f"), num("first_batch_warm_s", ".1f"),
                     "" if ok else f"{r['status']}: {r['reason']}"))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    numeric = range(3, 15)

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in numeric else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def write_plot(records: list, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    negs = list(dict.fromkeys(r["negatives"] for r in records))
    loaders = list(dict.fromkeys(r["loader"] for r in records))
    width = 0.8 / len(loaders)
    fig, ax = plt.subplots(figsize=(2 + 2.2 * len(negs), 4.5))
    for j, loader in enumerate(loaders):
        for i, neg in enumerate(negs):
            r = next((r for r in records if r["loader"] == loader and r["negatives"] == neg), None)
            if r is None or r["status"] != "ok":
                continue
            x = i + (j - (len(loaders) - 1) / 2) * width
            ax.bar(x, r["img_per_s"], width, color=f"C{j}", label=loader if i == 0 else None)
            if r["ratio_vs_baseline"] is not None:
                ax.annotate(f"{r['ratio_vs_baseline']:.1f}x", (x, r["img_per_s"]),
                            ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(negs)), [f"negatives: {n}" for n in negs])
    ax.set_ylabel("finished training images / s")
    ax.set_title(textwrap.fill(title, 100), fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    by_label = dict(zip(labels, handles))
    ax.legend(by_label.values(), by_label.keys(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Finished training batches per second of every fastneg loader x negatives, "
                    "as a ratio to the published code's data path, measured in the same run.")
    p.add_argument("--data", type=Path, default=None,
                   help="ImageFolder root (default: data/photos/train, photos generated once)")
    p.add_argument("--synthetic", action="store_true",
                   help="without --data: the synthetic ImageNet-like set (data/imagenet-like) "
                        "instead of the photos")
    p.add_argument("--no-goals", action="store_true",
                   help="skip the start-up probes and the copy comparison (and the goals line)")
    p.add_argument("--loaders", type=comma_list(LOADERS), default=list(LOADERS),
                   help=f"comma list of {', '.join(LOADERS)} (default: all)")
    p.add_argument("--negatives", type=comma_list(NEGATIVES), default=list(NEGATIVES),
                   help=f"comma list of {', '.join(NEGATIVES)} (default: all)")
    p.add_argument("--batch-size", type=positive, default=64, help="images per batch (default 64)")
    p.add_argument("--batches", type=positive, default=20,
                   help="measured batches per row (default 20)")
    p.add_argument("--warmup", type=positive, default=2,
                   help="warm-up batches per row, timed apart, the first batch included "
                        "(default 2)")
    p.add_argument("--size", type=positive, default=PAPER_SIZE,
                   help="training resolution (default 224)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--workers", type=non_negative, default=None,
                   help="loader workers/threads (default: each loader's own default; the "
                        "baseline's DataLoader workers default to the usable cores)")
    p.add_argument("--seed", type=non_negative, default=0, help="seed (default 0)")
    p.add_argument("--row-timeout", type=float, default=300.0,
                   help="seconds before a row is given up as failed (default 300)")
    p.add_argument("--json", type=Path, default=None, help="write the records to this JSON file")
    p.add_argument("--plot", type=Path, default=None, help="write a bar chart to this PNG file")
    # Internal: one row in a child process.
    for name in ("--row", "--workdir", "--record", "--source", "--copy-probe"):
        p.add_argument(name, default=None, help=argparse.SUPPRESS)
    p.add_argument("--baseline-workers", type=non_negative, default=None, help=argparse.SUPPRESS)
    p.add_argument("--first-batch-only", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.row or args.copy_probe:
        keep_freed_memory()     # every row alike, the baseline too (fastneg.host; row_environment)
        if args.copy_probe:
            copy = patch_vs_copy(args.batch_size, args.size, resolve_device(args.device))
            Path(args.copy_probe).write_text(json.dumps(copy))
            return 0
        record = measure_row(args)
        Path(args.record).write_text(json.dumps(record))
        return 0
    try:
        device = resolve_device(args.device)
        for out in (args.json, args.plot):
            if out is not None and not out.parent.is_dir():
                raise FileNotFoundError(f"output folder {out.parent} does not exist")
        if args.plot is not None and args.plot.suffix.lower() != ".png":
            raise ValueError(f"--plot must name a .png file, got {args.plot}")
        if args.synthetic and args.data is not None:
            raise ValueError("--synthetic picks the default data: give it or --data, not both")
        if args.data is None:
            args.data = default_data(DATA_ROOT, args.synthetic)
        from fastneg.data.imagefolder import scan_image_folder
        images = len(scan_image_folder(args.data))
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"throughput.py: error: {e}", file=sys.stderr)
        return 2
    args.data = args.data.resolve()
    if args.baseline_workers is None:
        args.baseline_workers = (args.workers if args.workers is not None
                                 else available_cpus())
    rows = ([(BASELINE, n) for n in args.negatives]
            + [(k, n) for k in args.loaders for n in args.negatives])
    title = (f"{images} images in {args.data.name}, batch {args.batch_size}, {args.size} px, "
             f"{args.batches} batches after {args.warmup} warm-up; {device}; {hardware()}; "
             f"OMP_WAIT_POLICY={row_environment()['OMP_WAIT_POLICY']}")
    print(title, file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="fastneg-bench-") as tmp:
        workdir = Path(tmp)
        bank = None
        if "texture" in args.negatives:
            print(f"writing the texture bank ({images} images resized to {args.size} px, JPEG)",
                  file=sys.stderr, flush=True)
            bank = write_texture_bank(args.data, args.size, workdir)
        sources, unavailable = {}, {}
        if "ffcv" in args.loaders:
            try:
                sources["ffcv"] = prepare_ffcv(args.data, args.row_timeout)
            except RuntimeError as e:
                unavailable["ffcv"] = str(e)
        if "ffcv" in args.loaders and "ffcv" not in unavailable and bank is not None:
            try:     # the texture rows' own .beton; its failure only makes them unavailable
                prepare_ffcv(args.data, args.row_timeout, texture_bank=bank,
                             beton=workdir / TEXTURE_BETON)
            except RuntimeError as e:
                (workdir / "texture-beton-error.txt").write_text(str(e))
        rows += [(k, LOADER_ONLY) for k in args.loaders]
        records = run_rows(args, rows, device, workdir, sources, unavailable)
        probe = "patch" if "patch" in args.negatives else args.negatives[0]
        startup, copy = {}, None
        if not args.no_goals:
            startup = measure_startup(args, args.loaders, probe, device, workdir, sources,
                                      unavailable)
            copy = measure_copy(args, device, workdir)
    records = add_loader_rates(records, startup, probe)
    add_ratios(records)
    if args.json is not None:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    if args.plot is not None:
        write_plot(records, args.plot, title)
    print(f"# fastneg throughput, {datetime.date.today().isoformat()}: {title}")
    print(f"# command: python benchmarks/throughput.py {' '.join(argv or sys.argv[1:])}".rstrip())
    print(format_table(records))
    if not args.no_goals:
        print(goals_line(records, copy, startup))
    return 0


if __name__ == "__main__":
    sys.exit(main())

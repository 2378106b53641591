"""The Python stages of benchmarks/gpu_check.sh (run that script; this file holds its parts).

    python benchmarks/gpu_check.py env      --out OUT    # what is installed, is the GPU usable
    python benchmarks/gpu_check.py data     --out DATA   # the train split only, JPEG ~500x375
    python benchmarks/gpu_check.py decode   --data DATA/train --json OUT/decode.json
    python benchmarks/gpu_check.py ceiling  --json OUT/ceiling.json
    python benchmarks/gpu_check.py trainer  --run RUN_DIR --json OUT/trainer.json
    python benchmarks/gpu_check.py summary  --out OUT    # summary.json + the README table
    python benchmarks/gpu_check.py readme   --out OUT    # that table written into README.md

Only the standard library is imported at module level: `env` and `summary` must run in a bare
Python, and every optional package (pytest, tqdm, scipy, matplotlib, psutil, DALI, FFCV, CuPy)
is only ever reported, never required. Each stage writes its JSON when it finishes.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

OPTIONAL = ("pytest", "tqdm", "scipy", "matplotlib", "psutil", "nvidia.dali", "ffcv", "cupy")
REQUIRED = ("torch", "torchvision", "numpy", "numba", "PIL")
IMAGES_PER_CLASS = 192      # 1,920 images: 15 steps of 128 per epoch, ~10 s to make on 16 cores
GOAL_KERNEL_OF_COPY = 0.8   # kernels >= 80% of device-to-device copy bandwidth
GOAL_TRAINER_OF_CEILING = 0.9
NOT_MEASURED = "not measured yet (no GPU lent)"


def _write_json(path, obj) -> None:
    from fastneg.fs import write_text_atomic     # standard library only, like this module
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:      # ImportError, or a broken install failing in any other way
        return False
    return True


# ---------------------------------------------------------------- env

def env(args) -> int:
    """env.json (packages, GPU, driver) and env.sh (HAS_<name>=0/1 lines for the shell)."""
    from fastneg.gpu import nvidia_driver_version
    info = {"python": platform.python_version(), "cpus": len(os.sched_getaffinity(0)),
            "packages": {}, "gpu": False, "gpu_name": None, "driver": nvidia_driver_version(),
            "problems": []}
    for name in REQUIRED + OPTIONAL + ("numba.cuda",):
        info["packages"][name] = _importable(name)
    import torch
    info["torch"], info["torch_cuda"] = torch.__version__, torch.version.cuda
    if torch.cuda.is_available():
        info["gpu"], info["gpu_name"] = True, torch.cuda.get_device_name(0)
    else:
        info["problems"].append(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no "
                                f"usable GPU (NVIDIA driver: {info['driver'] or 'none loaded'})")
    from fastneg.versions import cuda_problems
    too_old = cuda_problems()       # numba-cuda < 0.30.4 fails on any kernel with numba >= 0.66
    info["problems"] += [f"{p} (the kernel stages are skipped)" for p in too_old]
    info["nvvm"] = (not too_old and info["packages"]["numba.cuda"]
                    and _nvvm_compiles(info["problems"]))
    if info["gpu"] and info["packages"]["numba.cuda"]:
        try:
            from numba import cuda
            if not cuda.is_available():
                info["problems"].append("numba.cuda.is_available() is False")
        except Exception as e:   # a broken numba-cuda is reported, the torch stages still run
            info["problems"].append(f"numba.cuda: {type(e).__name__}: {e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "env.json", info)
    flags = {"GPU": info["gpu"], "nvvm": info["nvvm"],
             **{n.replace(".", "_"): ok for n, ok in info["packages"].items()}}
    (out / "env.sh").write_text("".join(f"HAS_{k}={int(v)}\n" for k, v in flags.items()))
    missing = [n for n in OPTIONAL if not info["packages"][n]]
    print(f"python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda']}), "
          f"GPU: {info['gpu_name'] or 'none'}, driver {info['driver'] or 'none'}, "
          f"{info['cpus']} CPUs")
    print(f"optional packages missing (their stages are skipped): {', '.join(missing) or 'none'}")
    for p in info["problems"]:
        print(f"problem: {p}")
    return 0


def _tiny_kernel(x):
    x[0] = 1.0


def _nvvm_compiles(problems: list) -> bool:
    """Compile one tiny kernel to PTX (sm_80; no GPU needed): a missing NVVM shows here, in
    seconds, instead of as a failure of every kernel stage."""
    try:
        from fastneg.kernels.rng import numpy_aliases_for_numba_cuda
        numpy_aliases_for_numba_cuda()          # numpy 2.5 with numba-cuda 0.30.4 needs it
        from numba import cuda, float32
        cuda.compile_ptx(_tiny_kernel, (float32[::1],), cc=(8, 0))
    except Exception as e:      # NvvmSupportError and friends: reported with the fix
        problems.append(
            f"numba-cuda cannot compile a kernel ({type(e).__name__}: {str(e)[:160]}): its "
            "NVVM/libdevice are missing. Install numba-cuda[cu13], or carry a CUDA 13 "
            "toolkit's nvvm/ folder beside the tree and set CUDA_HOME to the folder that "
            "holds it (CUDA_HOME/nvvm/lib64/libnvvm.so); the kernel stages are skipped")
        return False
    return True


# ---------------------------------------------------------------- data

def _make_image(job):
    from PIL import Image

    from fastneg.data.synthetic import image_rng, render
    spec, index, label, path = job
    img = render("train", label, image_rng(spec.seed, "train", index), spec)[0]   # the pixels
    Image.fromarray(img).save(path, format="JPEG", quality=spec.quality)


def data(args) -> int:
    """OUT/train: the imagenet-like train split only (the stages read nothing else)."""
    from concurrent.futures import ProcessPoolExecutor

    from fastneg.fs import staged_dir
    from fastneg.data.synthetic import SHAPES, DatasetSpec
    train = Path(args.out) / "train"
    spec = DatasetSpec(images_per_class=args.images_per_class, imagenet_like=True)
    done = Path(args.out) / "train.complete"          # what was made, once it is whole
    if train.is_dir() and done.exists() and done.read_text() == repr(spec):
        print(f"{train}: already made")
        return 0
    start = time.perf_counter()
    with staged_dir(train) as tmp:
        jobs = []
        for label, shape in enumerate(SHAPES):
            (tmp / shape).mkdir()
            for j in range(spec.images_per_class):
                jobs.append((spec, label * spec.images_per_class + j, label,
                             str(tmp / shape / f"{shape}_{j:05d}.jpg")))
        with ProcessPoolExecutor(len(os.sched_getaffinity(0))) as pool:
            list(pool.map(_make_image, jobs, chunksize=16))
    done.write_text(repr(spec))
    print(f"{train}: {len(jobs)} images in {time.perf_counter() - start:.1f} s")
    return 0


# ---------------------------------------------------------------- decode

def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device) -> str:
    import torch
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def decode(args) -> int:
    """img/s of the torch loader decoding on the GPU (two uint8 views per image); --device cpu
    runs the same code on the CPU (tests).

    Timed over whole epochs after --warmup-epochs: the loader prefetches within an epoch only,
    so each measured epoch starts with nothing decoded ahead. (Timing N batches after a warm-up
    batch counted the batches its workers had prefetched meanwhile: up to ~20% too high.) The
    pipeline's fill at each epoch start is counted, which errs low by about one batch.
    """
    import torch

    from fastneg.loaders import build_loader
    device = torch.device(args.device)
    loader = build_loader("torch", str(args.data), batch_size=args.batch_size, views=2,
                          size=args.size, device=str(device), workers=args.workers, seed=0,
                          drop_last=True, shuffle=True)
    if len(loader) == 0:
        raise SystemExit(f"decode: {args.data} has fewer images than one batch of "
                         f"{args.batch_size}")
    n = 0
    for epoch in range(args.warmup_epochs + args.epochs):
        if epoch == args.warmup_epochs:
            _sync(device)
            start, n = time.perf_counter(), 0
        loader.set_epoch(epoch)
        for batch in loader:
            n += batch.views[0].shape[0]
    _sync(device)
    seconds = time.perf_counter() - start
    result = {"loader": "torch", "device": _device_name(device), "images": n,
              "seconds": seconds, "img_per_s": n / seconds, "workers": args.workers,
              "batch_size": args.batch_size, "epochs": args.epochs}
    _write_json(args.json, result)
    print(f"torch loader, GPU decode: {result['img_per_s']:.0f} img/s ({n} images, "
          f"{args.epochs} epoch(s))")
    return 0


# ---------------------------------------------------------------- ceiling

def ceiling(args) -> int:
    """img/s of the trainer's step on synthetic uint8 views already on the GPU: the trainer's
    own data half (fastneg.step: aug-plus on both views, patch NS) and the MoCo step as
    --preset paper-in100 builds it in one process (resnet50, 224 px, bf16, channels_last,
    K 16384, split BatchNorm over 4 sub-batches). Nothing waits for data: the most a data path
    can reach, so trainer / ceiling measures the data path alone. --device cpu runs the same
    code on the CPU (tests)."""
    import torch

    from fastneg.augment import MoCoV2Augment
    from fastneg.loaders import Batch
    from fastneg.moco import build_model
    from fastneg.step import make_views_and_negatives, scaled_patch_range
    from fastneg.train.loop import train_step
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = build_model(dict(arch=args.arch, dim=128, moco_k=args.queue, moco_m=0.999,
                             moco_t=0.2, alpha=2.0, bn=args.bn, bn_splits=args.bn_splits,
                             seed=0)).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    aug = MoCoV2Augment(dtype=torch.bfloat16)
    n, size = args.batch_size, args.size
    gen = torch.Generator(device=device).manual_seed(0)
    views = tuple(torch.randint(0, 256, (n, size, size, 3), generator=gen, device=device,
                                dtype=torch.uint8) for _ in range(2))
    batch = Batch(views, torch.zeros(n, dtype=torch.long, device=device),
                  torch.arange(n, device=device))

    scaler = torch.amp.GradScaler(device.type, enabled=False)      # bf16: no loss scaling
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step(t):
        views, negatives = make_views_and_negatives(batch, aug=aug, seed=0, step=t,
                                                    patch_range=scaled_patch_range(size))
        train_step(model, opt, scaler, autocast, views, negatives, t)

    for t in range(args.warmup):
        step(t)
    _sync(device)
    start = time.perf_counter()
    for t in range(args.warmup, args.warmup + args.steps):
        step(t)
    _sync(device)
    seconds = time.perf_counter() - start
    result = {"arch": args.arch, "size": size, "batch_size": n, "precision": "bf16",
              "bn": args.bn, "bn_splits": args.bn_splits, "steps": args.steps,
              "img_per_s": args.steps * n / seconds, "device": _device_name(device)}
    _write_json(args.json, result)
    print(f"synthetic-data ceiling: {result['img_per_s']:.0f} img/s ({args.arch}, {size} px, "
          f"batch {n}, bf16, patch NS, {args.bn} BN)")
    return 0


# ---------------------------------------------------------------- trainer

def trainer(args) -> int:
    """trainer.json from the trainer's RUN_DIR/summary.json; the checkpoints are deleted (they
    are ~300 MB and measure nothing)."""
    run = Path(args.run)
    summary = json.loads((run / "summary.json").read_text())
    result = {k: summary.get(k) for k in ("steps", "img_per_s", "data_wait_pct", "final_loss",
                                          "device", "world_size")}
    result["args"] = {k: summary.get("args", {}).get(k) for k in (
        "arch", "size", "batch_size", "precision", "loader", "negatives", "workers")}
    _write_json(args.json, result)
    for ckpt in run.glob("checkpoint*.pt"):
        ckpt.unlink()
    print(f"trainer: {result['img_per_s']} img/s, data wait {result['data_wait_pct']} %")
    return 0


# ---------------------------------------------------------------- summary

def _load(path):
    """A stage's JSON, or None when the stage did not run or was skipped."""
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return None if found.get("status") == "skipped" else found


def _cuda_tests(out: Path):
    import xml.etree.ElementTree as ET
    try:
        suite = ET.parse(out / "cuda_tests.xml").getroot()
    except (OSError, ET.ParseError):
        return None
    suite = suite if suite.tag == "testsuite" else suite[0]
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def report_rows(out: Path) -> list[tuple[str, str, str]]:
    """(measure, value, goal) rows of the README's GPU table from the stages' JSON files;
    a value not measured reads NOT_MEASURED."""
    rows = []
    kernels = _load(out / "kernels.json") or {"rows": []}

    def kernel_row(label, op, input_=None):
        found = [r for r in kernels["rows"] if r["op"] == op
                 and (input_ is None or r["input"] == input_)]
        value = NOT_MEASURED
        if found:
            r = found[0]
            value = (f"{r['of_copy']:.0%} of copy ({r['ms']:.3f} ms vs {r['copy_ms']:.3f} ms; "
                     f"host {r['host_us']:.0f} us/call)")
        rows.append((label, value, f">= {GOAL_KERNEL_OF_COPY:.0%}"))

    kernel_row("patch NS, bf16 NCHW channels_last, out= (vs copy_)", "patch_negatives out=",
               "bfloat16 NCHW channels_last")
    kernel_row("patch NS, uint8 NHWC, out= (vs copy_)", "patch_negatives out=", "uint8 NHWC")
    kernel_row("texture sampling, out= (vs copy_)", "sample_textures out=")
    augment = _load(out / "augment.json")
    value = NOT_MEASURED
    if augment and augment.get("runs"):
        r = augment["runs"][0]
        value = (f"fused {r['fused_ms_per_batch']:.2f} ms, torch ops {r['torch_ms_per_batch']:.2f}"
                 f" ms ({r['speedup_fused_vs_torch']:.1f}x)")
    rows.append(("fused augmentation, 224 px batch of 256", value, "faster than the torch ops"))
    dec = _load(out / "decode.json")
    rows.append(("torch loader, GPU decode", f"{dec['img_per_s']:.0f} img/s" if dec
                 else NOT_MEASURED, "-"))
    ceil, train = _load(out / "ceiling.json"), _load(out / "trainer.json")
    rows.append(("synthetic-data ceiling, resnet50 224 px bf16",
                 f"{ceil['img_per_s']:.0f} img/s" if ceil else NOT_MEASURED, "-"))
    value = NOT_MEASURED
    if train and train.get("img_per_s"):
        value = f"{train['img_per_s']:.0f} img/s, data wait {train['data_wait_pct']:.1f}%"
        if ceil:
            value += f", {train['img_per_s'] / ceil['img_per_s']:.0%} of the ceiling"
    rows.append(("trainer (--loader torch, 4 workers), resnet50 224 px bf16", value,
                 f">= {GOAL_TRAINER_OF_CEILING:.0%} of the ceiling"))
    return rows


def summary(args) -> int:
    """summary.json from stages.tsv and every stage's JSON; with --print, the table."""
    out = Path(args.out)
    try:
        with open(out / "stages.tsv", newline="") as fh:
            stages = list(csv.DictReader(fh, delimiter="\t"))
    except OSError:
        stages = []
    result = {"env": _load(out / "env.json"), "stages": stages, "cuda_tests": _cuda_tests(out),
              "report": [dict(zip(("measure", "value", "goal"), r)) for r in report_rows(out)]}
    for name in ("kernels", "augment", "decode", "ceiling", "trainer"):
        result[name] = _load(out / f"{name}.json")
    _write_json(out / "summary.json", result)
    if args.print:
        print("\n================ gpu_check summary ================")
        env_info = result["env"] or {}
        print(f"GPU: {env_info.get('gpu_name') or 'none'}; torch {env_info.get('torch')} "
              f"(CUDA {env_info.get('torch_cuda')}); driver {env_info.get('driver')}")
        print(f"{'stage':<12}{'status':<9}{'exit':>5}{'s':>6}{'limit':>7}  note")
        for s in stages:
            print(f"{s['stage']:<12}{s['status']:<9}{s['exit']:>5}{s['seconds']:>6}"
                  f"{s['limit']:>7}  {s['note']}")
        if result["cuda_tests"]:
            print("cuda tests: " + ", ".join(f"{k} {v}" for k, v in result["cuda_tests"].items()))
        print("\n| measure | value | goal |\n|---|---|---|")
        for measure, value, goal in report_rows(out):
            print(f"| {measure} | {value} | {goal} |")
        print(f"\nfiles: {out}")
    return 0


README_START, README_END = "<!-- gpu-table:start -->", "<!-- gpu-table:end -->"


def readme_table(out: Path) -> str:
    """The README's GPU block from a finished run's files: the card, the versions, the table."""
    info = _load(out / "env.json") or {}
    lines = [f"Measured by `benchmarks/gpu_check.sh` on {info.get('gpu_name') or 'no GPU'} "
             f"(driver {info.get('driver')}), torch {info.get('torch')} (CUDA "
             f"{info.get('torch_cuda')}), Python {info.get('python')}, {info.get('cpus')} CPUs.",
             "", "| measure | value | goal |", "|---|---|---|"]
    lines += [f"| {m} | {v} | {g} |" for m, v, g in report_rows(out)]
    return "\n".join(lines)


def readme(args) -> int:
    """Write the table of a gpu_check run into the README, between its gpu-table markers."""
    out, path = Path(args.out), Path(args.readme)
    if not (out / "env.json").exists():
        raise SystemExit(f"gpu_check readme: {out} holds no gpu_check run (no env.json)")
    text = path.read_text()
    if text.count(README_START) != 1 or text.count(README_END) != 1:
        raise SystemExit(f"gpu_check readme: {path} needs one {README_START} and one "
                         f"{README_END} line around the GPU table")
    head, rest = text.split(README_START)
    _, tail = rest.split(README_END)
    from fastneg.fs import write_text_atomic
    write_text_atomic(path, head + README_START + "\n" + readme_table(out) + "\n" + README_END
                      + tail)
    print(f"{path}: GPU table from {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("env")
    p.add_argument("--out", required=True)
    p.set_defaults(func=env)
    p = sub.add_parser("data")
    p.add_argument("--out", required=True)
    p.add_argument("--images-per-class", type=int, default=IMAGES_PER_CLASS)
    p.set_defaults(func=data)
    p = sub.add_parser("decode")
    p.add_argument("--data", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="measured epochs")
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cuda")
    p.set_defaults(func=decode)
    p = sub.add_parser("ceiling")
    p.add_argument("--json", required=True)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--queue", type=int, default=16384)
    p.add_argument("--bn", default="split", help="BatchNorm of keys and NS (the one-process "
                   "trainer's default: split)")
    p.add_argument("--bn-splits", type=int, default=4)
    p.add_argument("--device", default="cuda")
    p.set_defaults(func=ceiling)
    p = sub.add_parser("trainer")
    p.add_argument("--run", required=True)
    p.add_argument("--json", required=True)
    p.set_defaults(func=trainer)
    p = sub.add_parser("summary")
    p.add_argument("--out", required=True)
    p.add_argument("--print", action="store_true")
    p.set_defaults(func=summary)
    p = sub.add_parser("readme", help="write a run's GPU table into the README")
    p.add_argument("--out", required=True, help="the OUTDIR of a gpu_check.sh run")
    p.add_argument("--readme", default="README.md")
    p.set_defaults(func=readme)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

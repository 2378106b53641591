"""The trainer's settings: flags, defaults, presets, and what --resume carries over.

Lowest priority first: base defaults, then per-device defaults, then a preset, then the
checkpoint's args on --resume, then flags given on the command line (resolve_args).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import fastneg.train
from fastneg import rundir
from fastneg.gpu import refuse_cpu_fallback
from fastneg.loaders import KINDS
from fastneg.moco import ARCHS, BN_MODES
from fastneg.step import NEGATIVES, scaled_patch_range

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

DEFAULTS = dict(loader="dali", negatives="patch", alpha=2.0, patch_range=None, texture_bank=None,
                cifar_stem=False, crop_scale=[0.2, 1.0], lr=0.06, wd=1e-4, epochs=30,
                warmup_epochs=1, moco_k=1024,
                moco_m=0.99, moco_t=0.2, dim=128, mlp_hidden=2048, bn=None, bn_splits=4,
                channels_last=True, seed=0, save_every=10, log_every=10, workers=None,
                compile=False, max_steps=None, eval=False, skip_bad=False)
DEVICE_DEFAULTS = {
    "cpu": dict(arch="resnet10s", size=64, batch_size=128, precision="fp32"),
    "cuda": dict(arch="resnet18", size=96, batch_size=256, precision="bf16"),
}
PRESETS = {
    "paper-in100": dict(arch="resnet50", size=224, batch_size=128, lr=0.06, epochs=200,
                        warmup_epochs=0, moco_k=16384, moco_m=0.999, moco_t=0.2, dim=128,
                        alpha=2.0, negatives="patch", patch_range=[16, 72], precision="bf16",
                        save_every=10),
    "paper-in100-b512": dict(arch="resnet50", size=224, batch_size=512, lr=0.4, epochs=200,
                             warmup_epochs=0, moco_k=16384, moco_m=0.99, moco_t=0.2, dim=128,
                             alpha=2.0, negatives="patch", patch_range=[16, 72],
                             precision="bf16", save_every=10),
}
QUEUE_FRACTION = 0.25   # warn above this queue size / dataset size (loop.warn_if_queue_too_large)
# On --resume, every setting comes from the checkpoint except NOT_CARRIED; flags given again
# must match it, except RUN_CONTROL (changing --epochs reshapes the cosine from there on).
NOT_CARRIED = {"out", "resume", "device", "max_steps"}
RUN_CONTROL = NOT_CARRIED | {"epochs", "log_every", "save_every", "workers", "compile", "eval",
                             "skip_bad"}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="MoCo-v2 with non-semantic negatives (see below for the data layout, "
                    "presets and multi-GPU / multi-node use).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=fastneg.train.__doc__)

    def add_flag(flag, help, **kw):
        """A flag whose help ends with its default; every default is None here and filled in
        by resolve_args, so that the flags given on the command line are known."""
        name = flag[2:].replace("-", "_")
        if name in DEFAULTS and DEFAULTS[name] is not None:
            value = DEFAULTS[name]
            shown = ("on" if value else "off") if isinstance(value, bool) else value
            help += f" (default {shown})"
        elif name in DEVICE_DEFAULTS["cpu"]:
            help += (f" (default {DEVICE_DEFAULTS['cpu'][name]} on CPU, "
                     f"{DEVICE_DEFAULTS['cuda'][name]} on GPU)")
        p.add_argument(flag, help=help, **kw)

    add_flag("--preset", "a named set of settings (see below)", choices=sorted(PRESETS))
    add_flag("--data", "dataset ROOT holding ROOT/train, or tar shards in the WebDataset layout "
             "(a folder of *.tar, a pattern such as 'train-{0000..0146}.tar', a URL or "
             "'pipe:CMD'; dali and torch loaders) (default: the embedded dataset)")
    add_flag("--loader", "data loader backend", choices=KINDS)
    add_flag("--workers", "loader worker threads or processes (default: the loader's choice)",
             type=int)
    add_flag("--skip-bad", "train without the files no decoder can read instead of stopping; "
             "one that fails mid-run is replaced by another image of the same shard, so "
             "batches keep their size", action=argparse.BooleanOptionalAction)
    add_flag("--negatives", "non-semantic negatives", choices=NEGATIVES)
    add_flag("--alpha", "NS logit scale, inside the exponent", type=float)
    add_flag("--patch-range", "patch side range in pixels, both ends included (default: 16..72 "
             "scaled from 224 px to --size)", type=int, nargs=2, metavar=("LO", "HI"))
    add_flag("--texture-bank", "texture bank folder, needed by --negatives texture|both (made with "
             "`fastneg build-bank`)")
    add_flag("--arch", "backbone", choices=ARCHS)
    add_flag("--cifar-stem", "3x3 stride-1 stem without max-pool, for images of about 32 px",
             action=argparse.BooleanOptionalAction)
    add_flag("--size", "training resolution in pixels", type=int)
    add_flag("--crop-scale", "area range of the random resized crops, as fractions of the image; "
             "a milder range such as 0.4 1 keeps small shapes whole", type=float, nargs=2,
             metavar=("LO", "HI"))
    add_flag("--batch-size", "global batch, split over the processes", type=int)
    add_flag("--lr", "learning rate per 256 images; the optimizer uses lr * batch-size / 256",
             type=float)
    add_flag("--wd", "weight decay", type=float)
    add_flag("--epochs", "epochs (sets the length of the cosine schedule)", type=int)
    add_flag("--warmup-epochs", "linear warmup before the cosine, in epochs", type=float)
    add_flag("--moco-k", "queue size, a multiple of the global batch", type=int)
    add_flag("--moco-m", "key encoder momentum", type=float)
    add_flag("--moco-t", "softmax temperature", type=float)
    add_flag("--dim", "feature dimension", type=int)
    add_flag("--mlp-hidden", "hidden width of the MLP head", type=int)
    add_flag("--bn", "BatchNorm treatment of keys and NS: split (one process: BatchNorm over "
             "--bn-splits sub-batches, keys shuffled across them), shuffle (across processes) or "
             "sync (default split in one process, shuffle in several)", choices=BN_MODES)
    add_flag("--bn-splits", "sub-batches of --bn split", type=int)
    add_flag("--device", "device (default: cuda when available)", choices=("cpu", "cuda"))
    add_flag("--precision", "autocast dtype", choices=sorted(PRECISIONS))
    add_flag("--channels-last", "channels_last memory for images and model",
             action=argparse.BooleanOptionalAction)
    add_flag("--compile", "torch.compile the encoders", action=argparse.BooleanOptionalAction)
    add_flag("--seed", "seed of every random draw", type=int)
    add_flag("--out", "run directory (default runs/moco-<date>-<time>)")
    add_flag("--resume", "continue the run in RUN_DIR (or from a .pt file)", metavar="RUN_DIR")
    add_flag("--max-steps", "stop after this many steps in all (smoke runs); the schedule still "
             "follows --epochs", type=int)
    add_flag("--save-every", "epochs between checkpoint_epochNNN.pt files", type=int)
    add_flag("--log-every", "steps between log lines", type=int)
    add_flag("--eval", "at the end, run `fastneg eval` on the final checkpoint (rank 0)",
             action=argparse.BooleanOptionalAction)
    return p


def resolve_args(parser, argv=None):
    """(args, checkpoint or None): flags > checkpoint args > preset > device > base defaults."""
    args = parser.parse_args(argv)
    explicit = {k: v for k, v in vars(args).items() if v is not None}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    refuse_cpu_fallback(args.device, args.preset)   # ValueError: meant for a GPU, none usable
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    ckpt = None
    resumed = {}
    if args.resume:
        path = Path(args.resume)
        ckpt_file, ckpt, note = rundir.resume_checkpoint(path)   # or an epoch checkpoint
        if note:
            rundir.note(note)
        ckpt["file"] = str(ckpt_file)   # in memory only: error messages name it
        saved = ckpt["args"]
        if args.device is None and saved.get("device") == "cuda" and device != "cuda":
            # the GPU run being resumed is not continued on the CPU by accident either
            raise ValueError(f"--resume {path}: that run trained on cuda"
                             + (f" (--preset {saved['preset']})" if saved.get("preset") else "")
                             + " and torch sees no usable GPU here; pass --device cpu to "
                             "continue it on the CPU")
        resumed = {k: v for k, v in saved.items() if k not in NOT_CARRIED}
        changed = [k for k in explicit if k in resumed and k not in RUN_CONTROL
                   and as_saved(explicit[k]) != resumed[k]]
        if changed:
            parser.error(f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} "
                         f"differ(s) from the run being resumed; drop them to continue it")
    preset = PRESETS[args.preset] if args.preset else {}   # on --resume, `resumed` has it all
    merged = {**DEFAULTS, **DEVICE_DEFAULTS[device], **preset, **resumed, **explicit,
              "device": device}
    args = argparse.Namespace(**{**vars(args), **merged})
    if args.bn is None:
        args.bn = "split" if int(os.environ.get("WORLD_SIZE", 1)) == 1 else "shuffle"
    if args.patch_range is None:
        args.patch_range = scaled_patch_range(args.size)
    args.patch_range = list(args.patch_range)
    if args.resume and not args.out:
        path = Path(args.resume)
        args.out = str(path if path.is_dir() else path.parent)
    if not args.out:
        args.out = time.strftime("runs/moco-%Y%m%d-%H%M%S")
    return args, ckpt


def as_saved(value):
    """A setting as the checkpoint's args hold it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


def check_args(parser, args, world):
    # first: the checks below divide by these
    for name in ("epochs", "size", "batch_size", "log_every", "save_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.negatives in ("texture", "both") and not args.texture_bank:
        parser.error(f"--negatives {args.negatives} needs --texture-bank PATH "
                     "(build one with `fastneg build-bank`)")
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} is not divisible by the world size {world}")
    if args.moco_k % args.batch_size:
        parser.error(f"--moco-k {args.moco_k} is not divisible by the global batch "
                     f"--batch-size {args.batch_size}")
    lo, hi = args.patch_range
    if not 1 <= lo <= hi < args.size:
        parser.error(f"--patch-range {lo} {hi}: need 1 <= LO <= HI < --size {args.size}")
    if args.bn == "sync" and args.device == "cpu" and world > 1:
        parser.error("--bn sync needs GPUs (torch's SyncBatchNorm has no CPU implementation); "
                     "use --bn shuffle")
    if args.bn_splits < 1:
        parser.error(f"--bn-splits must be >= 1, got {args.bn_splits}")
    if args.bn == "split" and (world > 1 or (args.batch_size // world) % args.bn_splits):
        parser.error(f"--bn split needs one process and a batch divisible by --bn-splits "
                     f"{args.bn_splits} (got {world} processes, batch {args.batch_size}); "
                     "use --bn shuffle across processes")
    if args.warmup_epochs < 0 or args.lr <= 0:
        parser.error(f"need --warmup-epochs >= 0 and --lr > 0, got {args.warmup_epochs} and "
                     f"{args.lr}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps}")

"""Train MoCo-v2 with non-semantic negatives (fastneg's lean DDP trainer).

    python train/moco.py                                   # one process, embedded data
    torchrun --standalone --nproc_per_node=1 train/moco.py --loader dali      # = make train
    torchrun --standalone --nproc_per_node=8 train/moco.py --preset paper-in100 --data IN100
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 train/moco.py --preset paper-in100 --data IN100   # per node

Data: --data ROOT follows MoCo's convention, ROOT/train is an ImageFolder (class/image.jpg);
for --loader ffcv the trainer reads ROOT/train.beton and makes it on first use with
`fastneg convert`. Without --data: the embedded shapes dataset, generated on first use.
Multi-node runs need --data on a shared or per-node copy. --data may also name tar shards in the
WebDataset layout (`fastneg convert --to wds`, or your own: a folder, 'train-{0000..0146}.tar',
a URL or 'pipe:curl -s URL'), read by --loader dali and torch; each rank reads its own shards.

Processes: one per GPU (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; init is env://, NCCL on
GPUs, gloo on CPUs); plain `python train/moco.py` runs one process. --batch-size is the global
batch, split evenly over the processes. BatchNorm for keys and NS: --bn shuffle (MoCo's
shuffle-BN across ranks; a no-op in one process) or --bn sync (SyncBatchNorm, GPUs only).

Step: loader (two random-resized crops, uint8) -> aug-plus on the device (two views) -> patch
NS from the augmented query and/or texture NS (the image's own texture from --texture-bank,
given the query's augmentation draws) -> loss (docs/method.md; alpha inside the exponent) -> SGD
(momentum 0.9, weight decay --wd) with linear warmup and a cosine schedule, per step.

Learning rate: --lr is the rate for a global batch of 256; the optimizer uses
lr * batch_size / 256 (linear scaling, Goyal et al. 2017).

Defaults: without a GPU they fit the embedded dataset on 2 CPU cores in a few minutes
(resnet10s at 64 px, batch 128, K 1024, m 0.99, fp32); with a GPU: resnet18 at 96 px, batch
256, bf16. Presets (explicit flags still win):
  paper-in100       Ge et al. 2021 on ImageNet-100: resnet50, 224 px, batch 128, actual lr 0.03
                    (--lr 0.06), 200 epochs, no warmup, K 16384, m 0.999, T 0.2, alpha 2,
                    patch NS 16..72 px, bf16. Needs --data.
  paper-in100-b512  the same with batch 512, actual lr 0.8 (--lr 0.4), m 0.99.

Outputs in --out RUN_DIR (default runs/moco-<date>-<time>): checkpoint.pt (latest) and
checkpoint_epochNNN.pt (every --save-every epochs), written atomically; log.csv (and TensorBoard
events when tensorboard is installed); batch.png (a batch's views and negatives, as the model
sees them before normalisation); summary.json (img/s, data-wait %, final loss, and with --eval
the linear-probe and out-of-domain results). --resume RUN_DIR continues a run: every random
draw is a function of (--seed, step), so a resumed run ends with the same weights as an
uninterrupted one (bit for bit on CPU in fp32 with the same process count).
"""
from __future__ import annotations

import argparse
import csv
import functools
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

# Idle OpenMP threads sleep instead of spinning: on a CPU the loader's threads share the cores
# with torch's. Set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The NS kernels' per-sample draw launches are a few blocks by design (one thread per sample);
# Numba would warn about their grid size on every GPU run. Read when numba.cuda loads.
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
import numba  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from fastneg.augment import IMAGENET_MEAN, IMAGENET_STD, MoCoV2Augment  # noqa: E402
from fastneg.data.files import available_cpus  # noqa: E402
from fastneg.data.shards import looks_like_shards  # noqa: E402
from fastneg.data.synthetic import ensure_dataset  # noqa: E402
from fastneg.gpu import refuse_cpu_fallback  # noqa: E402
from fastneg.host import keep_freed_memory  # noqa: E402
from fastneg.loaders import KINDS, build_loader  # noqa: E402
from fastneg.loaders.common import describe_skipped  # noqa: E402
from fastneg import fs, rundir  # noqa: E402
from fastneg.moco import ARCHS, BN_MODES, build_model  # noqa: E402
from fastneg.progress import tqdm  # noqa: E402
from fastneg.step import NEGATIVES, make_views_and_negatives, scaled_patch_range  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOG_COLUMNS = ["step", "epoch", "loss", "lr", "img_per_s", "data_wait_pct", "elapsed_s"]

# Lowest priority first: base defaults, then per-device defaults, then a preset, then the
# checkpoint's args on --resume, then flags given on the command line.
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
QUEUE_FRACTION = 0.25   # warn above this queue size / dataset size (see main)
# On --resume, every setting comes from the checkpoint except NOT_CARRIED; flags given again
# must match it, except RUN_CONTROL (changing --epochs reshapes the cosine from there on).
NOT_CARRIED = {"out", "resume", "device", "max_steps"}
RUN_CONTROL = NOT_CARRIED | {"epochs", "log_every", "save_every", "workers", "compile", "eval",
                             "skip_bad"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="MoCo-v2 with non-semantic negatives (see below for the data layout, "
                    "presets and multi-GPU / multi-node use).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)

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
    for name in ("epochs", "size", "batch_size", "log_every", "save_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup_epochs < 0 or args.lr <= 0:
        parser.error(f"need --warmup-epochs >= 0 and --lr > 0, got {args.warmup_epochs} and "
                     f"{args.lr}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps}")


def learning_rate(args, step, steps_per_epoch):
    """Linear warmup, then half a cosine to 0, per step; --lr scaled by batch / 256."""
    peak = args.lr * args.batch_size / 256
    warmup = args.warmup_epochs * steps_per_epoch
    total = args.epochs * steps_per_epoch
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---------------------------------------------------------------- set-up

class Processes(NamedTuple):
    """This process's place among the training processes (torchrun's environment)."""
    world: int          # processes in all
    rank: int
    local_rank: int     # rank on this node: picks the GPU
    local_world: int    # processes on this node
    device: torch.device
    distributed: bool   # started by torchrun: a process group exists

    @property
    def main(self) -> bool:
        """Rank 0 writes the run directory and prints."""
        return self.rank == 0


def setup_processes(parser, args) -> Processes:
    """Read torchrun's environment, check the flags against it, pick the device, and join the
    process group (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    check_args(parser, args, world)
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True     # fixed shapes: pick the fastest kernels once
    else:
        device = torch.device("cpu")
        # Share the cores among this node's processes (torchrun would leave each just one),
        # torch's threads and the Numba kernels' (aug-plus, negatives) alike.
        threads = max(1, available_cpus() // local_world)
        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        keep_freed_memory()     # a step's 38 MB arrays reuse the last step's pages (fastneg.host)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                **({"device_id": device} if device.type == "cuda" else {}))
    return Processes(world=world, rank=int(os.environ.get("RANK", 0)), local_rank=local_rank,
                     local_world=local_world, device=device, distributed=distributed)


# ---------------------------------------------------------------- data

def dataset_root(args, procs: Processes) -> Path | str:
    """--data, or the embedded dataset (generated once, by local rank 0); tar shards (a
    folder of *.tar, a brace pattern, a URL: fastneg.data.shards) as given, a str."""
    if args.data is not None and looks_like_shards(args.data):
        if args.eval:
            raise ValueError(f"--eval evaluates on ROOT/val of a dataset folder; --data "
                             f"{args.data} names tar shards: run `fastneg eval` afterwards")
        return args.data
    if args.data is None:
        root = ensure_dataset() if procs.local_rank == 0 else None
        if procs.distributed:
            dist.barrier()
        root = root or ensure_dataset()
    else:
        root = Path(args.data)
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"--data {root}: training folder {root / 'train'} not found "
                                "(expected ROOT/train/<class>/<image>)")
    return root


def run_textures(args):
    """The texture NS source of --texture-bank for --negatives texture|both (None otherwise):
    fastneg.texture.source decides from the bank's storage whether the loader fetches the
    textures with the batches or the step crops them from a bank held whole."""
    if args.negatives not in ("texture", "both"):
        return None
    from fastneg.texture.source import texture_source
    return texture_source(args.texture_bank)


def loader_source(args, procs: Processes, root: Path, textures) -> Path:
    """What the loader reads: ROOT/train, or for FFCV ROOT/train.beton (converted once;
    ROOT/train.textures.beton with the textures of a bank the loader fetches); shards as
    given."""
    if isinstance(root, str):
        if args.loader == "ffcv":
            raise ValueError(f"--data {root} names tar shards, which --loader dali and --loader "
                             "torch read; --loader ffcv reads a dataset folder")
        return root
    if args.loader != "ffcv":
        return root / "train"
    bank = textures and textures.loader_bank
    beton = root / ("train.textures.beton" if bank else "train.beton")
    if procs.local_rank == 0 and not beton.exists():
        # In a subprocess: an FFCV writer after a loader in one process can deadlock (Numba).
        print(f"converting {root / 'train'} to {beton} (once)", flush=True)
        from fastneg.data.convert import convert_to_beton
        convert_to_beton(root / "train", beton, texture_bank=bank)   # errors: ValueError
    if procs.distributed:
        dist.barrier()
    return beton


def build_training_loader(args, procs: Processes, source: Path, textures):
    """This rank's loader: two random-resized crops per image, its share of the global batch."""
    return build_loader(args.loader, str(source), batch_size=args.batch_size // procs.world,
                        views=2, size=args.size, scale=tuple(args.crop_scale),
                        device=str(procs.device), rank=procs.rank, world_size=procs.world,
                        seed=args.seed, workers=args.workers, drop_last=True, shuffle=True,
                        texture_bank=textures and textures.loader_bank, skip_bad=args.skip_bad,
                        report_skipped=False)   # reported per epoch for all ranks: train()


def warn_if_queue_too_large(args, images_per_epoch: int) -> None:
    # With K = r * images, an image's own key from the previous epoch is still in the queue
    # (a false negative) for about r^2 / 2 of the queries; at r = 0.8 the loss climbs and the
    # features stop improving (measured on the embedded dataset).
    if args.moco_k > QUEUE_FRACTION * images_per_epoch:
        print(f"warning: --moco-k {args.moco_k} is over {QUEUE_FRACTION:.0%} of the "
              f"{images_per_epoch} training images per epoch; keys of the same images from the "
              "previous epoch will act as negatives. Use a smaller --moco-k.", file=sys.stderr,
              flush=True)


def step_inputs(args, procs: Processes, root: Path, textures):
    """make_views_and_negatives with this run's settings bound: call it with (batch, step=...).
    `textures` (run_textures) is made ready on the device here (a bank held whole is loaded)."""
    amp_dtype = PRECISIONS[args.precision]
    on_gpu = procs.device.type == "cuda"
    aug = MoCoV2Augment(dtype=amp_dtype if on_gpu and amp_dtype else torch.float32)
    if textures is not None:
        expect = None if isinstance(root, str) else str(root / "train")   # str: shards
        textures.prepare(procs.device, expect=expect)
    return functools.partial(make_views_and_negatives, aug=aug, seed=args.seed,
                             rank=procs.rank, world_size=procs.world, negatives=args.negatives,
                             patch_range=args.patch_range, textures=textures)


def timed_batches(loader, epoch: int, skip: int):
    """(batch, data-wait seconds) for `epoch`, after its first `skip` batches (a run resumed
    mid-epoch: the loader's order is a function of the epoch). The epoch's start-up counts as
    data wait of its first batch."""
    start = time.perf_counter()
    loader.set_epoch(epoch)
    batches = iter(loader)
    for _ in range(skip):
        next(batches)
    while True:
        batch = next(batches, None)
        if batch is None:
            return
        yield batch, time.perf_counter() - start
        start = time.perf_counter()


# ---------------------------------------------------------------- model

def build_training_model(args, procs: Processes, ckpt):
    """(model, train_model, optimizer, scaler, step): the MoCo model (restored from `ckpt` on
    --resume), train_model (the model wrapped in DistributedDataParallel when several processes
    train, else the model itself), SGD on the query encoder, the fp16 GradScaler and the step
    to start from."""
    device, world = procs.device, procs.world
    torch.manual_seed(args.seed)   # initial weights (the only use of torch's global RNG)
    model = build_model(vars(args)).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=args.lr, momentum=0.9,
                                weight_decay=args.wd)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    step = 0
    if ckpt is not None:
        step = rundir.restore(model, optimizer, scaler, ckpt, ckpt["file"])
        if ckpt.get("world_size", world) != world:
            raise ValueError(f"--resume: the run used {ckpt['world_size']} processes, this one "
                             f"{world}; the per-rank draws would differ")
    if args.compile:
        model.encoder_q.compile()
        model.encoder_k.compile()
    train_model = model
    if world > 1:
        # broadcast_buffers=False: the queue is identical on every rank by construction (all
        # ranks enqueue the gathered keys); re-sending it from rank 0 every step would cost
        # K * dim floats.
        train_model = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None,
            broadcast_buffers=False)
    return model, train_model, optimizer, scaler, step


def train_step(train_model, optimizer, scaler, autocast, views, negatives, step: int):
    """One optimizer step on one batch's views and negatives; returns the loss, left on the
    device. No host sync in bf16 or fp32; in fp16 the GradScaler reads its inf check once
    (tests/test_gpu_syncs.py counts them)."""
    with autocast:
        loss, _ = train_model(views[0], views[1], ns=negatives, step=step)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------- outputs

def training_state(model, optimizer, scaler, step, *, args, world, steps_per_epoch) -> dict:
    """What a checkpoint holds: enough to resume at `step` and to evaluate the encoder."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "epoch": step // steps_per_epoch, "seed": args.seed, "world_size": world,
             "args": {k: as_saved(v) for k, v in vars(args).items()}}
    if scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    return state


def save_checkpoint(state, step, *, out: Path, steps_per_epoch: int, save_every: int) -> None:
    """RUN_DIR/checkpoint.pt, plus checkpoint_epochNNN.pt when `step` ends every
    `save_every`-th epoch."""
    epochs_done, mid_epoch = divmod(step, steps_per_epoch)
    if not mid_epoch and epochs_done % save_every == 0:
        write_checkpoint(state, out / f"checkpoint_epoch{epochs_done:03d}.pt")
    write_checkpoint(state, out / "checkpoint.pt")


def write_checkpoint(state, path: Path) -> None:
    """torch.save to `path` atomically: a crash never leaves a half checkpoint, a failed write
    leaves no temporary file, and a full disk is one clear line."""
    rundir.save_atomic(state, path)


def save_grid(rows, path: Path, n=8):
    """PNG of the first n samples, one row per kind of image, un-normalized to uint8."""
    from PIL import Image
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    tiles = []
    for x in rows:
        x = x[:n].detach().float().cpu() * std + mean
        tiles.append(torch.cat(list(x.clamp(0, 1).mul(255).round().to(torch.uint8)), 2))
    grid = torch.cat(tiles, 1).permute(1, 2, 0).contiguous().numpy()
    Image.fromarray(grid).save(path)


def open_csv_log(out: Path):
    """(file, csv writer) appending to RUN_DIR/log.csv, with the header when the file is new."""
    path = out / "log.csv"
    new = not path.exists()
    file = open(path, "a", newline="")
    writer = csv.writer(file)
    if new:
        writer.writerow(LOG_COLUMNS)
    return file, writer


class RunLog:
    """The run's progress: every --log-every steps the mean loss (checked to be finite, on
    every rank), img/s and data-wait % over the window, written by rank 0 to log.csv, the
    TensorBoard events (when tensorboard is installed) and the progress bar; and the run's
    img/s and data-wait % over all its steps but the first (which carries JIT and loader
    start-up), for summary.json."""

    def __init__(self, out: Path, *, main: bool, device, batch_size: int, log_every: int,
                 total_steps: int, start_step: int, resumed: bool = False):
        self.batch_size, self.log_every, self.total_steps = batch_size, log_every, total_steps
        self.csv_file = self.csv = self.tensorboard = None
        if main:
            if resumed:   # rows after the checkpoint are redone: cut them
                rundir.cut_log(out / "log.csv", start_step)
            self.csv_file, self.csv = open_csv_log(out)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(
                    str(out), purge_step=start_step + 1 if resumed else None)
            except ImportError:
                pass
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not main, unit="step",
                        dynamic_ncols=True)
        self.loss_sum = torch.zeros((), device=device)   # summed on the device: no sync per step
        self.final_loss = float("nan")
        self.run_start = self.window_start = self.last_step_end = time.perf_counter()
        self.window_steps, self.window_wait = 0, 0.0
        self.run_steps, self.timed_wait, self.timed_time = 0, 0.0, 0.0

    def step_done(self, step: int, epoch: int, loss, data_wait: float, lr: float) -> None:
        """Count a finished step (`step` is the number of steps done); log at the window end."""
        self.loss_sum += loss.detach()
        self.run_steps += 1
        self.window_steps += 1
        self.window_wait += data_wait
        now = time.perf_counter()
        if self.run_steps > 1:
            self.timed_wait += data_wait
            self.timed_time += now - self.last_step_end
        self.last_step_end = now
        if step % self.log_every == 0 or step == self.total_steps:
            self._write(step, epoch, lr, now)

    def _write(self, step, epoch, lr, now):
        mean_loss = self.loss_sum.item() / self.window_steps   # the step's only host sync
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"loss is {mean_loss} at step {step}; try a lower --lr or "
                                     "--precision fp32")
        elapsed = now - self.window_start
        img_s = self.window_steps * self.batch_size / elapsed
        wait_pct = 100 * self.window_wait / elapsed
        self.final_loss = mean_loss
        if self.csv is not None:
            self.bar.update(self.window_steps)
            self.bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.3g}", img_s=f"{img_s:.0f}",
                                 wait=f"{wait_pct:.0f}%")
            self.csv.writerow([step, epoch, f"{mean_loss:.5f}", f"{lr:.6g}", f"{img_s:.1f}",
                               f"{wait_pct:.1f}", f"{now - self.run_start:.2f}"])
            self.csv_file.flush()
            if self.tensorboard is not None:
                for tag, v in (("loss", mean_loss), ("lr", lr), ("img_per_s", img_s),
                               ("data_wait_pct", wait_pct)):
                    self.tensorboard.add_scalar(tag, v, step)
        self.loss_sum.zero_()
        self.window_steps, self.window_wait, self.window_start = 0, 0.0, time.perf_counter()

    def summary(self) -> dict:
        timed = self.timed_time
        return {"img_per_s": (self.run_steps - 1) * self.batch_size / timed if timed else None,
                "data_wait_pct": 100 * self.timed_wait / timed if timed else None,
                "final_loss": self.final_loss}

    def close(self) -> None:
        self.bar.close()
        if self.csv_file is not None:
            self.csv_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def write_summary(out: Path, summary: dict, root: Path) -> None:
    """RUN_DIR/summary.json; on stdout the same without the args, and with --eval a table of
    what was learned beside the untrained network."""
    fs.write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("args", "eval")}, indent=2,
                     default=str), flush=True)
    if "eval" in summary:
        from fastneg.eval.report import summary_table
        print(f"\nwhat was learned ({root}; linear probe on frozen features):\n"
              f"{summary_table(summary['eval'])}", flush=True)
    else:
        print(f"evaluate with: fastneg eval {out / 'checkpoint.pt'} --data {root}", flush=True)


# ---------------------------------------------------------------- the script

def main(argv=None):
    parser = build_parser()
    args, ckpt = resolve_args(parser, argv)
    procs = setup_processes(parser, args)
    device, out = procs.device, Path(args.out)
    if procs.main:   # before any work: a writable run dir that no other training uses
        rundir.check_writable(out)
        rundir.refuse_existing_run(out, resuming=ckpt is not None)
        run_lock = fs.hold_lock(out / rundir.LOCK_FILE, f"run directory {out}")  # noqa: F841
        fs.remove_stale_temporaries(out)

    root = dataset_root(args, procs)
    textures = run_textures(args)
    loader = build_training_loader(args, procs, loader_source(args, procs, root, textures),
                                   textures)
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise ValueError(f"{root / 'train'} has fewer images than one global batch "
                         f"({args.batch_size})")
    if procs.main:
        warn_if_queue_too_large(args, steps_per_epoch * args.batch_size)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    views_and_negatives = step_inputs(args, procs, root, textures)

    model, train_model, optimizer, scaler, step = build_training_model(args, procs, ckpt)

    def checkpoint(step):
        state = training_state(model, optimizer, scaler, step, args=args, world=procs.world,
                               steps_per_epoch=steps_per_epoch)
        save_checkpoint(state, step, out=out, steps_per_epoch=steps_per_epoch,
                        save_every=args.save_every)

    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
        print(f"run {out}: {args.arch} {args.size}px, global batch {args.batch_size} on "
              f"{procs.world} process(es) ({device.type}), {steps_per_epoch} steps/epoch, "
              f"loader {args.loader}, negatives {args.negatives}, patch range "
              f"{args.patch_range}", flush=True)
    run_log = RunLog(out, main=procs.main, device=device, batch_size=args.batch_size,
                     log_every=args.log_every, total_steps=total_steps, start_step=step,
                     resumed=ckpt is not None)
    stop = rundir.StopRequest().install()   # SIGTERM/SIGHUP, or torchrun's agent gone
    amp_dtype = PRECISIONS[args.precision]
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    # ---------------------------------------------------------------- training
    for epoch in range(step // steps_per_epoch, args.epochs):
        if step >= total_steps:
            break
        batches = timed_batches(loader, epoch, skip=step - epoch * steps_per_epoch)
        for batch, data_wait in itertools.islice(batches, total_steps - step):
            set_learning_rate(optimizer, learning_rate(args, step, steps_per_epoch))
            views, negatives = views_and_negatives(batch, step=step)
            if procs.main and step == 0:
                save_grid(views + negatives, out / "batch.png")
            loss = train_step(train_model, optimizer, scaler, autocast, views, negatives, step)
            step += 1
            run_log.step_done(step, epoch, loss, data_wait, optimizer.param_groups[0]["lr"])
            if step % args.log_every == 0 and stop.agreed(procs.distributed, device):
                rundir.note(f"stopping at step {step}: {stop.reason}; the checkpoint "
                            f"continues with --resume {out}")
                total_steps = step   # save a checkpoint (below) and end
                break
        if args.skip_bad:   # every rank reaches this point together: one gather per epoch
            skipped = {f: why for f, why in loader.bad_files}
            if procs.distributed:
                every = [None] * procs.world
                dist.all_gather_object(every, skipped)
                skipped = {f: why for part in every for f, why in part.items()}
            if procs.main and skipped:   # the one report of the epoch (the loader's is off)
                files = sorted(skipped.items())
                tqdm.write(f"epoch {epoch}: {describe_skipped(files, ' on all ranks')}; batches "
                           "kept their size", file=sys.stderr)
        if procs.main and step < total_steps and (step // steps_per_epoch) % args.save_every == 0:
            checkpoint(step)
    run_log.close()
    stop.uninstall()

    # ---------------------------------------------------------------- the end
    summary = None
    if procs.main:
        checkpoint(step)
        summary = {"steps": step, "epochs": step / steps_per_epoch, **run_log.summary(),
                   "world_size": procs.world, "device": str(device),
                   "checkpoint": str(out / "checkpoint.pt"),
                   "args": {k: as_saved(v) for k, v in vars(args).items()}}
        if args.eval:   # corruptions are left to `fastneg eval`: they take longer than this
            from fastneg.eval import evaluate_checkpoint
            summary["eval"] = evaluate_checkpoint(out / "checkpoint.pt", root,
                                                  device=str(device), corruptions=())
        write_summary(out, summary, root)
    if procs.distributed:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    try:
        main()
    except rundir.UnreadableFiles as e:   # a file failed to decode mid-run
        shown = "; ".join(f"{f}: {why}" for f, why in e.failures[:3])
        print(f"train/moco.py: error: {len(e.failures)} file(s) passed the pre-flight check but "
              f"failed to decode: {shown}; fix or remove them (or pass --skip-bad), then "
              "--resume", file=sys.stderr)
        sys.exit(2)
    except (FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError,
            ImportError) as e:
        # Expected user errors (missing data, bad checkpoint or bank, absent loader): one line.
        print(f"train/moco.py: error: {e}", file=sys.stderr)
        sys.exit(2)

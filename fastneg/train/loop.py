"""The training run: processes, data, model, then the loop (train(), one epoch; main(), the
run). `python -m fastneg.train` and train/moco.py call cli()."""
from __future__ import annotations

import functools
import itertools
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numba
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fastneg import fs, rundir
from fastneg.augment import MoCoV2Augment
from fastneg.data.files import available_cpus
from fastneg.data.shards import looks_like_shards
from fastneg.data.synthetic import ensure_dataset
from fastneg.host import keep_freed_memory
from fastneg.loaders import build_loader
from fastneg.loaders.common import describe_skipped
from fastneg.moco import build_model
from fastneg.progress import tqdm
from fastneg.step import make_views_and_negatives
from fastneg.train.checkpoints import save_checkpoint, training_state
from fastneg.train.config import (PRECISIONS, PRESETS, QUEUE_FRACTION, as_saved,  # noqa: F401
                                  build_parser, check_args, resolve_args)
from fastneg.train.runlog import RunLog, save_grid, write_summary


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


def step_inputs(args, procs: Processes, root: Path, textures=None):
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


# ---------------------------------------------------------------- the loop

class Training(NamedTuple):
    """What train() works with, built once by main()."""
    args: object                # the resolved flags (config.resolve_args)
    procs: Processes
    out: Path
    loader: object              # this rank's loader
    step_inputs: object         # (batch, step=) -> (views, negatives): step_inputs()
    model: object               # the model to call: DDP-wrapped when several processes train
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    log: RunLog
    stop: rundir.StopRequest
    steps_per_epoch: int


def train(t: Training, epoch: int, step: int, end: int) -> tuple[int, bool]:
    """One epoch from `step` (steps done so far) until it ends or `end` steps are done in all.
    Returns the steps done and whether the run was asked to stop (rundir.StopRequest)."""
    args, procs = t.args, t.procs
    stopped = False
    batches = timed_batches(t.loader, epoch, skip=step - epoch * t.steps_per_epoch)
    for batch, data_time in itertools.islice(batches, end - step):
        set_learning_rate(t.optimizer, learning_rate(args, step, t.steps_per_epoch))
        views, negatives = t.step_inputs(batch, step=step)
        if procs.main and step == 0:
            save_grid(views + negatives, t.out / "batch.png")
        loss = train_step(t.model, t.optimizer, t.scaler, t.autocast, views, negatives, step)
        step += 1
        t.log.step_done(step, epoch, loss, data_time, t.optimizer.param_groups[0]["lr"])
        if step % args.log_every == 0 and t.stop.agreed(procs.distributed, procs.device):
            rundir.note(f"stopping at step {step}: {t.stop.reason}; the checkpoint "
                        f"continues with --resume {t.out}")
            stopped = True
            break
    if args.skip_bad:
        report_skipped(procs, t.loader, epoch)
    return step, stopped


def report_skipped(procs: Processes, loader, epoch: int) -> None:
    """The epoch's one line on the files left out, gathered from every rank (all ranks call
    this together: one gather per epoch); the loaders' own report is off (report_skipped)."""
    skipped = {f: why for f, why in loader.bad_files}
    if procs.distributed:
        every = [None] * procs.world
        dist.all_gather_object(every, skipped)
        skipped = {f: why for part in every for f, why in part.items()}
    if procs.main and skipped:
        files = sorted(skipped.items())
        tqdm.write(f"epoch {epoch}: {describe_skipped(files, ' on all ranks')}; batches "
                   "kept their size", file=sys.stderr)


# ---------------------------------------------------------------- the run

def claim_run_dir(out: Path, resuming: bool):
    """Rank 0, before any work: a writable run directory that no other training uses. Returns
    the lock, held while the returned file stays open."""
    rundir.check_writable(out)
    rundir.refuse_existing_run(out, resuming=resuming)
    lock = fs.hold_lock(out / rundir.LOCK_FILE, f"run directory {out}")
    fs.remove_stale_temporaries(out)
    return lock


def main(argv=None, prog: str | None = None):
    """Train as the flags in `argv` say; returns the summary (rank 0) or None."""
    parser = build_parser(prog)
    args, ckpt = resolve_args(parser, argv)
    procs = setup_processes(parser, args)
    device, out = procs.device, Path(args.out)
    run_lock = claim_run_dir(out, ckpt is not None) if procs.main else None  # noqa: F841

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
    run = Training(args, procs, out, loader, views_and_negatives, train_model, optimizer, scaler,
                   autocast, run_log, stop, steps_per_epoch)

    for epoch in range(step // steps_per_epoch, args.epochs):
        if step >= total_steps:
            break
        step, stopped = train(run, epoch, step, total_steps)
        if stopped:
            total_steps = step   # save a checkpoint (below) and end
        if procs.main and step < total_steps and (step // steps_per_epoch) % args.save_every == 0:
            checkpoint(step)
    run_log.close()
    stop.uninstall()

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


def cli(prog: str = "train/moco.py", argv=None) -> None:
    """main() for a command line: expected user errors (missing data, a bad checkpoint or bank,
    an absent loader, a file that fails to decode mid-run) are one line and exit status 2."""
    try:
        main(argv, prog)
    except rundir.UnreadableFiles as e:   # a file failed to decode mid-run
        shown = "; ".join(f"{f}: {why}" for f, why in e.failures[:3])
        print(f"{prog}: error: {len(e.failures)} file(s) passed the pre-flight check but "
              f"failed to decode: {shown}; fix or remove them (or pass --skip-bad), then "
              "--resume", file=sys.stderr)
        sys.exit(2)
    except (FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError,
            ImportError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)

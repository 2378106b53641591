"""Train MoCo-v2 with non-semantic negatives (fastneg's lean DDP trainer).

    python train/moco.py                                   # one process, embedded data
    torchrun --standalone --nproc_per_node=1 train/moco.py --loader dali      # = make train
    torchrun --standalone --nproc_per_node=8 train/moco.py --preset paper-in100 --data IN100
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 train/moco.py --preset paper-in100 --data IN100   # per node

Data: --data ROOT follows MoCo's convention, ROOT/train is an ImageFolder (class/image.jpg);
for --loader ffcv the trainer reads ROOT/train.beton and makes it on first use with
`fastneg convert`. Without --data: the embedded shapes dataset, generated on first use.
Multi-node runs need --data on a shared or per-node copy.

Processes: one per GPU (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; init is env://, NCCL on
GPUs, gloo on CPUs); plain `python train/moco.py` runs one process. --batch-size is the global
batch, split evenly over the processes. BatchNorm for keys and NS: --bn shuffle (MoCo's
shuffle-BN across ranks; a no-op in one process) or --bn sync (SyncBatchNorm, GPUs only).

Step: loader (two random-resized crops, uint8) -> aug-plus on the device (two views) -> patch
NS from the augmented query and/or texture NS (the image's own texture from --texture-bank,
given the query's augmentation draws) -> loss (PAPER.md; alpha inside the exponent) -> SGD
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
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a CPU the loader's threads share the cores
# with torch's. Set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from fastneg.augment import IMAGENET_MEAN, IMAGENET_STD, MoCoV2Augment  # noqa: E402
from fastneg.data.synthetic import ensure_dataset  # noqa: E402
from fastneg.kernels import patch_negatives, sample_textures  # noqa: E402
from fastneg.loaders import KINDS, build_loader  # noqa: E402
from fastneg.moco import ARCHS, BN_MODES, build_model, read_checkpoint  # noqa: E402

NEGATIVES = ("none", "patch", "texture", "both")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PAPER_SIZE, PAPER_PATCH_RANGE = 224, (16, 72)

# Lowest priority first: base defaults, then per-device defaults, then a preset, then the
# checkpoint's args on --resume, then flags given on the command line.
DEFAULTS = dict(loader="dali", negatives="patch", alpha=2.0, patch_range=None, texture_bank=None,
                cifar_stem=False, crop_scale=[0.2, 1.0], lr=0.06, wd=1e-4, epochs=30, warmup_epochs=1, moco_k=1024,
                moco_m=0.99, moco_t=0.2, dim=128, mlp_hidden=2048, bn=None, bn_splits=4,
                channels_last=True, seed=0, save_every=10, log_every=10, workers=None,
                compile=False, max_steps=None, eval=False)
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
RUN_CONTROL = NOT_CARRIED | {"epochs", "log_every", "save_every", "workers", "compile", "eval"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="MoCo-v2 with non-semantic negatives (see below for the data layout, "
                    "presets and multi-GPU / multi-node use).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)

    def a(flag, help, **kw):
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

    a("--preset", "a named set of settings (see below)", choices=sorted(PRESETS))
    a("--data", "dataset ROOT holding ROOT/train (default: the embedded dataset)")
    a("--loader", "data loader backend", choices=KINDS)
    a("--workers", "loader worker threads or processes (default: the loader's choice)", type=int)
    a("--negatives", "non-semantic negatives", choices=NEGATIVES)
    a("--alpha", "NS logit scale, inside the exponent", type=float)
    a("--patch-range", "patch side range in pixels, both ends included (default: 16..72 "
      "scaled from 224 px to --size)", type=int, nargs=2, metavar=("LO", "HI"))
    a("--texture-bank", "texture bank folder, needed by --negatives texture|both (made with "
      "`fastneg build-bank`)")
    a("--arch", "backbone", choices=ARCHS)
    a("--cifar-stem", "3x3 stride-1 stem without max-pool, for images of about 32 px",
      action=argparse.BooleanOptionalAction)
    a("--size", "training resolution in pixels", type=int)
    a("--crop-scale", "area range of the random resized crops, as fractions of the image; "
      "a milder range such as 0.4 1 keeps small shapes whole", type=float, nargs=2,
      metavar=("LO", "HI"))
    a("--batch-size", "global batch, split over the processes", type=int)
    a("--lr", "learning rate per 256 images; the optimizer uses lr * batch-size / 256",
      type=float)
    a("--wd", "weight decay", type=float)
    a("--epochs", "epochs (sets the length of the cosine schedule)", type=int)
    a("--warmup-epochs", "linear warmup before the cosine, in epochs", type=float)
    a("--moco-k", "queue size, a multiple of the global batch", type=int)
    a("--moco-m", "key encoder momentum", type=float)
    a("--moco-t", "softmax temperature", type=float)
    a("--dim", "feature dimension", type=int)
    a("--mlp-hidden", "hidden width of the MLP head", type=int)
    a("--bn", "BatchNorm treatment of keys and NS: split (one process: BatchNorm over "
      "--bn-splits sub-batches, keys shuffled across them), shuffle (across processes) or sync "
      "(default split in one process, shuffle in several)", choices=BN_MODES)
    a("--bn-splits", "sub-batches of --bn split", type=int)
    a("--device", "device (default: cuda when available)", choices=("cpu", "cuda"))
    a("--precision", "autocast dtype", choices=sorted(PRECISIONS))
    a("--channels-last", "channels_last memory for images and model",
      action=argparse.BooleanOptionalAction)
    a("--compile", "torch.compile the encoders", action=argparse.BooleanOptionalAction)
    a("--seed", "seed of every random draw", type=int)
    a("--out", "run directory (default runs/moco-<date>-<time>)")
    a("--resume", "continue the run in RUN_DIR (or from a .pt file)", metavar="RUN_DIR")
    a("--max-steps", "stop after this many steps in all (smoke runs); the schedule still "
      "follows --epochs", type=int)
    a("--save-every", "epochs between checkpoint_epochNNN.pt files", type=int)
    a("--log-every", "steps between log lines", type=int)
    a("--eval", "at the end, run `fastneg eval` on the final checkpoint (rank 0)",
      action=argparse.BooleanOptionalAction)
    return p


def resolve_args(parser, argv=None):
    """(args, checkpoint or None): flags > checkpoint args > preset > device > base defaults."""
    args = parser.parse_args(argv)
    explicit = {k: v for k, v in vars(args).items() if v is not None}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    ckpt = None
    resumed = {}
    if args.resume:
        path = Path(args.resume)
        ckpt = read_checkpoint(path / "checkpoint.pt" if path.is_dir() else path)
        resumed = {k: v for k, v in ckpt["args"].items() if k not in NOT_CARRIED}
        changed = [k for k in explicit if k in resumed and k not in RUN_CONTROL
                   and _plain(explicit[k]) != resumed[k]]
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
        args.patch_range = [max(2, round(v * args.size / PAPER_SIZE)) for v in PAPER_PATCH_RANGE]
    args.patch_range = list(args.patch_range)
    if args.resume and not args.out:
        path = Path(args.resume)
        args.out = str(path if path.is_dir() else path.parent)
    if not args.out:
        args.out = time.strftime("runs/moco-%Y%m%d-%H%M%S")
    return args, ckpt


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


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


def save_checkpoint(state, path: Path):
    """torch.save to a temporary file, then rename: a crash never leaves a half checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


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


def main(argv=None):
    parser = build_parser()
    args, ckpt = resolve_args(parser, argv)

    # ---------------------------------------------------------------- processes and devices
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    check_args(parser, args, world)
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True     # fixed shapes: pick the fastest kernels once
    else:
        device = torch.device("cpu")
        # Share the cores among this node's processes (torchrun would leave each just one).
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                **({"device_id": device} if device.type == "cuda" else {}))
    main_process = rank == 0
    out = Path(args.out)

    # ---------------------------------------------------------------- data
    if args.data is None:
        root = ensure_dataset() if local_rank == 0 else None
        if distributed:
            dist.barrier()
        root = root or ensure_dataset()
    else:
        root = Path(args.data)
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"--data {root}: training folder {root / 'train'} not found "
                                "(expected ROOT/train/<class>/<image>)")
    source = root / "train"
    if args.loader == "ffcv":
        source = root / "train.beton"
        if local_rank == 0 and not source.exists():
            # In a subprocess: an FFCV writer after a loader in one process can deadlock (Numba).
            print(f"converting {root / 'train'} to {source} (once)", flush=True)
            subprocess.run([sys.executable, "-m", "fastneg.cli", "convert", "--to", "ffcv",
                            str(root / "train"), str(source)], check=True)
        if distributed:
            dist.barrier()
    per_rank = args.batch_size // world
    loader = build_loader(args.loader, str(source), batch_size=per_rank, views=2, size=args.size,
                          scale=tuple(args.crop_scale), device=str(device), rank=rank, world_size=world, seed=args.seed,
                          workers=args.workers, drop_last=True, shuffle=True)
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise ValueError(f"{source} has fewer images than one global batch ({args.batch_size})")
    total_steps = args.epochs * steps_per_epoch
    images = steps_per_epoch * args.batch_size
    if main_process and args.moco_k > QUEUE_FRACTION * images:
        # With K = r * images, an image's own key from the previous epoch is still in the queue
        # (a false negative) for about r^2 / 2 of the queries; at r = 0.8 the loss climbs and
        # the features stop improving (measured on the embedded dataset).
        print(f"warning: --moco-k {args.moco_k} is over {QUEUE_FRACTION:.0%} of the {images} "
              "training images per epoch; keys of the same images from the previous epoch "
              "will act as negatives. Use a smaller --moco-k.", file=sys.stderr, flush=True)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    amp_dtype = PRECISIONS[args.precision]
    aug = MoCoV2Augment(dtype=amp_dtype if device.type == "cuda" and amp_dtype else torch.float32)
    bank = None
    if args.negatives in ("texture", "both"):
        from fastneg.texture import TextureBank
        bank = TextureBank.load(args.texture_bank, device, expect=str(root / "train"))

    # ---------------------------------------------------------------- model and optimizer
    torch.manual_seed(args.seed)   # initial weights (the only use of torch's global RNG)
    model = build_model(vars(args)).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=args.lr, momentum=0.9,
                                weight_decay=args.wd)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        if ckpt.get("world_size", world) != world:
            raise ValueError(f"--resume: the run used {ckpt['world_size']} processes, this one "
                             f"{world}; the per-rank draws would differ")
    if args.compile:
        model.encoder_q.compile()
        model.encoder_k.compile()
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                  broadcast_buffers=False) if world > 1 else model
    # broadcast_buffers=False: the queue is identical on every rank by construction (all ranks
    # enqueue the gathered keys); re-sending it from rank 0 every step would cost K * dim floats.

    # ---------------------------------------------------------------- logging
    saved_args = {k: _plain(v) for k, v in vars(args).items()}
    writer, log_file, log_csv = None, None, None
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        new_log = not (out / "log.csv").exists()
        log_file = open(out / "log.csv", "a", newline="")
        log_csv = csv.writer(log_file)
        if new_log:
            log_csv.writerow(["step", "epoch", "loss", "lr", "img_per_s", "data_wait_pct",
                              "elapsed_s"])
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out))
        except ImportError:
            pass
        print(f"run {out}: {args.arch} {args.size}px, global batch {args.batch_size} on {world} "
              f"process(es) ({device.type}), {steps_per_epoch} steps/epoch, loader {args.loader}, "
              f"negatives {args.negatives}, patch range {args.patch_range}", flush=True)
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=step, disable=not main_process, unit="step",
               dynamic_ncols=True)

    def checkpoint():
        """RUN_DIR/checkpoint.pt, plus checkpoint_epochNNN.pt at every --save-every epochs."""
        epoch_done, mid_epoch = divmod(step, steps_per_epoch)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "step": step, "epoch": epoch_done, "seed": args.seed, "world_size": world,
                 "args": saved_args}
        if scaler.is_enabled():
            state["scaler"] = scaler.state_dict()
        if not mid_epoch and epoch_done % args.save_every == 0:
            save_checkpoint(state, out / f"checkpoint_epoch{epoch_done:03d}.pt")
        save_checkpoint(state, out / "checkpoint.pt")

    # ---------------------------------------------------------------- training
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    loss_sum = torch.zeros((), device=device)   # summed on the device: no sync per step
    run_start = window_start = t_prev = time.perf_counter()
    window_steps, window_wait = 0, 0.0
    run_steps, timed_wait, timed_time = 0, 0.0, 0.0   # timed: this run's steps after its first
    final_loss = float("nan")
    start_epoch, skip = divmod(step, steps_per_epoch)
    for epoch in range(start_epoch, args.epochs):
        if step >= total_steps:
            break
        t0 = time.perf_counter()
        loader.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(skip):   # resuming mid-epoch: the loader's order is a function of epoch
            next(batches)
        skip = 0
        epoch_start_wait = time.perf_counter() - t0   # counted as data wait of the first step
        while step < total_steps:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            t_data = time.perf_counter() - t0 + epoch_start_wait
            epoch_start_wait = 0.0
            for g in optimizer.param_groups:
                g["lr"] = learning_rate(args, step, steps_per_epoch)
            # Draws per (seed, step, view, sample): rank r owns samples r*n .. r*n + n - 1.
            params = [aug.sample(per_rank, seed=args.seed, step=step, view=i,
                                 first=rank * per_rank, device=device)
                      for i in range(len(batch.views))]
            views = [aug.apply(v, p) for v, p in zip(batch.views, params)]
            ns = []
            # The NS kernels count samples by batch row: step * world + rank keeps ranks apart.
            draw_step = step * world + rank
            if args.negatives in ("patch", "both"):
                ns.append(patch_negatives(views[0], layout="nchw",
                                          patch_range=tuple(args.patch_range), seed=args.seed,
                                          step=draw_step))
            if bank is not None:
                # Rows come from the bank's own map, so the id range check (a host sync on
                # CUDA) is left out there.
                tex = sample_textures(*bank.for_batch(batch.indices), size=args.size,
                                      seed=args.seed, step=draw_step,
                                      check_ids=device.type == "cpu")
                ns.append(aug.apply(tex, params[0]))   # the query's colour, grey, blur, flip
            if main_process and step == 0:
                save_grid(views + ns, out / "batch.png")
            with autocast:
                loss, _ = ddp(views[0], views[1], ns=ns, step=step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach()
            step += 1
            run_steps += 1
            window_steps += 1
            window_wait += t_data
            now = time.perf_counter()
            if run_steps > 1:   # the first step carries start-up costs (JIT, loader warm-up)
                timed_wait += t_data
                timed_time += now - t_prev
            t_prev = now
            if step % args.log_every == 0 or step == total_steps:
                mean_loss = loss_sum.item() / window_steps   # the step's only host sync
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"loss is {mean_loss} at step {step}; try a lower "
                                             "--lr or --precision fp32")
                elapsed = now - window_start
                img_s = window_steps * args.batch_size / elapsed
                wait_pct = 100 * window_wait / elapsed
                lr = optimizer.param_groups[0]["lr"]
                final_loss = mean_loss
                if main_process:
                    bar.update(window_steps)
                    bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.3g}",
                                    img_s=f"{img_s:.0f}", wait=f"{wait_pct:.0f}%")
                    log_csv.writerow([step, epoch, f"{mean_loss:.5f}", f"{lr:.6g}",
                                      f"{img_s:.1f}", f"{wait_pct:.1f}", f"{now - run_start:.2f}"])
                    log_file.flush()
                    if writer is not None:
                        for tag, v in (("loss", mean_loss), ("lr", lr), ("img_per_s", img_s),
                                       ("data_wait_pct", wait_pct)):
                            writer.add_scalar(tag, v, step)
                loss_sum.zero_()
                window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()
        if main_process and step < total_steps and (step // steps_per_epoch) % args.save_every == 0:
            checkpoint()
    bar.close()

    # ---------------------------------------------------------------- the end
    if main_process:
        checkpoint()
        summary = {
            "steps": step, "epochs": step / steps_per_epoch,
            "img_per_s": (run_steps - 1) * args.batch_size / timed_time if timed_time else None,
            "data_wait_pct": 100 * timed_wait / timed_time if timed_time else None,
            "final_loss": final_loss, "world_size": world, "device": str(device),
            "checkpoint": str(out / "checkpoint.pt"), "args": saved_args,
        }
        if args.eval:   # corruptions are left to `fastneg eval`: they take longer than this
            from fastneg.eval import evaluate_checkpoint
            summary["eval"] = evaluate_checkpoint(out / "checkpoint.pt", root,
                                                  device=str(device), corruptions=())
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(json.dumps({k: v for k, v in summary.items() if k not in ("args", "eval")}, indent=2,
                         default=str), flush=True)
        if args.eval:
            from fastneg.eval.report import summary_table
            print(f"\nwhat was learned ({root}; linear probe on frozen features):\n"
                  f"{summary_table(summary['eval'])}", flush=True)
        else:
            print(f"evaluate with: fastneg eval {out / 'checkpoint.pt'} --data {root}", flush=True)
        log_file.close()
        if writer is not None:
            writer.close()
    if distributed:
        dist.destroy_process_group()
    return summary if main_process else None


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, NotADirectoryError, ValueError, ImportError) as e:
        # Expected user errors (missing data, bad checkpoint or bank, absent loader): one line.
        print(f"train/moco.py: error: {e}", file=sys.stderr)
        sys.exit(2)

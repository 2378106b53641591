"""The trainer's checkpoints: what one holds and when one is written (atomically, through
fastneg.rundir.save_atomic)."""
from __future__ import annotations

from pathlib import Path

from fastneg import rundir
from fastneg.train.config import as_saved


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

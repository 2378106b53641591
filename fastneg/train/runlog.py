"""What a run writes as it goes: log.csv, TensorBoard events, the progress bar, batch.png and,
at the end, summary.json."""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import torch

from fastneg import fs, rundir
from fastneg.augment import IMAGENET_MEAN, IMAGENET_STD
from fastneg.progress import tqdm

LOG_COLUMNS = ["step", "epoch", "loss", "lr", "img_per_s", "data_wait_pct", "elapsed_s"]


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
        from fastneg.data.shards import looks_like_shards
        # eval reads ImageFolders (train/ and the splits beside it), not shards
        data = "ROOT" if looks_like_shards(root) else root
        print(f"evaluate with: fastneg eval {out / 'checkpoint.pt'} --data {data}", flush=True)

"""skip_bad: a file that fails to decode is replaced within its rank's shard, so every rank's
batches keep their size (loaders.common.replace_failed, the torch loader, train/moco.py
--skip-bad under torchrun)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastneg.data.synthetic import DatasetSpec, make_dataset
from fastneg.loaders import build_loader
from fastneg.loaders.common import replace_failed

SCRIPT = Path(__file__).resolve().parents[1] / "train" / "moco.py"


def test_replace_failed_keeps_the_size_and_is_deterministic():
    samples = np.array([7, 3, 9, 1, 4, 8, 2, 6, 5, 0], np.int64)
    failed = {3, 1}
    batch = replace_failed(samples, 0, 4, failed)
    assert batch.tolist() == [7, 4, 9, 8]          # the next good samples after the batch
    assert replace_failed(samples, 0, 4, failed).tolist() == batch.tolist()
    assert replace_failed(samples, 0, 4, set()).tolist() == [7, 3, 9, 1]
    # wraps around the shard, and skips failures and samples already in the batch
    assert replace_failed(samples, 6, 10, {6, 0, 7}).tolist() == [2, 3, 5, 9]
    # a failure among the replacements: the batch as if it had been known from the start
    assert replace_failed(samples, 0, 4, failed | {4}).tolist() == [7, 8, 9, 2]
    with pytest.raises(ValueError, match="failed to decode"):
        replace_failed(samples, 0, 4, set(samples.tolist()))


def test_replacement_comes_from_the_same_shard():
    rng = np.random.default_rng(0)
    shard = rng.permutation(1000)[:125]
    failed = set(rng.choice(shard, 20, replace=False).tolist())
    planned = np.concatenate([replace_failed(shard, s, s + 25, failed)
                              for s in range(0, 125, 25)])
    assert len(planned) == 125
    assert set(planned.tolist()) <= set(shard.tolist()) - failed
    for s in range(0, 125, 25):
        assert len(set(planned[s:s + 25].tolist())) == 25     # no sample twice in a batch


def _decode_only_bad(path: Path, good: Path) -> None:
    """A JPEG with a bogus Huffman table: passes the pre-flight check, fails to decode."""
    data = good.read_bytes()
    dht = data.find(b"\xff\xc4")
    path.write_bytes(data[:dht + 5] + b"\xff" * 16 + data[dht + 21:])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """80 training images at 32 px (10 classes): one is replaced by a file that fails to
    decode, plus one the pre-flight check rejects (truncated)."""
    root = make_dataset(tmp_path_factory.mktemp("skip") / "shapes",
                        DatasetSpec(images_per_class=8, size=32), progress=False)
    train = root / "train"
    first = sorted((train / sorted(os.listdir(train))[0]).iterdir())
    _decode_only_bad(first[0].with_name("zz_huffman.jpg"), first[1])
    first[0].unlink()
    (first[1].with_name("zz_truncated.jpg")).write_bytes(first[1].read_bytes()[:200])
    return root


def test_torch_loader_keeps_batches_full(data):
    loaders = [build_loader("torch", data / "train", batch_size=8, size=16, device="cpu",
                            workers=0, rank=r, world_size=2, skip_bad=True, seed=1)
               for r in range(2)]
    for epoch in range(2):
        batches = []
        for loader in loaders:
            loader.set_epoch(epoch)
            batches.append([b.indices.tolist() for b in loader])
        assert [len(b) for b in batches[0]] == [len(b) for b in batches[1]] == [8] * 5
    failed = loaders[0]._failed | loaders[1]._failed
    assert len(failed) == 1                            # the Huffman file, found when read
    assert all(f not in sum(part, []) for part in batches for f in failed)
    assert {Path(f).name for f, _ in loaders[0].bad_files} >= {"zz_truncated.jpg"}


@pytest.mark.slow
def test_trainer_skip_bad_under_torchrun(data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(SCRIPT), "--data", str(data), "--loader", "torch", "--negatives", "patch",
           "--skip-bad", "--epochs", "1", "--max-steps", "5", "--device", "cpu",
           "--workers", "0", "--out", str(out), "--size", "32", "--batch-size", "16",
           "--moco-k", "64", "--dim", "16", "--mlp-hidden", "64", "--log-every", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["world_size"] == 2   # the whole epoch
    # 2 ranks x 8 keys per step went into the queue at every step: no short batch
    from fastneg.moco import read_checkpoint
    assert int(read_checkpoint(out / "checkpoint.pt")["model"]["queue_ptr"]) == 5 * 16 % 64
    assert proc.stderr.count("epoch 0: skipped 2 unreadable file(s) on all ranks") == 1


@pytest.fixture(scope="module")
def trainer():
    from fastneg.train import loop
    return loop


def test_trainer_reports_each_skipped_file_once_per_epoch(trainer, data, tmp_path, monkeypatch,
                                                          capsys, caplog):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    trainer.main(["--data", str(data), "--loader", "torch", "--negatives", "patch", "--skip-bad",
                  "--epochs", "2", "--device", "cpu", "--workers", "0", "--out",
                  str(tmp_path / "run"), "--size", "32", "--batch-size", "16", "--moco-k", "64",
                  "--dim", "16", "--mlp-hidden", "64", "--log-every", "5"])
    text = capsys.readouterr().err + caplog.text     # the loaders log, the trainer prints
    reports = [line for line in text.splitlines() if "unreadable file" in line]
    for epoch in range(2):
        mine = [line for line in reports if f"epoch {epoch}:" in line]
        assert len(mine) == 1, reports
        assert "zz_truncated.jpg" in mine[0] and "zz_huffman.jpg" in mine[0]
    assert len(reports) == 2, reports

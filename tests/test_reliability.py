"""Fault injection (issue 17): each fault gives a one-line error naming the file, or is handled;
nothing hangs and nothing is lost.

Faults are made for real where that is cheap (a FIFO, a bomb-header PNG, a symlink loop, a
byte-flipped checkpoint, kill -9 of a build and of a parent process) and simulated where the
real thing needs privileges (a full or read-only disk: the writer is monkeypatched).
"""
import csv
import errno
import importlib.util
import json
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastneg import rundir
from fastneg.data import files
from fastneg.data.files import inspect_file
from fastneg.data.imagefolder import scan_image_folder
from fastneg.moco import build_model, read_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "train" / "moco.py"
ROOT = Path(__file__).resolve().parents[1]


def _images(folder: Path, n: int, size: int = 32, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(folder / f"{i}.jpg")


def _bomb_png(path: Path, w: int = 30000, h: int = 30000) -> None:
    """A valid little PNG whose header claims w x h pixels (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    _images(root / "a", 4)
    _images(root / "b", 4, seed=1)
    return root


# ---------------------------------------------------------------- 1, 6: pre-flight check

def test_fifo_and_device_are_not_regular_files(folder):
    os.mkfifo(folder / "a" / "fifo.jpg")              # open() would block for ever
    os.symlink("/dev/zero", folder / "b" / "zero.jpg")
    check = files.check_files(scan_image_folder(folder), workers=2)
    reasons = dict(check.bad_files)
    assert reasons[str(folder / "a" / "fifo.jpg")].startswith("not a regular file")
    assert reasons[str(folder / "b" / "zero.jpg")].startswith("not a regular file")
    assert len(check.good) == 8


def test_decompression_bomb_is_named_and_limit_is_a_setting(folder, monkeypatch):
    _bomb_png(folder / "a" / "bomb.png")
    problem = inspect_file(folder / "a" / "bomb.png")[0]
    assert problem.startswith("image too large (30000 x 30000 > limit of")
    monkeypatch.setattr(files, "MAX_PIXELS", 32 * 32 - 1)      # the documented setting
    assert inspect_file(folder / "a" / "0.jpg")[0].startswith("image too large (32 x 32 > limit")


def test_bomb_and_fifo_never_reach_a_decoder(folder, tmp_path):
    """torch loader (CPU decode), eval and the bank's reader refuse them by name."""
    from fastneg.eval.suite import evaluate_backbone
    from fastneg.loaders import build_loader
    from fastneg.texture.build import _load_rgb
    _bomb_png(folder / "a" / "bomb.png")
    with pytest.raises(ValueError, match="bomb.png: image too large"):
        build_loader("torch", folder, batch_size=2, size=16, device="cpu", workers=0)
    with pytest.raises(ValueError, match="image too large"):
        _load_rgb(folder / "a" / "bomb.png")
    os.mkfifo(tmp_path / "fifo.jpg")
    with pytest.raises(ValueError, match="not a regular file"):
        _load_rgb(tmp_path / "fifo.jpg")

    def never(x):
        raise AssertionError("features computed before the files were checked")
    root = tmp_path / "eval"
    _images(root / "train" / "a", 2)
    _images(root / "train" / "b", 2)
    ood = tmp_path / "ood"
    _images(ood / "a", 1)
    _bomb_png(ood / "a" / "bomb.png")
    with pytest.raises(ValueError, match="bomb.png: image too large"):
        evaluate_backbone(never, root, size=16, ood={"x": ood}, corruptions=())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ffcv") is None, reason="needs ffcv (fastneg[ffcv])")
def test_convert_skips_fifo_and_bomb_and_keeps_non_utf8_names(folder, tmp_path):
    """fastneg convert: without --skip-bad a one-line refusal; with it, no hang, the bad files
    listed, and a non-UTF-8 file name stored so that its bytes come back."""
    os.mkfifo(folder / "a" / "fifo.jpg")
    _bomb_png(folder / "b" / "bomb.png")
    os.rename(folder / "a" / "1.jpg", os.fsencode(folder / "a") + b"/\xff\xfe.jpg")
    out = tmp_path / "d.beton"
    cmd = [sys.executable, "-m", "fastneg.cli", "convert", "--to", "ffcv", str(folder), str(out),
           "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "fifo.jpg: not a regular file" in r.stderr and "bomb.png: image too large" in r.stderr
    r = subprocess.run(cmd + ["--skip-bad"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(tmp_path.glob("*.partial"))
    info = json.loads(Path(str(out) + ".json").read_text())
    assert sorted(Path(f).name for _, f, _ in info["bad"]) == ["bomb.png", "fifo.jpg"]
    assert info["samples"] == 10
    names = {os.fsencode(Path(f).name) for f in scan_image_folder(folder).files}
    assert b"\xff\xfe.jpg" in names


def test_convert_partial_file_is_removed_on_error(folder, tmp_path, monkeypatch):
    from fastneg.data import convert

    def fail(images, check, bad, out, partial, *args):
        partial.write_bytes(b"x" * 1000)
        raise ValueError("writer failed")
    monkeypatch.setattr(convert, "_write", fail)
    with pytest.raises(ValueError, match="writer failed"):
        convert.write_beton(folder, tmp_path / "d.beton", workers=1)
    assert not (tmp_path / "d.beton.partial").exists()
    monkeypatch.setattr(os, "access", lambda *a: False)     # a read-only output folder
    with pytest.raises(PermissionError, match="cannot write to"):
        convert.write_beton(folder, tmp_path / "d.beton", workers=1)


# ---------------------------------------------------------------- 11, 12, 13: the listing

def test_symlink_loop_is_listed_once_with_a_warning(folder, caplog):
    os.symlink(".", folder / "a" / "loop")           # a/loop/loop/loop/... is a
    os.symlink("../a", folder / "b" / "elsewhere")   # another class's folder: followed once
    with caplog.at_level("WARNING", logger="fastneg.data"):
        images = scan_image_folder(folder)
    assert sum(1 for f in images.files if f.startswith("a/")) == 4
    assert images.repeated_dirs == ("a/loop", "b/elsewhere/loop")
    assert len(images) == 12 and "reached again through a symlink" in caplog.text


def test_ignored_extensions_are_counted(folder, caplog):
    Image.new("RGB", (8, 8)).save(folder / "a" / "x.gif")
    (folder / "b" / "notes").write_text("x")
    with caplog.at_level("WARNING", logger="fastneg.data"):
        images = scan_image_folder(folder)
    assert images.ignored == {".gif": 1, "(no extension)": 1}
    assert "ignored: 1 (no extension), 1 .gif" in images.report()
    assert "1 .gif" in caplog.text


def test_fingerprint_changes_with_content(folder):
    before = scan_image_folder(folder).fingerprint()
    assert scan_image_folder(folder).fingerprint() == before
    _images(folder / "a", 1, size=40, seed=9)        # other pixels under the same name
    assert scan_image_folder(folder).fingerprint() != before


# ---------------------------------------------------------------- 14: eval

def test_eval_with_train_only_says_so(tmp_path):
    from fastneg.eval.suite import evaluate_backbone
    _images(tmp_path / "train" / "a", 2)
    with pytest.raises(ValueError, match="nothing to score.*train/ only"):
        evaluate_backbone(None, tmp_path, size=16, corruptions=())


@pytest.mark.skipif(importlib.util.find_spec("corrupt_tta") is None,
                    reason="needs corrupt-tta (fastneg[eval])")
def test_eval_read_only_corruption_cache_is_one_line(tmp_path, monkeypatch):
    from fastneg.eval import suite
    for split in ("train", "val"):
        _images(tmp_path / split / "a", 2)

    def erofs(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(suite, "corrupt_split", erofs)
    with pytest.raises(PermissionError, match="--corrupt-dir"):
        suite.evaluate_backbone(None, tmp_path, size=16, corruptions=("gaussian_noise",),
                                severities=(1,))


# ---------------------------------------------------------------- 8: checkpoints

ARGS = dict(arch="resnet10s", dim=8, moco_k=16, moco_m=0.99, moco_t=0.2, size=32,
            mlp_hidden=16)


def _checkpoint(path, step=3, **changes):
    model = build_model(ARGS)
    state = {"model": model.state_dict(), "args": {**ARGS, **changes}, "step": step,
             "optimizer": {}, "world_size": 1}
    torch.save(state, path)
    return state


def test_flipped_byte_checkpoint_is_refused(tmp_path):
    _checkpoint(tmp_path / "c.pt")
    data = bytearray((tmp_path / "c.pt").read_bytes())
    import zipfile
    with zipfile.ZipFile(tmp_path / "c.pt") as z:
        big = max(z.infolist(), key=lambda i: i.file_size)
    data[big.header_offset + 30 + len(big.filename.encode()) + 64 + 200] ^= 0x10
    (tmp_path / "c.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="c.pt is damaged: record .* fails its checksum"):
        read_checkpoint(tmp_path / "c.pt")


def test_non_finite_weights_and_bad_args_are_refused(tmp_path):
    state = _checkpoint(tmp_path / "nan.pt")
    next(v for v in state["model"].values() if v.is_floating_point())[0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="nan.pt: weights .* are not finite"):
        read_checkpoint(tmp_path / "nan.pt")
    _checkpoint(tmp_path / "type.pt", dim="8")
    with pytest.raises(ValueError, match=r"type.pt: args\['dim'\] is '8'"):
        read_checkpoint(tmp_path / "type.pt")
    state = _checkpoint(tmp_path / "missing.pt")
    del state["args"]["arch"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="missing.pt: args lack arch"):
        read_checkpoint(tmp_path / "missing.pt")


def test_weights_that_do_not_fit_are_one_error(tmp_path):
    state = _checkpoint(tmp_path / "c.pt")
    model = build_model({**ARGS, "dim": 12})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(rundir.RunDirError, match="c.pt does not fit the model"):
        rundir.restore(model, opt, torch.amp.GradScaler("cpu", enabled=False), state,
                       tmp_path / "c.pt")


def test_bank_index_missing_key_is_named(tmp_path):
    from fastneg.texture.store import FORMAT, VERSION, read_index
    (tmp_path / "index.json").write_text(json.dumps({"format": FORMAT, "version": VERSION}))
    with pytest.raises(ValueError, match="index.json lacks the key 'complete'"):
        read_index(tmp_path)


# ---------------------------------------------------------------- 3, 4, 5: the run directory

def test_new_run_into_a_run_directory_is_refused(tmp_path):
    rundir.refuse_existing_run(tmp_path, resuming=False)     # empty: fine
    (tmp_path / "checkpoint_epoch002.pt").write_bytes(b"")
    with pytest.raises(rundir.RunDirError, match="already holds a run.*--resume"):
        rundir.refuse_existing_run(tmp_path, resuming=False)
    rundir.refuse_existing_run(tmp_path, resuming=True)


def test_log_is_cut_back_to_the_checkpoint(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("step,epoch,loss\n" + "".join(f"{s},0,1.0\n" for s in range(1, 9)))
    assert rundir.cut_log(log, 6) == 2
    with open(log) as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == list(range(1, 7))


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 64")])
def test_full_disk_is_one_line_and_leaves_the_old_checkpoint(tmp_path, monkeypatch, error):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"previous")

    def writer(state, tmp):
        Path(tmp).write_bytes(b"half")
        raise error
    if isinstance(error, RuntimeError):   # torch's message does not say why: the free space does
        monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: type("U", (), {"free": 10}))
    state = {"w": torch.zeros(1 << 18)}
    with pytest.raises(rundir.RunDirError, match=r"disk full while writing .*checkpoint.pt \(1 MB"):
        rundir.save_atomic(state, path, save=writer)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_resume_falls_back_to_the_newest_complete_epoch_checkpoint(tmp_path):
    _checkpoint(tmp_path / "checkpoint_epoch001.pt", step=5)
    _checkpoint(tmp_path / "checkpoint_epoch002.pt", step=10)
    (tmp_path / "checkpoint_epoch003.pt").write_bytes(b"PK\x03\x04 cut short")
    path, ckpt, note = rundir.resume_checkpoint(tmp_path)
    assert path.name == "checkpoint_epoch002.pt" and ckpt["step"] == 10
    assert "checkpoint.pt does not exist; resuming from checkpoint_epoch002.pt" in note
    assert rundir.resume_checkpoint(tmp_path / "checkpoint_epoch001.pt")[0].name.endswith("001.pt")
    for p in tmp_path.iterdir():
        p.unlink()
    with pytest.raises(rundir.RunDirError, match="no complete checkpoint_epochNNN.pt"):
        rundir.resume_checkpoint(tmp_path)


def test_read_only_run_directory_is_refused_up_front(tmp_path, monkeypatch):
    def erofs(self, data):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(Path, "write_bytes", erofs)
    with pytest.raises(rundir.RunDirError, match="cannot write to the run directory .*Read-only"):
        rundir.check_writable(tmp_path / "run")


# ---------------------------------------------------------------- 15: parent death

def test_stop_request_notices_its_parent_is_killed(tmp_path):
    """parent -> child; kill -9 the parent: the child's StopRequest reports it, and the child
    ends by itself (after what would be its checkpoint)."""
    child = ("import sys, time\nfrom fastneg.rundir import StopRequest\n"
             "s = StopRequest(watch_parent=True)\nprint('ready', flush=True)\n"
             "while not s.requested():\n    time.sleep(0.05)\n"
             "open(sys.argv[1], 'w').write(s.reason)\n")
    parent = ("import subprocess, sys, time\n"
              f"subprocess.Popen([sys.executable, '-c', {child!r}, sys.argv[1]])\n"
              "time.sleep(600)\n")
    done = tmp_path / "stopped"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", parent, str(done)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (done.exists() or time.monotonic() > deadline):
            if _children(p.pid):
                break
            time.sleep(0.1)
        time.sleep(2)     # the child imports fastneg and records its parent
    finally:
        p.kill()
        p.wait()
    deadline = time.monotonic() + 120
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "is gone" in done.read_text()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "State:\tZ" in status


# ---------------------------------------------------------------- 2: build-bank killed

def _build_and_die(data, out, pids_file):
    from fastneg.texture import BankSpec, build_bank

    def die(done, rows):
        pids_file.write_text(" ".join(str(c.pid) for c in multiprocessing.active_children()))
        os.kill(os.getpid(), signal.SIGKILL)
    build_bank(data, out, BankSpec(size=40, exemplar=24, seed=3), workers=2, chunk=1,
               progress=False, on_chunk=die)


@pytest.mark.slow
def test_killed_bank_build_leaves_no_workers_and_resumes(folder, tmp_path):
    from fastneg.texture import BankSpec, build_bank
    out, pids = tmp_path / "bank", tmp_path / "pids"
    p = multiprocessing.get_context("fork").Process(target=_build_and_die,
                                                     args=(folder, out, pids))
    p.start()
    p.join(600)
    assert p.exitcode == -signal.SIGKILL
    workers = [int(x) for x in pids.read_text().split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 60
    while not all(_gone(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(w) for w in workers), "pool workers outlived the killed build"
    report = build_bank(folder, out, BankSpec(size=40, exemplar=24, seed=3), workers=1,
                        resume=True, progress=False)
    assert report.rows == 8 and 0 < report.built < 8


# ---------------------------------------------------------------- the trainer (3, 5, 7, 8, 15)

TRAIN = ["--loader", "torch", "--workers", "0", "--device", "cpu", "--size", "32",
         "--batch-size", "8", "--moco-k", "32", "--dim", "8", "--mlp-hidden", "16",
         "--log-every", "1"]


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """16 images in 2 classes at 32 px: 2 steps per epoch at batch 8."""
    root = tmp_path_factory.mktemp("train") / "data"
    _images(root / "train" / "a", 8)
    _images(root / "train" / "b", 8, seed=1)
    return root


@pytest.fixture(scope="module")
def trainer():
    from fastneg.train import loop
    return loop


@pytest.fixture
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    yield
    torch.set_num_threads(len(os.sched_getaffinity(0)))


def _log_steps(run):
    with open(run / "log.csv") as fh:
        return [int(r["step"]) for r in csv.DictReader(fh)]


@pytest.mark.slow
def test_trainer_run_directory_survives_kills_and_a_second_trainer(trainer, train_data, tmp_path,
                                                                   single_process, capsys):
    run = tmp_path / "run"
    common = ["--data", str(train_data), *TRAIN]
    trainer.main([*common, "--max-steps", "3", "--save-every", "1", "--out", str(run)])
    assert (run / "checkpoint_epoch001.pt").exists() and _log_steps(run) == [1, 2, 3]
    # What kill -9 leaves: log rows after the last checkpoint, a half-written tmp checkpoint.
    with open(run / "log.csv", "a") as fh:
        fh.write("4,1,1.0,0.1,1,1,1\n5,2,1.0,0.1,1,1,1\n")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / f".checkpoint.pt.tmp-{dead.pid}").write_bytes(b"half")
    # A new run into it is refused; a second trainer on it names the first one's PID.
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        trainer.main([*common, "--max-steps", "3", "--out", str(run)])
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "sys.path.insert(0, sys.argv[2])\n"
                               "from fastneg.fs import hold_lock\n"
                               "f = hold_lock(sys.argv[1], 'x')\nprint('held', flush=True)\n"
                               "time.sleep(600)\n", str(run / ".lock"), str(ROOT)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FileExistsError, match=f"PID {holder.pid}"):
            trainer.main(["--resume", str(run), "--max-steps", "4"])
    finally:
        holder.kill()
        holder.wait()
    # checkpoint.pt lost: resume falls back to epoch 1 (step 2) and says so; the log is cut.
    (run / "checkpoint.pt").unlink()
    capsys.readouterr()
    trainer.main(["--resume", str(run), "--max-steps", "4"])
    assert "resuming from checkpoint_epoch001.pt" in capsys.readouterr().err
    assert _log_steps(run) == [1, 2, 3, 4]
    assert not list(run.glob(".*.tmp-*")) and read_checkpoint(run / "checkpoint.pt")["step"] == 4
    # args that do not fit the weights: one error naming the file.
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["args"]["dim"] = 12
    torch.save(state, run / "checkpoint.pt")
    with pytest.raises(ValueError, match="checkpoint.pt does not fit the model"):
        trainer.main(["--resume", str(run), "--max-steps", "5"])


@pytest.mark.slow
def test_trainer_mid_run_decode_failure_is_one_line(trainer, train_data, tmp_path,
                                                    single_process, capsys):
    """A JPEG whose header passes the pre-flight check but whose Huffman table is bogus."""
    data = tmp_path / "data"
    import shutil
    shutil.copytree(train_data, data)
    bad = bytearray((data / "train" / "a" / "0.jpg").read_bytes())
    dht = bad.find(b"\xff\xc4")
    bad[dht + 5:dht + 21] = b"\xff" * 16          # impossible code counts
    (data / "train" / "a" / "0.jpg").write_bytes(bytes(bad))
    assert inspect_file(data / "train" / "a" / "0.jpg")[0] is None
    with pytest.raises(SystemExit) as e:
        trainer.cli("train/moco.py", ["--data", str(data), *TRAIN, "--max-steps", "4",
                                      "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    last = "train/moco.py: error:" + err.rpartition("train/moco.py: error:")[2]  # after the bar
    assert last.startswith("train/moco.py: error: 1 file(s) passed the pre-flight check but "
                           "failed to decode: ") and last.count("\n") == 1
    assert "0.jpg" in last and "skip_bad" not in last


@pytest.mark.slow
def test_trainer_stops_with_a_checkpoint_when_torchrun_agent_is_killed(
        trainer, train_data, tmp_path, single_process):
    """A second trainer on the same --out is refused naming the first; killing the first one's
    torchrun agent makes its worker write a checkpoint and end."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(SCRIPT), "--data", str(train_data), *TRAIN, "--epochs", "1000",
           "--save-every", "1000", "--out", str(run)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr", "w") as err:
        agent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not (
                    (run / "log.csv").exists() and len(_log_steps(run)) >= 2):
                assert agent.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
                time.sleep(0.2)
            workers = _children(agent.pid)
            assert len(workers) == 1
            with pytest.raises(FileExistsError, match=f"in use by another process "
                                                      f"\\(PID {workers[0]}\\)"):
                trainer.main(["--data", str(train_data), *TRAIN, "--max-steps", "2",
                              "--out", str(run)])
            agent.kill()                             # kill -9 of the agent, not of the worker
            agent.wait()
        finally:
            agent.kill()
    deadline = time.monotonic() + 300
    while not all(_gone(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(w) for w in workers), "the worker trains on as an orphan"
    step = read_checkpoint(run / "checkpoint.pt")["step"]
    assert 2 <= step < 2000
    assert "torchrun's agent) is gone" in (tmp_path / "stderr").read_text()


@pytest.mark.slow
def test_trainer_ffcv_conversion_failure_is_one_error(trainer, train_data, tmp_path,
                                                      single_process):
    """--loader ffcv converts on first use; a failing conversion is a ValueError (one line from
    the script), and leaves no .beton.partial in the data folder."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(train_data, data)
    (data / "train" / "a" / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="conversion of .* failed"):
        trainer.main(["--data", str(data), *TRAIN, "--loader", "ffcv", "--max-steps", "1",
                      "--out", str(tmp_path / "run")])
    assert not list(data.glob("*.partial")) and not (data / "train.beton").exists()

"""fastneg.fs: files replaced whole or not at all, folders staged beside their destination,
leftovers of killed writers removed, and the two file locks (refuse-if-held, wait-your-turn)."""
import os
import subprocess
import sys
import time

import pytest

from fastneg import fs
from fastneg.fs import atomic_file, staged_dir, write_bytes_atomic


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_atomic_file_swaps_in_whole_files_only(tmp_path):
    target = tmp_path / "state.bin"
    write_bytes_atomic(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    with atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]   # no temporary left


def test_lock_names_a_live_holder_and_takes_over_a_stale_one(tmp_path):
    lock = tmp_path / ".lock"
    holder = ("import fcntl, sys, time\nf = open(sys.argv[1], 'a+')\n"
              "fcntl.flock(f, fcntl.LOCK_EX)\nf.truncate(0)\nf.write(sys.argv[2])\nf.flush()\n"
              "print('held', flush=True)\ntime.sleep(600)\n")
    # A live holder: its PID in the error.
    p = subprocess.Popen([sys.executable, "-c", holder, str(lock), "PID"], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        lock.write_text(str(p.pid))          # what a holder writes
        with pytest.raises(FileExistsError, match=f"in use by another process \\(PID {p.pid}\\)"):
            fs.hold_lock(lock, "run directory X")
    finally:
        p.kill()
        p.wait()
    # Held by an orphan whose recorded holder is gone (a dead PID): taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    p = subprocess.Popen([sys.executable, "-c", holder, str(lock), str(dead.pid)],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        f = fs.hold_lock(lock, "run directory X")
        assert lock.read_text().strip() == str(os.getpid())
        f.close()
    finally:
        p.kill()
        p.wait()


def test_stale_tmp_files_of_dead_processes_are_removed(tmp_path):
    stale = tmp_path / f".checkpoint.pt.tmp-{_dead_pid()}"
    partial = tmp_path / f".data.partial-{_dead_pid()}"
    partial.mkdir()
    (partial / "f").write_bytes(b"x")
    mine = tmp_path / f".checkpoint.pt.tmp-{os.getpid()}"
    stale.write_bytes(b"x")
    mine.write_bytes(b"x")
    assert sorted(fs.remove_stale_temporaries(tmp_path)) == sorted([stale, partial])
    assert mine.exists() and not stale.exists() and not partial.exists()


def test_atomic_file_syncs_the_file_and_its_folder_before_and_after_the_rename(tmp_path,
                                                                               monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(fs.os, "fsync", lambda fd: calls.append(("fsync", os.readlink(
        f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(fs.os, "replace", lambda a, b: calls.append(("replace", str(b))) or
                        real_replace(a, b))
    target = tmp_path / "x.bin"
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"data")
    real = [str(p.resolve()) for p in (tmp, target, tmp_path)]
    assert calls == [("fsync", real[0]), ("replace", str(target)), ("fsync", real[2])]
    assert target.read_bytes() == b"data"


def test_staged_dir_replaces_a_folder_only_when_whole(tmp_path):
    out = tmp_path / "set"
    with staged_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with staged_dir(out) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("killed mid-build")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_wait_lock_makes_the_second_taker_wait(tmp_path):
    path = tmp_path / "index.lock"
    child = ("import sys, time\nsys.path.insert(0, sys.argv[2])\nfrom fastneg.fs import wait_lock\n"
             "t = time.monotonic()\nfd = wait_lock(sys.argv[1])\n"
             "print(time.monotonic() - t, flush=True)\n")
    fd = fs.wait_lock(path)
    try:
        p = subprocess.Popen([sys.executable, "-c", child, str(path), os.getcwd()],
                             stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert p.poll() is None          # still waiting for our lock
    finally:
        os.close(fd)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0 and float(out) > 0.5

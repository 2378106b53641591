"""Tar shards (WebDataset layout): `fastneg convert --to wds`, the sources the loaders take,
and rank sharding (fastneg.data.shards, fastneg.loaders.shards).

Data: the shapes train split, 40 JPEGs of 32 px in 10 classes, converted once; and "equal"
shards written by hand, 8 shards of 5 samples without a manifest (foreign shards: dataset
index = position), so that 4 ranks x batches of 5 read every sample exactly once.
"""
from __future__ import annotations

import functools
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from fastneg import cli
from fastneg.data import shards as wds
from fastneg.data.imagefolder import scan_image_folder
from fastneg.data.synthetic import DatasetSpec, make_dataset
from fastneg.loaders import available_kinds, build_loader
from fastneg.loaders.shards import ShardPlan, assign_shards

SIZE = 32
KINDS = [pytest.param("torch"),   # DALI: a pipeline per rank and epoch, ~20 s on 2 cores
         pytest.param("dali", marks=[pytest.mark.slow, pytest.mark.skipif(
             "dali" not in available_kinds(), reason="dali missing")])]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    train = make_dataset(root / "shapes", DatasetSpec(images_per_class=4, size=32),
                         progress=False) / "train"
    converted = root / "converted"
    wds.write_shards(train, converted, shard_size="10KB", progress=False)
    images = scan_image_folder(train)
    equal = root / "equal"
    equal.mkdir()
    formats = {i: "jpg" for i in range(len(images))}
    for k in range(8):
        wds.write_shard(equal / f"part-{k:02d}.tar", images, np.arange(5 * k, 5 * k + 5), formats)
    return root, train, converted, equal, images


def members(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def epoch_indices(loader, epoch: int) -> list[list[int]]:
    loader.set_epoch(epoch)
    return [b.indices.tolist() for b in loader]


# ----------------------------------------------------------------- names and sizes

def test_sizes_and_brace_patterns():
    assert wds.parse_size("1GB") == 10 ** 9 and wds.parse_size("64KiB") == 65536
    assert wds.parse_size("1000") == 1000
    for bad in ("", "1XB", "-3MB", "0"):
        with pytest.raises(ValueError, match="--shard-size"):
            wds.parse_size(bad)
    assert wds.expand_braces("a/train-{0008..0011}.tar") == [
        f"a/train-{k:04d}.tar" for k in range(8, 12)]
    assert wds.expand_braces("{0..1}-{8..9}") == ["0-8", "0-9", "1-8", "1-9"]
    assert wds.expand_braces("pipe:cat x.tar") == ["pipe:cat x.tar"]
    assert wds.index_name("pipe:curl -s http://h/a-0001.tar") == "pipe:curl -s http://h/a-0001.idx"
    assert wds.split_key("dir/k.0001.seg.jpg") == ("dir/k", "0001.seg.jpg")


def test_shards_go_to_the_least_loaded_rank():
    counts = np.array([5, 5, 5, 5, 3, 9])
    parts = assign_shards(counts, np.array([5, 0, 1, 2, 3, 4]), 2)
    assert [p.tolist() for p in parts] == [[5, 2, 4], [0, 1, 3]]   # loads 17 and 15
    assert sorted(np.concatenate(parts).tolist()) == list(range(6))


# ----------------------------------------------------------------- convert --to wds

def test_convert_writes_the_webdataset_layout(data):
    root, train, converted, _, images = data
    manifest = json.loads((converted / wds.MANIFEST).read_text())
    tars = sorted(converted.glob("*.tar"))
    assert [s["name"] for s in manifest["shards"]] == [t.name for t in tars]
    assert len(tars) > 3 and manifest["samples"] == len(images) == 40
    seen = {}
    for t in tars:
        found = members(t)
        names = [n for n, _ in found]
        assert names[0::2] == [n.replace(".cls", ".jpg") for n in names[1::2]]  # jpg, cls pairs
        for (name, payload), (_, label) in zip(found[0::2], found[1::2]):
            i = int(name.split(".")[0])
            assert payload == images.path(i).read_bytes()          # the file, unchanged
            assert int(label) == images.labels[i]
            seen[i] = t.name
        # DALI's index: one line per sample, offsets pointing at each member's bytes
        lines = t.with_suffix(".idx").read_text().splitlines()
        assert lines[0] == f"v1.2 {len(found) // 2}"
        blob = t.read_bytes()
        for line, (name, payload) in zip(lines[1:], found[0::2]):
            ext, offset, size, member = line.split()[:4]
            assert (ext, member) == ("jpg", name)
            assert blob[int(offset):int(offset) + int(size)] == payload
    assert sorted(seen) == list(range(40))
    # spread: every shard mixes classes, and sizes are about equal (the last may be smaller)
    sizes = [t.stat().st_size for t in tars]
    assert max(sizes[:-1]) <= 2 * min(sizes[:-1])
    first = [int(n.split(".")[0]) for n, _ in members(tars[0])[0::2]]
    assert len({images.labels[i] for i in first}) > 1


def test_dali_index_equals_dalis_own_tool(data):
    tool = shutil.which("wds2idx") or str(Path(sys.executable).with_name("wds2idx"))
    if not os.path.exists(tool):
        pytest.skip("DALI's wds2idx is not installed")
    _, _, converted, _, _ = data
    tar = sorted(converted.glob("*.tar"))[1]
    out = tar.parent.parent / "ref.idx"
    subprocess.run([tool, str(tar), str(out)], check=True, capture_output=True)
    assert out.read_text() == tar.with_suffix(".idx").read_text()


@pytest.mark.skipif("dali" not in available_kinds(), reason="dali missing")
def test_dalis_webdataset_reader_reads_the_shards(data):
    from nvidia.dali import fn, pipeline_def

    _, _, converted, _, images = data
    tars = sorted(converted.glob("*.tar"))
    total = sum(s["samples"] for s in json.loads((converted / wds.MANIFEST).read_text())[
        "shards"])

    @pipeline_def(batch_size=total, num_threads=1, device_id=None)
    def reader():
        return tuple(fn.readers.webdataset(paths=[str(t) for t in tars],
                                     index_paths=[str(t.with_suffix(".idx")) for t in tars],
                                     ext=["jpg", "cls"], missing_component_behavior="error"))

    pipe = reader()
    pipe.build()
    jpgs, labels = pipe.run()
    got = sorted((bytes(np.asarray(j)), int(bytes(np.asarray(c)))) for j, c in zip(jpgs, labels))
    want = sorted((images.path(i).read_bytes(), int(images.labels[i])) for i in range(40))
    assert got == want


def test_convert_is_staged_and_resumes(data, tmp_path, monkeypatch):
    _, train, converted, _, _ = data
    out = tmp_path / "out"
    real, calls = wds.write_shard, []

    def interrupted(path, *a):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(path)
        real(path, *a)

    monkeypatch.setattr(wds, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        wds.write_shards(train, out, shard_size="10KB", progress=False)
    assert not out.exists()                                  # nothing that looks complete
    monkeypatch.setattr(wds, "write_shard", real)
    info = wds.write_shards(train, out, shard_size="10KB", progress=False)
    assert info["resumed_shards"] == 2
    for t in sorted(converted.glob("*.tar")):
        assert (out / t.name).read_bytes() == t.read_bytes()     # as if never interrupted
    # another seed spreads the images differently; an existing OUT needs --force
    with pytest.raises(FileExistsError, match="--force"):
        wds.write_shards(train, out, progress=False)
    other = wds.write_shards(train, out, shard_size="10KB", seed=1, force=True, progress=False)
    assert members(out / other["shards"][0]["name"]) != members(sorted(converted.glob("*.tar"))[0])


def test_convert_checks_files_first(data, tmp_path, capsys):
    _, train, _, _, images = data
    bad_root = tmp_path / "bad"
    shutil.copytree(train, bad_root)
    victim = bad_root / images.files[3]
    victim.write_bytes(victim.read_bytes()[:100])
    code = cli.main(["convert", "--to", "wds", str(bad_root), str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and victim.name in err and "fastneg convert: error: 1 of 40 files" in err
    assert not (tmp_path / "o").exists()
    assert cli.main(["convert", "--to", "wds", str(bad_root), str(tmp_path / "o"),
                     "--shard-size", "12XB"]) == 2
    assert "--shard-size" in capsys.readouterr().err
    assert cli.main(["convert", "--to", "wds", str(bad_root), str(tmp_path / "o"),
                     "--skip-bad", "--shard-size", "1MB"]) == 0
    manifest = json.loads((tmp_path / "o" / wds.MANIFEST).read_text())
    assert manifest["samples"] == 39 and manifest["bad"][0][1] == images.files[3]


# ----------------------------------------------------------------- rank sharding

@pytest.mark.parametrize("kind", KINDS)
def test_four_ranks_read_every_sample_once_with_equal_steps(data, kind):
    """2 nodes x 2 ranks (global ranks 0..3) over 8 equal shards: the union of one epoch is the
    whole set, no sample on two ranks, every rank the same steps; epochs reshuffle."""
    _, _, _, equal, _ = data
    loaders = [build_loader(kind, equal, batch_size=5, size=SIZE, device="cpu", workers=0,
                            rank=r, world_size=4, seed=3) for r in range(4)]
    assert [len(loader) for loader in loaders] == [2] * 4
    by_epoch = []
    for epoch in range(2):
        per_rank = [epoch_indices(loader, epoch) for loader in loaders]
        assert all(len(b) == 2 and all(len(x) == 5 for x in b) for b in per_rank)
        flat = [sum(b, []) for b in per_rank]
        assert sorted(sum(flat, [])) == list(range(40))           # once, all of it
        for r, mine in enumerate(flat):                           # whole shards per rank
            assert len({i // 5 for i in mine}) == 2, (r, mine)
        by_epoch.append(flat)
    assert by_epoch[0] != by_epoch[1]
    assert [set(x) for x in by_epoch[0]] != [set(x) for x in by_epoch[1]]   # shards reassigned
    again = build_loader(kind, equal, batch_size=5, size=SIZE, device="cpu", workers=0,
                         rank=2, world_size=4, seed=3)
    assert sum(epoch_indices(again, 1), []) == by_epoch[1][2]     # same seed, same order


def test_unequal_shards_drop_or_pad_to_equal_steps(data):
    """Converted shards hold different counts: every rank still runs len(loader) full steps
    (drop_last: the larger ranks leave out their last samples; else the smaller ones pad from
    their own shards), and no sample is read by two ranks."""
    _, _, converted, _, _ = data
    shard_of = {int(n.split(".")[0]): t.name for t in converted.glob("*.tar")
                for n, _ in members(t)[0::2]}
    for drop_last, steps in ((True, 3), (False, 4)):
        loaders = [build_loader("torch", converted, batch_size=3, size=SIZE, device="cpu",
                                workers=0, rank=r, world_size=4, drop_last=drop_last)
                   for r in range(4)]
        assert [len(loader) for loader in loaders] == [steps] * 4
        per_rank = [epoch_indices(loader, 0) for loader in loaders]
        assert all(len(b) == steps and all(len(x) == 3 for x in b) for b in per_rank)
        sets = [set(sum(b, [])) for b in per_rank]
        shard_sets = [{shard_of[i] for i in s} for s in sets]
        for a in range(4):
            for b in range(a + 1, 4):
                assert not sets[a] & sets[b] and not shard_sets[a] & shard_sets[b]
        plan = loaders[0].plan
        counts = [int(plan.shards.counts[p].sum()) for p in plan.assignment(0)]
        for r in range(4):   # drop: the first steps*3 of the stream; pad: the whole of it
            assert len(sets[r]) == min(counts[r], steps * 3)


def test_image_folder_path_shards_by_global_rank(data):
    _, train, _, _, _ = data
    loaders = [build_loader("torch", train, batch_size=5, size=SIZE, device="cpu", workers=0,
                            rank=r, world_size=4) for r in range(4)]
    per_rank = [sum(epoch_indices(loader, 0), []) for loader in loaders]
    assert [len(loader) for loader in loaders] == [2] * 4
    assert sorted(sum(per_rank, [])) == list(range(40))


def test_world_larger_than_the_shard_count_is_refused(data):
    _, _, _, equal, _ = data
    with pytest.raises(ValueError, match="8 shard.*world_size 9"):
        build_loader("torch", equal, batch_size=1, size=SIZE, device="cpu", rank=0,
                     world_size=9)
    with pytest.raises(ValueError, match="ffcv loader reads a .beton"):
        build_loader("ffcv", equal, batch_size=1, size=SIZE, device="cpu")


@pytest.mark.skipif("dali" not in available_kinds(), reason="dali missing")
def test_dali_and_torch_agree_on_shards(data):
    _, _, converted, _, _ = data
    out = {}
    for kind in ("torch", "dali"):
        loader = build_loader(kind, converted, batch_size=4, size=SIZE, device="cpu", workers=1,
                              rank=1, world_size=2, seed=5)
        loader.set_epoch(1)
        out[kind] = list(loader)
    for a, b in zip(out["torch"], out["dali"]):
        assert a.indices.tolist() == b.indices.tolist() and a.labels.tolist() == b.labels.tolist()
        for va, vb in zip(a.views, b.views):
            assert (va.float() - vb.float()).abs().mean() < 6


# ----------------------------------------------------------------- sources

def test_pipe_and_http_sources_read_the_same_samples(data):
    _, _, _, equal, _ = data
    local = build_loader("torch", equal, batch_size=5, size=SIZE, device="cpu", workers=0)
    want = epoch_indices(local, 0)
    piped = build_loader("torch", f"pipe:cat {equal}/part-{{00..07}}.tar", batch_size=5,
                         size=SIZE, device="cpu", workers=0)
    assert epoch_indices(piped, 0) == want
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(equal))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/part-{{00..07}}.tar"
        fetched = build_loader("torch", url, batch_size=5, size=SIZE, device="cpu", workers=0)
        assert epoch_indices(fetched, 0) == want
    finally:
        server.shutdown()
    with pytest.raises(ValueError, match="exited with status"):
        broken = build_loader("torch", "pipe:cat /nonexistent/x-{0..1}.tar", batch_size=1,
                              size=SIZE, device="cpu", workers=0)
        epoch_indices(broken, 0)


# ----------------------------------------------------------------- bad shards

def _copy_equal(data, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(data[3], out)
    return out


def _rewrite_without_label(tar_path: Path) -> str:
    """Drop the .cls member of the shard's second sample; returns its key."""
    found = members(tar_path)
    key = found[2][0].split(".")[0]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in found:
            if name != f"{key}.cls":
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    tar_path.write_bytes(buf.getvalue())
    return key


@pytest.mark.parametrize("damage", ["truncated", "no_label", "vanished"])
def test_bad_shards_one_line_or_a_counted_skip(data, tmp_path, damage):
    root = _copy_equal(data, tmp_path)
    kw = dict(batch_size=5, size=SIZE, device="cpu", workers=0, rank=0, world_size=2,
              shuffle=False)
    mine = build_loader("torch", root, **kw).plan.assignment(0)[0]
    # the victim: rank 0's last shard (still unopened when its first batch is out)
    expect = f"part-{int(mine[-1]):02d}.tar"
    victim = root / expect
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:3000])
    elif damage == "no_label":
        expect = _rewrite_without_label(victim)

    def run(skip_bad):
        loader = build_loader("torch", root, skip_bad=skip_bad, **kw)
        loader.set_epoch(0)
        batches = []
        for b in loader:
            batches.append(b.indices.tolist())
            if damage == "vanished" and victim.exists():
                victim.unlink()                 # gone after the epoch began
        return loader, batches

    with pytest.raises(ValueError) as err:
        run(False)
    message = str(err.value)
    assert expect in message and "\n" not in message and "skip" in message
    if damage == "vanished":
        shutil.copy(data[3] / victim.name, victim)
    loader, batches = run(True)
    assert len(batches) == len(loader) == 4 and all(len(b) == 5 for b in batches)
    assert loader.skipped >= 1 and expect in loader.bad_files[0][0] + loader.bad_files[0][1]
    assert len(set(sum(batches, []))) < 20          # padded from the rank's other shards


@pytest.mark.skipif("dali" not in available_kinds(), reason="dali missing")
def test_dali_skips_a_sample_that_fails_to_decode(data, tmp_path):
    root = _copy_equal(data, tmp_path)
    victim = root / "part-01.tar"
    found = members(victim)
    name, payload = found[0]
    dht = payload.find(b"\xff\xc4")              # a bogus Huffman table: only a decoder sees it
    broken = payload[:dht + 5] + b"\xff" * 16 + payload[dht + 21:]
    blob = victim.read_bytes()
    start = blob.find(payload)
    victim.write_bytes(blob[:start] + broken + blob[start + len(broken):])
    kw = dict(batch_size=5, size=SIZE, device="cpu", workers=1, shuffle=False)
    with pytest.raises(RuntimeError, match=name.split(".")[0]):
        epoch_indices(build_loader("dali", root, **kw), 0)
    loader = build_loader("dali", root, skip_bad=True, **kw)
    batches = epoch_indices(loader, 0)
    assert [len(b) for b in batches] == [5] * 8 and 5 not in sum(batches, [])
    assert loader.skipped == 1


# ----------------------------------------------------------------- 2 nodes x 2 ranks, gloo

def _rank_process(rank: int, port: int, paths: tuple[str, str], result: str) -> None:
    """One of the 2 x 2 ranks: the environment torchrun would give it, gloo, one epoch of each
    path, the seen indices all-gathered; rank 0 writes them to `result`."""
    code = 1
    try:
        import torch.distributed as dist
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank % 2), "WORLD_SIZE": "4",
                           "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": str(rank // 2),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        dist.init_process_group("gloo", init_method="env://")
        out = {}
        for name, data in zip(("shards", "folder"), paths):
            loader = build_loader("torch", data, batch_size=5, size=16, device="cpu", workers=0,
                                  rank=dist.get_rank(), world_size=dist.get_world_size(), seed=7)
            loader.set_epoch(1)
            seen = [b.indices.tolist() for b in loader]
            every = [None] * 4
            dist.all_gather_object(every, {"steps": len(seen), "seen": seen,
                                           "local": int(os.environ["LOCAL_RANK"])})
            out[name] = every
        if rank == 0:
            Path(result).write_text(json.dumps(out))
        dist.destroy_process_group()
        code = 0
    finally:
        os._exit(code)


@pytest.mark.slow
def test_two_nodes_of_two_ranks_under_gloo(data, tmp_path):
    """Four processes with RANK, LOCAL_RANK, WORLD_SIZE set by hand as torchrun would on two
    nodes (forked from this one, which has everything imported): the all-gathered samples of
    one epoch cover the set once on both paths, every rank running the same steps."""
    import multiprocessing

    _, train, _, equal, _ = data
    result = tmp_path / "result.json"
    port = 29500 + os.getpid() % 2000
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_process, args=(r, port, (str(equal), str(train)),
                                                     str(result))) for r in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 4
    out = json.loads(result.read_text())
    for name in ("shards", "folder"):
        every = out[name]
        assert [e["local"] for e in every] == [0, 1, 0, 1]
        assert [e["steps"] for e in every] == [2] * 4
        seen = [i for e in every for batch in e["seen"] for i in batch]
        assert sorted(seen) == list(range(40)), name


def test_plan_steps_follow_drop_last(data):
    _, _, _, equal, _ = data
    from fastneg.data.shards import resolve_shards
    from fastneg.loaders.common import LoaderConfig
    shards = resolve_shards(equal)
    for drop_last, bs, steps in ((True, 3, 3), (False, 3, 4), (True, 10, 1), (False, 10, 1)):
        cfg = LoaderConfig(batch_size=bs, device="cpu", world_size=4, drop_last=drop_last)
        assert ShardPlan(shards, cfg, []).steps == steps


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_follows_long_names_and_checks_headers(fmt):
    names = ["a/" + "x" * 120 + ".jpg", "a/" + "x" * 120 + ".cls", "b.jpg", "b.cls"]
    if fmt == tarfile.USTAR_FORMAT:
        names[:2] = ["d" * 90 + "/" + "x" * 90 + ".jpg", "d" * 90 + "/" + "x" * 90 + ".cls"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)                      # a non-file member is skipped
        for k, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = k + 1000
            tar.addfile(info, io.BytesIO(bytes([k]) * info.size))
    blob = buf.getvalue()
    got = list(wds.iter_tar(io.BytesIO(blob), "t.tar"))
    assert [k for k, _ in got] == [names[0].rsplit(".", 1)[0], "b"]
    assert got[0][1] == {"jpg": b"\0" * 1000, "cls": b"\1" * 1001}
    assert got[1][1]["cls"] == b"\3" * 1003
    last_header = blob.rfind(b"b.cls") // 512 * 512
    damaged = blob[:last_header + 130] + b"9" + blob[last_header + 131:]   # its size field
    for cut in (blob[:len(blob) // 2], blob[:last_header], blob[:last_header + 700], damaged):
        with pytest.raises(wds.ShardError, match="t.tar.*(truncated|damaged)"):
            list(wds.iter_tar(io.BytesIO(cut), "t.tar"))


def test_device_decode_path_reads_shards_like_the_cpu_path(data):
    """The GPU path's code (batched decode + matrix crops, sizes from the stream) run on CPU
    tensors: the same samples and, within rounding, the same crops as the worker path."""
    from fastneg.loaders.common import LoaderConfig
    from fastneg.loaders.shards_torch import ShardLoader

    _, _, converted, _, _ = data
    cfg = LoaderConfig(batch_size=4, size=SIZE, device="cpu", workers=0, seed=2)
    cpu, dev = ShardLoader(converted, cfg), ShardLoader(converted, cfg, device_decode=True)
    for a, b in zip(list(cpu), list(dev)):
        assert a.indices.tolist() == b.indices.tolist() and a.labels.tolist() == b.labels.tolist()
        for va, vb in zip(a.views, b.views):
            assert (va.float() - vb.float()).abs().max() <= 2


@pytest.fixture(scope="module")
def bank(data):
    from fastneg.texture import BankSpec, build_bank

    root, train = data[:2]
    build_bank(train, root / "bank", BankSpec(size=24, exemplar=16, seed=3), workers=1,
               progress=False)
    return root / "bank"


@pytest.mark.slow   # texture synthesis of 40 images: ~20 s on 2 shared cores
@pytest.mark.parametrize("kind", KINDS)
def test_textures_are_fetched_by_key(data, bank, kind):
    """A JPEG texture bank of the source folder pairs with fastneg's shards through the keys
    (dataset indices): the same textures, crops and flips as on the folder."""
    _, train, converted, equal, _ = data
    kw = dict(batch_size=4, size=SIZE, device="cpu", workers=1, texture_bank=bank, seed=4)
    folder = build_loader("torch", train, drop_last=False, **kw)
    want = {i: t for b in folder for i, t in zip(b.indices.tolist(), b.textures)}
    loader = build_loader(kind, converted, **kw)
    got = [(i, t) for b in loader for i, t in zip(b.indices.tolist(), b.textures)]
    assert len(got) == len(loader) * 4
    tolerance = 0 if kind == "torch" else 3
    for i, t in got:
        assert (t.float() - want[i].float()).abs().mean() <= tolerance, i
    with pytest.raises(ValueError, match="dataset indices"):
        build_loader(kind, equal, **kw)


def test_what_counts_as_shards(data, tmp_path):
    root, train, converted, equal, _ = data
    assert wds.looks_like_shards(converted) and wds.looks_like_shards(equal)
    assert wds.looks_like_shards("pipe:cat a.tar") and wds.looks_like_shards("x-{0..3}.tar")
    assert not wds.looks_like_shards(train) and not wds.looks_like_shards(root / "x.beton")
    dataset = tmp_path / "IN"                     # ROOT/train plus the downloaded archive
    (dataset / "train" / "a").mkdir(parents=True)
    (dataset / "ILSVRC2012_img_train.tar").write_bytes(b"")
    assert not wds.looks_like_shards(dataset)

"""Textures as a third view: every loader decodes the batch's textures from a JPEG texture bank
with its images and crops + flips each as fastneg.kernels.sample_textures would draw it; the
torch loader's device path (background decode thread, batched crops) run on the CPU."""
from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import resized_crop

from fastneg.data import convert
from fastneg.data.imagefolder import scan_image_folder
from fastneg.data.synthetic import DatasetSpec, make_dataset
from fastneg.kernels.textures import draw_texture_params
from fastneg.loaders import KINDS, available_kinds, build_loader
from fastneg.loaders.common import LoaderConfig, texture_params
from fastneg.loaders.torch_loader import Loader as TorchLoader
from fastneg.loaders.torch_loader import _crop_into, prefetched, resized_crops
from fastneg.texture import BankSpec, build_bank
from fastneg.texture.store import BankReader

SIZE, BS, BANK_SIZE = 32, 8, 40
SEED = 7
per_kind = pytest.mark.parametrize("kind", [
    pytest.param(k, marks=pytest.mark.skipif(k not in available_kinds(), reason=f"{k} missing"))
    for k in KINDS])


def _convert(src, out, **kw):
    try:
        return convert.convert_to_beton(src, out, progress=False, workers=1, **kw)
    except (ValueError, TypeError) as e:
        return e


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader_textures")
    make_dataset(root / "shapes", DatasetSpec(images_per_class=2, size=32), progress=False)
    train = root / "shapes" / "train"
    bank = root / "bank"
    build_bank(train, bank, BankSpec(size=BANK_SIZE, exemplar=24, seed=3), workers=1,
               progress=False)
    beton = None
    if "ffcv" in available_kinds():
        with ThreadPoolExecutor(1) as pool:    # FFCV writes in a child process
            beton = pool.submit(_convert, train, root / "train.beton",
                                texture_bank=bank).result()
    return SimpleNamespace(train=train, bank=bank, beton=beton, images=scan_image_folder(train))


def reference_textures(bank: Path, indices, epoch: int) -> torch.Tensor:
    """uint8 [N, SIZE, SIZE, 3]: each sample's texture decoded with PIL, cropped and flipped by
    the parameters sample_textures draws for (sample = dataset index, step = epoch)."""
    reader = BankReader(bank)
    params = draw_texture_params(int(max(indices)) + 1, BANK_SIZE, BANK_SIZE, seed=SEED,
                                 step=epoch)
    out = []
    for i in indices:
        enc = reader.encoded(int(reader.rows_for([i])[0])).tobytes()
        img = torch.from_numpy(np.asarray(Image.open(io.BytesIO(enc)).convert("RGB")).copy())
        top, left, h, w, flip = params[i].tolist()
        crop = resized_crop(img.permute(2, 0, 1), top, left, h, w, [SIZE, SIZE], antialias=True)
        out.append((crop.flip(-1) if flip else crop).permute(1, 2, 0))
    return torch.stack(out)


def test_texture_params_are_sample_textures_draws():
    idx = np.array([0, 5, 17, 3], np.int64)
    for epoch in (0, 4):
        want = draw_texture_params(18, BANK_SIZE, BANK_SIZE, seed=SEED, step=epoch)[idx]
        np.testing.assert_array_equal(texture_params(SEED, epoch, idx, BANK_SIZE), want)


@pytest.mark.slow
@per_kind
def test_texture_negatives_through_each_loader(data, kind):
    source = data.train
    if kind == "ffcv":
        assert isinstance(data.beton, Path), f"conversion failed: {data.beton}"
        source = data.beton
    loader = build_loader(kind, source, batch_size=BS, size=SIZE, device="cpu", seed=SEED,
                          workers=1 if kind != "ffcv" else None, drop_last=False,
                          texture_bank=data.bank)
    # Resampling filters differ (FFCV: OpenCV INTER_AREA); the grey block textures' hard edges
    # make that up to ~7 levels of mean error per texture here.
    tolerance = {"torch": 1.0, "dali": 4.0, "ffcv": 8.0}[kind]
    seen = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        for batch in loader:
            assert batch.textures is not None
            assert batch.textures.shape == (len(batch.indices), SIZE, SIZE, 3)
            assert batch.textures.dtype == torch.uint8
            idx = batch.indices.tolist()
            ref = reference_textures(data.bank, idx, epoch).float()
            err = (batch.textures.float() - ref).abs().mean(dim=(1, 2, 3))
            assert err.max() <= tolerance, (kind, epoch, err)
            seen += idx
    assert sorted(seen) == sorted(list(range(len(data.images))) * 2)


def test_loaders_without_a_bank_give_no_textures(data):
    loader = build_loader("torch", data.train, batch_size=BS, size=SIZE, device="cpu", workers=0)
    assert next(iter(loader)).textures is None


def test_a_raw_bank_is_refused_by_the_loaders(data, tmp_path):
    raw = tmp_path / "raw"
    build_bank(data.train, raw, BankSpec(size=BANK_SIZE, exemplar=24, seed=3, storage="raw",
                                         limit=10), workers=1, progress=False)
    with pytest.raises(ValueError, match="stored raw"):
        build_loader("torch", data.train, batch_size=BS, size=SIZE, device="cpu", workers=0,
                     texture_bank=raw)


# ---------------------------------------------------------------- the torch device path on CPU

@pytest.mark.slow
def test_device_path_on_cpu_equals_the_worker_path(data):
    cfg = LoaderConfig(batch_size=BS, size=SIZE, device="cpu", seed=SEED, workers=1,
                       drop_last=False, texture_bank=str(data.bank), views=3)
    plain, device_path = TorchLoader(data.train, cfg), TorchLoader(data.train, cfg,
                                                                   device_decode=True)
    for epoch in (0, 2):
        plain.set_epoch(epoch)
        device_path.set_epoch(epoch)
        pairs = list(zip(plain, device_path))
        assert len(pairs) == len(plain)
        for a, b in pairs:
            assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
            for va, vb in zip(a.views + (a.textures,), b.views + (b.textures,)):
                assert (va.int() - vb.int()).abs().max() <= 1


def test_batched_crops_equal_per_image_crops():
    g = np.random.default_rng(0)
    shapes = [(60, 80), (224, 300), (31, 40), (7, 5), (97, 64)]
    images = [torch.from_numpy(g.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in shapes]
    boxes = []
    for _ in range(2):
        rows = []
        for h, w in shapes:
            ch, cw = int(g.integers(1, h + 1)), int(g.integers(1, w + 1))
            rows.append((int(g.integers(0, h - ch + 1)), int(g.integers(0, w - cw + 1)), ch, cw))
        boxes.append(np.array(rows, np.int64))
    flips = np.array([0, 1, 1, 0, 1], bool)
    for size in (16, 48):          # down- and up-sampling
        want = torch.empty((2, len(images), size, size, 3), dtype=torch.uint8)
        _crop_into(want, images, boxes, size)
        got = resized_crops(images, boxes, size)
        assert got.shape == want.shape
        assert (got.int() - want.int()).abs().max() <= 1
        want = torch.empty((1, len(images), size, size, 3), dtype=torch.uint8)
        _crop_into(want, images, boxes[:1], size, flips)
        assert (resized_crops(images, boxes[:1], size, flips).int() - want.int()).abs().max() <= 1


def test_prefetch_runs_ahead_in_order_and_reports_errors():
    started = []
    gate = threading.Event()

    def prepare(x):
        started.append(x)
        if x == 2:
            gate.wait(5)
        return torch.full((2,), x)

    gen = prefetched(iter(range(6)), prepare, torch.device("cpu"), depth=2)
    first = next(gen)
    assert first.tolist() == [0, 0]
    gate.set()
    assert [int(t[0]) for t in gen] == [1, 2, 3, 4, 5]

    def failing(x):
        if x == 3:
            raise ValueError("bad item 3")
        return x

    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for x in prefetched(iter(range(6)), failing, torch.device("cpu")):
            got.append(x)
    assert got == [0, 1, 2]
    # Left early: the thread stops instead of filling the queue forever.
    gen = prefetched(iter(range(1000)), lambda x: x, torch.device("cpu"), depth=1)
    next(gen)
    gen.close()
    assert not any(t.name == "fastneg-decode" for t in threading.enumerate())


def test_nvjpeg_rejects_fall_back_to_cpu_decode(data, monkeypatch):
    from fastneg.loaders import torch_loader

    def picky(encoded, device):     # a decoder that rejects every batch and every file
        raise RuntimeError("nvJPEG: unsupported")

    monkeypatch.setattr(torch_loader, "_decode_jpeg_gpu", picky)
    cfg = LoaderConfig(batch_size=BS, size=SIZE, device="cpu", seed=SEED, workers=0,
                       drop_last=False)
    batches = list(TorchLoader(data.train, cfg, device_decode=True))
    assert sum(len(b.indices) for b in batches) == len(data.images)


@pytest.mark.cuda
def test_device_path_on_gpu_matches_the_cpu_path(data):
    cfg = dict(batch_size=BS, size=SIZE, seed=SEED, workers=1, drop_last=False,
               texture_bank=data.bank)
    cpu = build_loader("torch", data.train, device="cpu", **cfg)
    gpu = build_loader("torch", data.train, device="cuda", **cfg)
    for a, b in zip(cpu, gpu):
        assert b.views[0].is_cuda and b.textures.is_cuda and b.indices.is_cuda
        assert torch.equal(a.indices, b.indices.cpu())
        for va, vb in zip(a.views + (a.textures,), b.views + (b.textures,)):
            assert (va.float() - vb.cpu().float()).abs().mean() <= 2.0


# ---------------------------------------------------------------- DALI: one pipeline per loader

@pytest.mark.slow
@pytest.mark.skipif("dali" not in available_kinds(), reason="dali missing")
def test_dali_builds_its_pipeline_once(data):
    loader = build_loader("dali", data.train, batch_size=BS, size=SIZE, device="cpu", seed=SEED,
                          workers=1, drop_last=False)
    for epoch in (0, 5, 1):               # any epoch order, as after a resume
        loader.set_epoch(epoch)
        got = [i for b in loader for i in b.indices.tolist()]
        assert got == loader.samples(epoch).tolist()
    assert loader.builds == 1
    # An epoch left early: DALI cannot reset mid-epoch, so the next one rebuilds, correctly.
    loader.set_epoch(2)
    it = iter(loader)
    next(it)
    it.close()
    loader.set_epoch(3)
    assert [i for b in loader for i in b.indices.tolist()] == loader.samples(3).tolist()
    assert loader.builds == 2


def test_default_workers_share_the_cores_between_local_ranks(monkeypatch):
    from fastneg.loaders import common

    monkeypatch.setattr(common, "available_cpus", lambda: 192)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert common.default_workers() == common.MAX_DEFAULT_WORKERS
    monkeypatch.setattr(common, "available_cpus", lambda: 40)
    assert common.default_workers() == 5
    monkeypatch.setattr(common, "available_cpus", lambda: 2)
    assert common.default_workers() == 1
    assert LoaderConfig(batch_size=2).workers == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert common.default_workers() == 2


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["dali", "ffcv"])
def test_gpu_loaders_give_textures_on_the_device(data, kind):
    if kind not in available_kinds():
        pytest.skip(f"{kind} missing")
    source = data.beton if kind == "ffcv" else data.train
    cfg = dict(batch_size=BS, size=SIZE, seed=SEED, drop_last=False, texture_bank=data.bank)
    cpu = build_loader(kind, source, device="cpu", **cfg)
    gpu = build_loader(kind, source, device="cuda", **cfg)
    for epoch in (0, 1):                  # two epochs: one pipeline, FFCV slots reused
        cpu.set_epoch(epoch)
        gpu.set_epoch(epoch)
        for a, b in zip(cpu, gpu):
            assert b.indices.is_cuda and b.labels.is_cuda and b.textures.is_cuda
            assert torch.equal(a.indices, b.indices.cpu())
            assert torch.equal(a.labels, b.labels.cpu())
            assert (a.textures.float() - b.textures.cpu().float()).abs().mean() <= 3.0


@pytest.mark.slow
def test_trainer_texture_negatives_come_from_the_loader(data, tmp_path, monkeypatch):
    """train/moco.py with a JPEG bank: the loader's textures feed the texture NS."""
    from fastneg.train import loop as trainer

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    import fastneg.texture as texture_pkg
    monkeypatch.setattr(texture_pkg.TextureBank, "load", None)   # must not be used
    seen = []
    original = build_loader

    def spy(*args, **kwargs):
        seen.append(kwargs.get("texture_bank"))
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "build_loader", spy)
    out = tmp_path / "run"
    trainer.main(["--data", str(data.train.parent), "--loader", "torch", "--negatives", "texture",
                  "--texture-bank", str(data.bank), "--max-steps", "2", "--device", "cpu",
                  "--workers", "0", "--out", str(out), "--size", "32", "--batch-size", "8",
                  "--moco-k", "16", "--dim", "16", "--mlp-hidden", "32", "--log-every", "1"])
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    assert seen == [str(data.bank)]
    assert (out / "batch.png").exists()


def test_batched_crops_in_size_groups(monkeypatch):
    """A memory budget smaller than the batch splits it into groups; same crops, same order."""
    from fastneg.loaders import torch_loader

    g = np.random.default_rng(1)
    shapes = [(300, 200), (20, 30), (64, 64), (25, 18), (150, 220)]
    images = [torch.from_numpy(g.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in shapes]
    boxes = [np.array([(0, 0, h, w) for h, w in shapes], np.int64),
             np.array([(h // 4, w // 4, h // 2, w // 2) for h, w in shapes], np.int64)]
    flips = np.array([1, 0, 0, 1, 0], bool)
    whole = resized_crops(images, boxes, 24, flips)
    monkeypatch.setattr(torch_loader, "CROP_BUDGET", 12 * 64 * 64 * 2)
    assert torch.equal(resized_crops(images, boxes, 24, flips), whole)
    want = torch.empty((1, len(images), 24, 24, 3), dtype=torch.uint8)
    _crop_into(want, images, boxes[1:], 24, flips)
    assert (whole[1].int() - want[0].int()).abs().max() <= 1

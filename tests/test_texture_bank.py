"""The texture bank: row order, resume after a kill, mismatch checks, smaller banks, CLI, loading."""
import functools
import json
import multiprocessing
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from fastneg.cli import main
from fastneg.data.imagefolder import scan_image_folder
from fastneg.data.synthetic import DatasetSpec, make_dataset
from fastneg.texture import BankSpec, TextureBank, build_bank, synthesize
from fastneg.texture.build import select_rows
from fastneg.texture.store import DONE_FILE, INDEX_FILE, JPEG_FILE, TEXTURES_FILE, BankReader

SPEC = BankSpec(size=40, exemplar=24, seed=3, storage="raw")   # block 9, overlap 2 by default
JPEG_SPEC = BankSpec(size=40, exemplar=24, seed=3)                # the default storage


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("texture") / "shapes",
                        DatasetSpec(images_per_class=4, size=32), progress=False)
    return root / "train"


@pytest.fixture(scope="module")
def bank(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bank") / "bank"
    build_bank(data, out, SPEC, workers=1, progress=False)
    return out


def read_textures(bank_dir, spec=SPEC):
    return np.fromfile(bank_dir / TEXTURES_FILE, np.uint8).reshape(-1, spec.size, spec.size, 3)


def test_rows_follow_dataset_index_order(data, bank):
    images = scan_image_folder(data)
    textures = read_textures(bank)
    assert len(textures) == len(images) == 40
    for i in (0, 17, 39):
        src = np.asarray(Image.open(images.path(i)).convert("RGB"))
        expected = synthesize(src, SPEC.size, exemplar=SPEC.exemplar, seed=SPEC.seed, sample=i)
        np.testing.assert_array_equal(textures[i], expected)
    meta = json.loads((bank / INDEX_FILE).read_text())
    assert meta["complete"] and meta["fingerprint"] == images.fingerprint()
    assert not (bank / DONE_FILE).exists()


def _build_then_kill(data, out, after_rows):
    """Child process: build with one worker and SIGKILL itself once `after_rows` are stored."""
    def kill(done, rows):
        if done >= after_rows:
            os.kill(os.getpid(), signal.SIGKILL)
    build_bank(data, out, SPEC, workers=1, chunk=4, progress=False, on_chunk=kill)


def test_resume_after_kill_equals_uninterrupted_build(data, bank, tmp_path):
    out = tmp_path / "killed"
    child = multiprocessing.get_context("fork").Process(target=_build_then_kill,
                                                        args=(data, out, 12))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    done = np.fromfile(out / DONE_FILE, np.uint8)
    assert done.sum() == 12
    with pytest.raises(ValueError, match="incomplete.*--resume"):
        TextureBank.load(out, "cpu")
    with pytest.raises(FileExistsError, match="--resume"):
        build_bank(data, out, SPEC, workers=1, progress=False)
    # A torn write: rows not yet marked done hold garbage; resume must redo exactly those.
    with open(out / TEXTURES_FILE, "r+b") as fh:
        row = SPEC.size * SPEC.size * 3
        fh.seek(12 * row)
        fh.write(b"\xff" * (3 * row))
    report = build_bank(data, out, SPEC, workers=2, chunk=5, resume=True, progress=False)
    assert report.built == 40 - 12
    assert (out / TEXTURES_FILE).read_bytes() == (bank / TEXTURES_FILE).read_bytes()
    assert json.loads((out / INDEX_FILE).read_text())["complete"]
    assert build_bank(data, out, SPEC, resume=True, progress=False).built == 0


def test_mismatched_bank_or_settings_are_rejected(data, bank, tmp_path):
    other = make_dataset(tmp_path / "other", DatasetSpec(images_per_class=3, size=32),
                         progress=False) / "train"
    with pytest.raises(ValueError, match="built for"):
        TextureBank.load(bank, "cpu", expect=scan_image_folder(other))
    with pytest.raises(ValueError, match="built for"):
        TextureBank.load(bank, "cpu", expect=other)
    assert len(TextureBank.load(bank, "cpu", expect=data)) == 40
    assert len(TextureBank.load(bank, "cpu", expect=scan_image_folder(data).fingerprint())) == 40
    with pytest.raises(ValueError, match="storage: 'raw' -> 'jpeg'"):
        build_bank(data, bank, JPEG_SPEC, resume=True, progress=False)
    with pytest.raises(ValueError, match="seed: 3 -> 4"):
        build_bank(data, bank, BankSpec(size=40, exemplar=24, seed=4, storage="raw"), resume=True,
                   progress=False)
    with pytest.raises(ValueError, match="fingerprint"):
        build_bank(other, bank, SPEC, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="not a texture bank"):
        TextureBank.load(tmp_path, "cpu")


def test_load_on_cpu(bank):
    tb = TextureBank.load(bank, "cpu")
    assert tb.textures.shape == (40, 40, 40, 3) and tb.textures.dtype == torch.uint8
    assert tb.placement == "mmap"
    np.testing.assert_array_equal(tb.textures.numpy(), read_textures(bank))
    idx = torch.tensor([5, 0, 39])
    assert torch.equal(tb.rows_for(idx), idx)
    textures, ids = tb.for_batch(idx)
    assert torch.equal(textures[ids], tb.textures[idx])


@pytest.mark.cuda
def test_load_on_gpu(bank):
    tb = TextureBank.load(bank, "cuda")
    assert tb.placement == "cuda" and tb.textures.is_cuda
    np.testing.assert_array_equal(tb.textures.cpu().numpy(), read_textures(bank))
    idx = torch.tensor([3, 1], device="cuda")
    assert torch.equal(tb.rows_for(idx), idx)
    textures, ids = tb.for_batch(idx)
    assert textures.is_cuda and torch.equal(textures[ids].cpu(), tb.textures[idx].cpu())


@pytest.mark.cuda
def test_pinned_fallback_when_over_gpu_budget(bank):
    tb = TextureBank.load(bank, "cuda", gpu_budget=0.0)
    assert tb.placement == "pinned" and tb.textures.is_pinned()
    idx = torch.tensor([7, 2], device="cuda")
    textures, ids = tb.for_batch(idx)
    assert textures.is_cuda and torch.equal(textures[ids].cpu(), tb.textures[idx.cpu()])


def test_select_rows_rule():
    labels = np.repeat(np.arange(3), [10, 4, 1])
    sources, image_rows = select_rows(labels, 6)
    assert len(sources) == 6
    # One each, then the other 3 in proportion to (9, 3, 0) by largest remainder: 2.25, 0.75, 0.
    assert np.bincount(labels[sources]).tolist() == [3, 2, 1]
    assert np.bincount(select_rows(np.repeat(np.arange(4), 5), 12)[0] // 5).tolist() == [3] * 4
    np.testing.assert_array_equal(labels[sources[image_rows]], labels)   # same class
    np.testing.assert_array_equal(image_rows[sources], np.arange(6))     # chosen: own texture
    assert np.all(np.diff(image_rows) >= 0)                              # runs in order
    with pytest.raises(ValueError, match="number of classes"):
        select_rows(labels, 2)


def test_limited_bank_of_tiny_images(data, tmp_path):
    # exemplar 48 > the 32-pixel images: the documented rule upscales them first.
    spec = BankSpec(size=40, exemplar=48, limit=12, storage="raw")
    build_bank(data, tmp_path / "small", spec, workers=1, progress=False)
    tb = TextureBank.load(tmp_path / "small", "cpu", expect=data)
    labels = torch.from_numpy(scan_image_folder(data).labels)
    rows = tb.rows_for(torch.arange(40))
    assert len(tb) == 12 and int(rows.max()) == 11
    sources = torch.from_numpy(np.load(tmp_path / "small" / "sources.npy"))
    assert torch.equal(labels[sources[rows]], labels)
    assert tb.textures.reshape(12, -1).float().std(1).min() > 0     # every row was written


def test_cli_builds_bank_and_preview(data, tmp_path, capsys):
    png = tmp_path / "grid.png"
    args = ["build-bank", str(data), "--out", str(tmp_path / "b"), "--size", "40",
            "--exemplar", "24", "--limit", "10", "--workers", "1", "--quiet", "--preview", str(png)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "textures/s" in printed and "per core" in printed
    with Image.open(png) as im:
        assert im.width > im.height > 0
    assert main(args) == 2                               # exists: needs --resume or --force
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
    assert main(["build-bank", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- the jpeg storage

@pytest.fixture(scope="module")
def jpeg_bank(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("jbank") / "bank"
    build_bank(data, out, JPEG_SPEC, workers=1, progress=False)
    return out


def test_jpeg_bank_round_trip(bank, jpeg_bank):
    raw = read_textures(bank)
    assert not (jpeg_bank / TEXTURES_FILE).exists()
    # ~ a few KB per 40 px texture, well under the raw 4800 bytes on these smooth textures.
    assert (jpeg_bank / JPEG_FILE).stat().st_size < raw.nbytes
    reader = BankReader(jpeg_bank, expect=scan_image_folder(BankReader(bank).meta["source_root"]))
    assert reader.storage == "jpeg" and reader.rows == 40
    for r in range(40):
        enc = reader.encoded(r)
        assert enc[:2].tolist() == [0xFF, 0xD8] and enc[-2:].tolist() == [0xFF, 0xD9]
        got = reader.pixels(r).astype(np.int16)
        assert got.shape == raw[r].shape
        assert np.abs(got - raw[r]).mean() < 6.0   # JPEG q90: ~4 on these busy 40 px textures
    # A raw bank reads the same through the reader, exactly.
    np.testing.assert_array_equal(BankReader(bank).pixels(7), raw[7])
    tb = TextureBank.load(jpeg_bank, "cpu")
    np.testing.assert_array_equal(tb.textures[5].numpy(), reader.pixels(5))
    assert tb.placement == "memory"


def test_jpeg_resume_after_kill_equals_uninterrupted_build(data, jpeg_bank, tmp_path):
    out = tmp_path / "killed"
    child = multiprocessing.get_context("fork").Process(
        target=build_bank, args=(data, out, JPEG_SPEC),
        kwargs=dict(workers=1, chunk=4, progress=False, on_chunk=_kill_at(12)))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    assert np.fromfile(out / DONE_FILE, np.uint8).sum() == 12
    # A torn append: bytes after the last chunk marked done must be cut and written again.
    with open(out / JPEG_FILE, "ab") as fh:
        fh.write(b"\xff" * 1000)
    report = build_bank(data, out, JPEG_SPEC, workers=2, chunk=5, resume=True, progress=False)
    assert report.built == 40 - 12
    a, b = BankReader(out), BankReader(jpeg_bank)
    for r in range(40):
        assert a.encoded(r).tobytes() == b.encoded(r).tobytes()
    assert (out / JPEG_FILE).stat().st_size == (jpeg_bank / JPEG_FILE).stat().st_size


def _kill_at(after_rows):
    return functools.partial(_kill_if, after_rows)


def _kill_if(after_rows, done, rows):
    if done >= after_rows:
        os.kill(os.getpid(), signal.SIGKILL)


def test_cli_format_flag(data, tmp_path, capsys):
    args = ["build-bank", str(data), "--out", str(tmp_path / "b"), "--size", "40",
            "--exemplar", "24", "--limit", "10", "--workers", "1", "--quiet"]
    assert main(args + ["--format", "raw"]) == 0
    assert (tmp_path / "b" / TEXTURES_FILE).exists()
    assert main(args + ["--format", "jpeg", "--resume"]) == 2
    assert "storage" in capsys.readouterr().err
    assert main(args + ["--quality", "0", "--force"]) == 2
    assert "quality" in capsys.readouterr().err


# ---------------------------------------------------------------- a bank of given textures

def test_write_bank_from_arrays_reads_back_and_feeds_the_loader(data, tmp_path):
    from fastneg.texture.build import write_bank_from_arrays
    images = scan_image_folder(data)
    rng = np.random.default_rng(0)
    # smooth textures (JPEG keeps them within a few levels), one per image
    base = rng.integers(0, 256, (len(images), 4, 4, 3), dtype=np.uint8)
    given = np.stack([np.asarray(Image.fromarray(b).resize((24, 24), Image.BILINEAR))
                      for b in base])
    out = write_bank_from_arrays(data, tmp_path / "given", iter(given), chunk=7)
    meta = json.loads((out / INDEX_FILE).read_text())
    assert meta["complete"] and meta["storage"] == "jpeg" and meta["rows"] == len(images)
    assert meta["fingerprint"] == images.fingerprint() and meta["size"] == 24
    assert not (out / DONE_FILE).exists()
    reader = BankReader(out, expect=images)
    assert reader.rows == len(images)
    np.testing.assert_array_equal(reader.rows_for(np.arange(len(images))),
                                  np.arange(len(images)))
    for r in range(len(images)):
        assert np.abs(reader.pixels(r).astype(np.int16) - given[r]).mean() < 4.0
    tb = TextureBank.load(out, "cpu", expect=data)
    assert tuple(tb.textures.shape) == given.shape
    # the loaders accept it: each batch carries its samples' textures
    from fastneg.loaders import build_loader
    loader = build_loader("torch", data, batch_size=4, size=16, device="cpu", workers=0,
                          texture_bank=out)
    batch = next(iter(loader))
    assert batch.textures is not None and tuple(batch.textures.shape) == (4, 16, 16, 3)
    # an existing bank is kept unless forced
    with pytest.raises(FileExistsError):
        write_bank_from_arrays(data, out, iter(given))
    write_bank_from_arrays(data, out, iter(given[::-1].copy()), force=True)
    assert np.abs(BankReader(out).pixels(0).astype(np.int16) - given[-1]).mean() < 4.0


def test_write_bank_from_arrays_rejects_a_wrong_count_or_shape(data, tmp_path):
    from fastneg.texture.build import write_bank_from_arrays
    n = len(scan_image_folder(data))
    tex = np.zeros((n + 1, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="textures"):
        write_bank_from_arrays(data, tmp_path / "few", iter(tex[:n - 1]))
    assert not json.loads((tmp_path / "few" / INDEX_FILE).read_text())["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        BankReader(tmp_path / "few")
    with pytest.raises(ValueError, match="more textures"):
        write_bank_from_arrays(data, tmp_path / "many", iter(tex), chunk=4)
    with pytest.raises(ValueError, match="uint8"):
        write_bank_from_arrays(data, tmp_path / "shape", [np.zeros((8, 9, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"\[8, 8, 3\]"):
        write_bank_from_arrays(data, tmp_path / "mixed",
                               [tex[0], np.zeros((9, 9, 3), np.uint8)])


def test_texture_source_follows_the_storage(data, bank, jpeg_bank):
    """One decision for the trainer, the step and the loaders: a jpeg bank comes with the
    batches, a raw one is held whole and cropped per step."""
    from fastneg.kernels import sample_textures
    from fastneg.loaders import Batch
    from fastneg.loaders.common import open_texture_bank
    from fastneg.texture import texture_source
    from fastneg.texture.source import FromLoader, HeldBank

    fetched, held = texture_source(jpeg_bank), texture_source(bank)
    assert isinstance(fetched, FromLoader) and fetched.loader_bank == str(jpeg_bank)
    assert isinstance(held, HeldBank) and held.loader_bank is None
    images = scan_image_folder(data)
    assert open_texture_bank(jpeg_bank, images).path == jpeg_bank
    with pytest.raises(ValueError, match="stored raw: the loaders read JPEG banks"):
        open_texture_bank(bank, images)

    indices = torch.tensor([3, 0, 5], dtype=torch.int64)
    batch = Batch(views=(torch.zeros(3, 8, 8, 3, dtype=torch.uint8),), labels=indices * 0,
                  indices=indices)
    assert not held.ready(batch) and held.prepare("cpu", expect=data) is held
    got = held.textures(batch, seed=2, draw_step=7, size=16)
    whole = torch.from_numpy(read_textures(bank).copy())
    assert torch.equal(got, sample_textures(whole, indices, size=16, seed=2, step=7))
    assert not fetched.ready(batch)
    with pytest.raises(ValueError, match="carries no textures"):
        fetched.textures(batch, seed=2, draw_step=7, size=16)
    batch = Batch(views=batch.views, labels=batch.labels, indices=indices, textures=got)
    assert fetched.ready(batch) and fetched.textures(batch, seed=0, draw_step=0, size=16) is got

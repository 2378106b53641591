"""`fastneg export`: a trainer checkpoint's backbone loads strictly into torchvision's and timm's
ResNets and computes fastneg's features; the head file; refusals leave nothing; `fastneg eval`
reads exported files back."""
import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from fastneg.cli import main
from fastneg.data.synthetic import DatasetSpec, make_dataset
from fastneg.export import META_ATTR, load_backbone, read_exported
from fastneg.moco import build_model, load_encoder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on shared cores, threads waiting on each other make these small
    forward passes many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trainer():
    from fastneg.train import checkpoints
    return checkpoints


def write_trainer_checkpoint(trainer, path: Path, arch: str, cifar_stem: bool = False) -> Path:
    """A checkpoint as the trainer writes it (its training_state and write_checkpoint), after
    two SGD steps of the real model on random images, so that weights and BatchNorm statistics
    are not at their initial values. Split BatchNorm, as in a one-process run."""
    args = argparse.Namespace(arch=arch, dim=16, moco_k=16, moco_m=0.9, moco_t=0.2, alpha=2.0,
                              mlp_hidden=32, cifar_stem=cifar_stem, bn="split", bn_splits=2,
                              seed=0, size=32, patch_range=(2, 8), lr=0.1, wd=1e-4)
    torch.manual_seed(0)
    model = build_model(vars(args))
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=args.lr, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.train()
    for step in range(2):
        im_q, im_k = torch.randn(2, 4, 3, 32, 32)
        loss, _ = model(im_q, im_k, step=step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    state = trainer.training_state(model, optimizer, scaler, 2, args=args, world=1,
                                   steps_per_epoch=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.write_checkpoint(state, path)
    return path


@pytest.fixture(scope="module")
def resnet18_ckpt(trainer, tmp_path_factory):
    return write_trainer_checkpoint(trainer, tmp_path_factory.mktemp("run") / "checkpoint.pt",
                                    "resnet18")


@pytest.fixture(scope="module")
def batch():
    return torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))


def fastneg_features(ckpt, batch):
    backbone, _ = load_encoder(ckpt)
    with torch.no_grad():
        return backbone(batch)


@pytest.fixture(scope="module")
def expected(resnet18_ckpt, batch):
    """fastneg's own backbone features of the checkpoint on `batch`."""
    return fastneg_features(resnet18_ckpt, batch)


@pytest.fixture(scope="module")
def exports(resnet18_ckpt, tmp_path_factory):
    """The checkpoint exported through the CLI: safetensors (+ head) for torchvision, .pth
    (+ head) for timm."""
    d = tmp_path_factory.mktemp("exports")
    files = {"safe": d / "r18.safetensors", "safe_head": d / "head.safetensors",
             "pt": d / "r18.pth", "pt_head": d / "head.pt"}
    assert main(["export", str(resnet18_ckpt), "--format", "torchvision", "--out",
                 str(files["safe"]), "--head", str(files["safe_head"])]) == 0
    assert main(["export", str(resnet18_ckpt), "--format", "timm", "--out", str(files["pt"]),
                 "--head", str(files["pt_head"])]) == 0
    return files


def torchvision_resnet18():
    tv = torchvision.models.resnet18()
    tv.fc = nn.Identity()
    return tv


def listing(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def refused(capsys, argv, *expected):
    """main() exits 2 with one stderr line holding every expected piece."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastneg export: error:"), err
    for piece in expected:
        assert piece in err, (piece, err)


# ---------------------------------------------------------------- loading into the targets

def test_safetensors_export_loads_strictly_into_torchvision_and_timm(resnet18_ckpt, exports,
                                                                     batch, expected):
    timm = pytest.importorskip("timm")
    from safetensors import safe_open
    from safetensors.torch import load_file
    sd = load_file(exports["safe"])
    assert "fc.weight" not in sd and "layer4.1.bn2.num_batches_tracked" in sd
    assert int(sd["bn1.num_batches_tracked"]) == 2       # the two training steps

    tv = torchvision_resnet18()
    tv.load_state_dict(sd, strict=True)
    tm = timm.create_model("resnet18", pretrained=False, num_classes=0)
    tm.load_state_dict(sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(batch), expected, rtol=0, atol=0)
        torch.testing.assert_close(tm.eval()(batch), expected)

    with safe_open(str(exports["safe"]), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["arch"] == "resnet18" and meta["format"] == "torchvision"
    assert meta["source_sha256"] == hashlib.sha256(resnet18_ckpt.read_bytes()).hexdigest()
    assert meta["size"] == "32" and meta["features"] == "512" and meta["source_step"] == "2"
    assert meta["fastneg_version"] and json.loads(meta["patch_range"]) == [2, 8]


def test_pt_export_is_a_weights_only_state_dict_with_metadata(exports, batch, expected):
    timm = pytest.importorskip("timm")
    sd = torch.load(exports["pt"], weights_only=True)
    assert getattr(sd, META_ATTR)["format"] == "timm"
    tm = timm.create_model("resnet18", pretrained=False, num_classes=0)
    tm.load_state_dict(sd, strict=True)
    tv = torchvision_resnet18()
    tv.load_state_dict(sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(batch), expected, rtol=0, atol=0)
        torch.testing.assert_close(tm.eval()(batch), expected)


def test_head_file_reproduces_the_projection(resnet18_ckpt, exports, expected):
    from safetensors.torch import load_file
    ckpt = torch.load(resnet18_ckpt, weights_only=True)
    want = {k[len("encoder_q.head."):]: v for k, v in ckpt["model"].items()
            if k.startswith("encoder_q.head.")}
    mlp = nn.Sequential(nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, 16))
    for head_sd in (load_file(exports["safe_head"]), torch.load(exports["pt_head"],
                                                                weights_only=True)):
        mlp.load_state_dict(head_sd, strict=True)
        for k, v in want.items():
            assert torch.equal(head_sd[k], v), k
    assert getattr(torch.load(exports["pt_head"], weights_only=True), META_ATTR)["content"] \
        == "head"
    # backbone file + head file = the query encoder, as the model computes it
    model = build_model(ckpt["args"])
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        torch.testing.assert_close(mlp(expected), model.encoder_q.head(expected))


@pytest.mark.slow
def test_cifar_stem_needs_the_stem_swap(trainer, batch, tmp_path, capsys):
    ckpt = write_trainer_checkpoint(trainer, tmp_path / "run" / "c.pt", "resnet18",
                                    cifar_stem=True)
    out = tmp_path / "c.pt"
    assert main(["export", str(ckpt), "--format", "torchvision", "--out", str(out)]) == 0
    assert "CIFAR stem" in capsys.readouterr().out
    tv = torchvision.models.resnet18()
    tv.fc = nn.Identity()
    tv.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    tv.maxpool = nn.Identity()
    tv.load_state_dict(torch.load(out, weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(batch), fastneg_features(ckpt, batch),
                                   rtol=0, atol=0)
    backbone, args = load_backbone(out)
    assert args["cifar_stem"] is True and isinstance(backbone.maxpool, nn.Identity)


# ---------------------------------------------------------------- refusals

def test_foreign_and_missing_inputs_are_refused_and_nothing_is_written(resnet18_ckpt, tmp_path,
                                                                        capsys):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(resnet18_ckpt.read_bytes()[:5000])
    before = listing(tmp_path)
    out = str(tmp_path / "out" / "b.safetensors")
    for bad, piece in ((tmp_path / "missing.pt", "does not exist"),
                       (foreign, "not a fastneg MoCo checkpoint"),
                       (text, "not a torch checkpoint"),
                       (truncated, "truncated")):
        refused(capsys, ["export", str(bad), "--format", "torchvision", "--out", out,
                         "--head", str(tmp_path / "out" / "h.pt")], bad.name, piece)
    refused(capsys, ["export", str(resnet18_ckpt), "--format", "torchvision", "--out",
                     str(tmp_path / "b.bin")], "--out", "b.bin", ".safetensors")
    refused(capsys, ["export", str(resnet18_ckpt), "--format", "torchvision", "--out",
                     str(resnet18_ckpt)], "overwrite the checkpoint")
    refused(capsys, ["export", str(resnet18_ckpt), "--format", "timm", "--out", out,
                     "--head", out], "same file as --out")
    assert listing(tmp_path) == before


def test_small_arch_is_refused(trainer, tmp_path, capsys):
    ckpt = write_trainer_checkpoint(trainer, tmp_path / "run" / "s.pt", "resnet10s")
    before = listing(tmp_path)
    refused(capsys, ["export", str(ckpt), "--format", "timm", "--out",
                     str(tmp_path / "s.safetensors")], "resnet10s", "narrow")
    assert listing(tmp_path) == before


def test_safetensors_name_without_the_package(resnet18_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)   # import safetensors -> ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    before = listing(tmp_path)
    refused(capsys, ["export", str(resnet18_ckpt), "--format", "torchvision", "--out",
                     str(tmp_path / "b.safetensors")], "needs the safetensors package", ".pt")
    assert listing(tmp_path) == before
    assert main(["export", str(resnet18_ckpt), "--format", "torchvision", "--out",
                 str(tmp_path / "b.pt")]) == 0   # the torch format needs no extra package


def test_a_failed_write_leaves_neither_file(resnet18_ckpt, tmp_path, capsys, monkeypatch):
    """The head is written first; the backbone's write then fails as on a full disk: neither
    file appears, no temporary file stays, and an older head file is kept."""
    import errno

    import fastneg.export as export
    real = export._write_file

    def fail_on_backbone(state, tmp, kind, metadata):
        if metadata["content"] == "backbone":
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(state, tmp, kind, metadata)

    monkeypatch.setattr(export, "_write_file", fail_on_backbone)
    (tmp_path / "h.pt").write_bytes(b"older head")
    before = listing(tmp_path)
    refused(capsys, ["export", str(resnet18_ckpt), "--format", "torchvision", "--out",
                     str(tmp_path / "b.pt"), "--head", str(tmp_path / "h.pt")],
            "cannot write", "b.pt", "No space left on device")
    assert listing(tmp_path) == before
    assert (tmp_path / "h.pt").read_bytes() == b"older head"


# ---------------------------------------------------------------- reading exports back

def test_load_backbone_reads_every_kind_of_file(resnet18_ckpt, exports, batch, expected,
                                               tmp_path):
    safe, pt = exports["safe"], exports["pt"]
    # A plain torchvision state dict without metadata, classifier included.
    bare = tmp_path / "bare.pth"
    tv = torchvision.models.resnet18()
    tv.load_state_dict(read_exported(safe)[0], strict=False)
    torch.save(dict(tv.state_dict()), bare)
    for path, flags in ((resnet18_ckpt, {}), (safe, {}), (pt, {}),
                        (bare, {"arch": "resnet18", "size": 32})):
        backbone, args = load_backbone(path, **flags)
        assert args["arch"] == "resnet18" and args["size"] == 32 and not args["cifar_stem"]
        with torch.no_grad():
            torch.testing.assert_close(backbone(batch), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not record its arch; give --arch"):
        load_backbone(bare)
    with pytest.raises(ValueError, match="does not record its size; give --size"):
        load_backbone(bare, arch="resnet18")
    with pytest.raises(ValueError, match="--arch resnet50 disagrees"):
        load_backbone(safe, arch="resnet50")
    with pytest.raises(ValueError, match="--arch resnet50 disagrees with checkpoint"):
        load_backbone(resnet18_ckpt, arch="resnet50")
    with pytest.raises(ValueError, match="do not fit arch 'resnet34'"):
        load_backbone(bare, arch="resnet34", size=32)
    with pytest.raises(ValueError, match="holds a head"):
        load_backbone(exports["safe_head"])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="neither a safetensors file nor a torch file"):
        load_backbone(garbage)


@pytest.mark.slow
def test_fastneg_eval_on_an_exported_file(resnet18_ckpt, exports, tmp_path, capsys):
    """`fastneg eval` takes the exported file and gives the checkpoint's numbers."""
    shapes = make_dataset(tmp_path / "shapes", DatasetSpec(images_per_class=2, size=32),
                          progress=False)
    for split in ("conflict", "outline"):   # train and val are enough here
        shutil.rmtree(shapes / split)
    out = exports["safe"]
    common = ["--data", str(shapes), "--corruptions", "none", "--no-untrained", "--threads", "1",
              "--batch-size", "64"]
    results = {}
    for name, path in (("checkpoint", resnet18_ckpt), ("export", out)):
        js = tmp_path / f"{name}.json"
        assert main(["eval", str(path), *common, "--json", str(js),
                     "--cache-dir", str(tmp_path / f"cache-{name}")]) == 0
        results[name] = json.loads(js.read_text())
    assert results["export"]["args"]["arch"] == "resnet18"
    for clf in ("linear", "knn"):
        assert results["export"][clf] == results["checkpoint"][clf]
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "missing.safetensors"), *common]) == 2
    assert "missing.safetensors" in capsys.readouterr().err

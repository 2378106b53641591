"""fastneg.eval.readout: factor targets, CV read-outs, scramble similarity, untrained reference."""
import json
import shutil

import numpy as np
import pytest
import torch

from fastneg.data.imagefolder import scan_image_folder
from fastneg.data.synthetic import DatasetSpec, make_dataset, read_metadata
from fastneg.eval.readout import (cosine_pairs, cv_readout, factor_targets,
                                  scramble_patch_range, scramble_similarity)


@pytest.fixture(scope="module")
def trifeature(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ro") / "tri",
                        DatasetSpec(images_per_class=6, size=32, colour="palette",
                                    independent=True), progress=False)


def test_readout_targets_line_up_with_the_files(trifeature):
    for split in ("train", "val"):
        images = scan_image_folder(trifeature / split)
        targets = factor_targets(images)
        assert set(targets) == {"shape", "texture", "colour"}
        rows = {r["file"]: r for r in read_metadata(trifeature / split)}
        for factor, column in (("shape", "shape"), ("texture", "texture"),
                               ("colour", "colour")):
            names = sorted({r[column] for r in rows.values()})
            expected = [names.index(rows[f][column]) for f in images.files]
            assert targets[factor].tolist() == expected
        # Shape ids number the sorted shape names, as the folders do: they are the labels.
        assert targets["shape"].tolist() == images.labels.tolist()


def test_readout_targets_need_every_file(trifeature, tmp_path):
    split = tmp_path / "val"
    shutil.copytree(trifeature / "val", split)
    lines = (split / "metadata.csv").read_text().splitlines()
    (split / "metadata.csv").write_text("\n".join(lines[:-1]) + "\n")   # drop a row
    with pytest.raises(ValueError, match="no row for"):
        factor_targets(scan_image_folder(split))
    (split / "metadata.csv").unlink()
    assert factor_targets(scan_image_folder(split)) == {}


def test_cv_readout_decodes_a_coded_factor_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = np.arange(600) % 5
    centres = torch.randn(5, 20, generator=g) * 3
    x = centres[y] + torch.randn(600, 20, generator=g)
    r = cv_readout(x[:400], y[:400], x[400:], y[400:])
    assert r["accuracy"] > 0.95 and str(r["weight_decay"]) in r["cv"]
    noise = torch.randn(600, 20, generator=g)
    assert cv_readout(noise[:400], y[:400], noise[400:], y[400:])["accuracy"] < 0.4


def test_scramble_similarity_of_identical_and_uniform_images(trifeature, tmp_path):
    a = torch.randn(7, 16)
    assert torch.allclose(cosine_pairs(a, a), torch.ones(7), atol=1e-6)
    assert torch.allclose(cosine_pairs(a, -a), -torch.ones(7), atol=1e-6)
    # A uniform image is its own scramble: similarity 1 for any backbone.
    flat = tmp_path / "flat"
    for c in ("a", "b"):
        (flat / c).mkdir(parents=True)
        from PIL import Image
        Image.new("RGB", (32, 32), (90, 120, 200)).save(flat / c / "x.png")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    assert scramble_similarity(net, scan_image_folder(flat), size=32,
                               patch_range=(5, 9)) == pytest.approx(1.0, abs=1e-5)
    # Real shapes change under scrambling, and the measure stays a cosine.
    s = scramble_similarity(net, scan_image_folder(trifeature / "val"), size=32,
                            patch_range=(5, 9))
    assert -1.0 <= s < 0.9999


def test_scramble_range_lies_above_training():
    assert scramble_patch_range((5, 21), 64) == (22, 29)
    lo, hi = scramble_patch_range((16, 72), 224)
    assert lo == 73 and lo <= hi < 224
    assert scramble_patch_range((2, 31), 32) == (31, 31)   # clamped below the image side


def test_fastneg_eval_reports_readouts_scramble_and_cached_untrained(trifeature, tmp_path,
                                                                     capsys):
    from fastneg.cli import main
    from fastneg.moco import build_model
    args = dict(arch="resnet10s", dim=8, moco_k=8, moco_m=0.9, moco_t=0.2, mlp_hidden=16,
                cifar_stem=True, size=32, patch_range=[3, 9])
    torch.manual_seed(1)
    ckpt = tmp_path / "run" / "last.pt"
    ckpt.parent.mkdir()
    torch.save({"model": build_model(args).state_dict(), "args": args}, ckpt)
    out = tmp_path / "eval.json"
    argv = ["eval", str(ckpt), "--data", str(trifeature), "--json", str(out),
            "--corruptions", "none"]
    import fastneg.eval.suite as suite
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert set(r["readout"]) == {"shape", "texture", "colour"}
    assert all(0.0 <= v <= 1.0 for v in r["readout"].values())
    assert r["scramble_patch_range"] == [10, 13]
    ref = r["untrained"]
    assert set(ref["readout"]) == {"shape", "texture", "colour"}
    assert 0.0 < ref["scramble_similarity"] <= 1.0
    printed = capsys.readouterr().out
    assert "| scramble similarity |" in printed and "untrained" in printed
    cached = list((trifeature / ".fastneg-untrained").glob("*.json"))
    assert len(cached) == 1
    # The second evaluation reads the reference from its cache.
    called = []
    real = suite.evaluate_backbone
    try:
        suite.evaluate_backbone = lambda *a, **k: called.append(1) or real(*a, **k)
        assert main(argv) == 0
    finally:
        suite.evaluate_backbone = real
    assert len(called) == 1   # the checkpoint only
    assert json.loads(out.read_text())["untrained"] == ref

"""fastneg.eval: probe, kNN, shape bias, corruption cache, suite on a tiny dataset."""
import importlib.util
import json
import math
import shutil

import numpy as np
import pytest
import torch

from fastneg.data.synthetic import DatasetSpec, make_dataset
from fastneg.eval import evaluate_backbone, knn_predict, shape_bias, top1, train_linear_probe
from fastneg.eval.corrupt import corrupt_image, corrupt_split
from fastneg.eval.suite import find_splits, parse_ood

CLASSES = 10
# the corruptions come from corrupt-tta, an optional dependency (fastneg[eval])
needs_corrupt_tta = pytest.mark.skipif(importlib.util.find_spec("corrupt_tta") is None,
                                       reason="needs corrupt-tta (fastneg[eval])")


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("eval") / "shapes",
                        DatasetSpec(images_per_class=4, size=32), progress=False)


def gaussian_blobs(n, dim, separation, seed):
    """Features = class centre * separation + unit noise, balanced labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(n) % CLASSES
    return centres[labels] * separation + torch.randn(n, dim, generator=g), labels


def tiny_backbone():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())


# ---------------------------------------------------------------- classifiers

@pytest.mark.parametrize("classify", ["linear", "knn"])
def test_classifiers_separate_separable_features_and_are_at_chance_on_noise(classify):
    def fit_predict(train_x, train_y, test_x):
        if classify == "linear":
            return train_linear_probe(train_x, train_y, num_classes=CLASSES).predict(test_x)
        return knn_predict(train_x, train_y, test_x, num_classes=CLASSES)

    x, y = gaussian_blobs(1000, 32, separation=3.0, seed=0)
    tx, ty = gaussian_blobs(1000, 32, separation=3.0, seed=1)
    assert top1(fit_predict(x, y, tx), ty) > 0.95

    # Random features: nothing to learn, held-out accuracy ~ 1 / CLASSES (sd ~ 0.007 here).
    noise, tnoise = (torch.randn(2000, 32, generator=torch.Generator().manual_seed(s))
                     for s in (2, 3))
    labels = torch.randint(0, CLASSES, (2000,), generator=torch.Generator().manual_seed(4))
    assert abs(top1(fit_predict(noise, labels, tnoise), labels) - 1 / CLASSES) < 0.04


def test_linear_probe_is_invariant_to_feature_scale():
    x, y = gaussian_blobs(500, 16, separation=1.0, seed=0)
    a = train_linear_probe(x, y, num_classes=CLASSES).predict(x)
    b = train_linear_probe(x * 1000 + 5, y, num_classes=CLASSES).predict(x * 1000 + 5)
    assert (a == b).float().mean() > 0.99   # standardization: same problem, same answer


def test_knn_weights_votes_by_similarity():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    # k=3: two class-0 neighbours, but the query sits on the class-1 point.
    pred = knn_predict(bank, labels, torch.tensor([[0.0, 1.0]]), num_classes=2, k=3,
                       temperature=0.05)
    assert pred.tolist() == [1]


def test_classifier_inputs_are_checked():
    with pytest.raises(ValueError, match="labels must lie"):
        train_linear_probe(torch.zeros(4, 2), torch.tensor([0, 1, 2, 5]), num_classes=3)
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        knn_predict(torch.zeros(4, 2), torch.zeros(4), torch.zeros(3, 5), num_classes=2)


# ---------------------------------------------------------------- shape bias

def test_shape_bias_matches_hand_count():
    shape = [0, 1, 2, 3, 4, 5, 6, 7]
    texture = [1, 2, 3, 4, 5, 6, 7, 7]     # the last image has no conflict: ignored
    preds = [0, 1, 3, 4, 5, 9, 6, 7]       # shape: 0,1,6 -> 3; texture: 2,3,4 -> 3; other: 5
    assert shape_bias(preds, shape=shape, texture=texture) == pytest.approx(3 / 6)
    preds2 = [0, 1, 2, 4, 9, 9, 9, 9]      # shape 3, texture 1
    assert shape_bias(preds2, shape=shape, texture=texture) == pytest.approx(3 / 4)
    assert math.isnan(shape_bias([9, 9], shape=[0, 1], texture=[1, 0]))
    with pytest.raises(ValueError, match="equal length"):
        shape_bias([0, 1], shape=[0], texture=[1])


# ---------------------------------------------------------------- corruptions

@needs_corrupt_tta
def test_corruption_cache_is_deterministic_and_reused(shapes, tmp_path):
    kw = dict(corruptions=("gaussian_noise", "fog"), severities=(1, 5), seed=3)
    state = np.random.get_state()
    a = corrupt_split(shapes / "val", tmp_path / "a", workers=2, **kw)
    b = corrupt_split(shapes / "val", tmp_path / "b", workers=1, **kw)
    assert np.array_equal(np.random.get_state()[1], state[1])   # global NumPy state untouched
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 10 * 2 * 2
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)

    stamp = (a / files[0]).stat().st_mtime_ns
    corrupt_split(shapes / "val", a, **kw)                       # same key: reused as is
    assert (a / files[0]).stat().st_mtime_ns == stamp
    c = corrupt_split(shapes / "val", tmp_path / "c", **{**kw, "seed": 4})
    noisy = [f for f in files if f.parts[0] == "gaussian_noise"]
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in noisy)


@needs_corrupt_tta
def test_corruption_severity_increases_damage():
    img = np.full((32, 32, 3), 128, np.uint8)
    img[8:24, 8:24] = 250
    err = [np.abs(corrupt_image(img, "gaussian_noise", s, seed=0).astype(int) - img).mean()
           for s in (1, 5)]
    assert err[1] > err[0] > 0


@needs_corrupt_tta
def test_unknown_corruption_is_named(shapes, tmp_path):
    with pytest.raises(ValueError, match="no_such_blur"):
        corrupt_split(shapes / "val", tmp_path / "x", corruptions=("no_such_blur",))
    with pytest.raises(ValueError, match="severities"):
        corrupt_split(shapes / "val", tmp_path / "x", corruptions=("fog",), severities=(6,))


# ---------------------------------------------------------------- the suite

@needs_corrupt_tta
def test_suite_reports_every_split_and_caches_features(shapes, tmp_path):
    ood = tmp_path / "sketch"
    shutil.copytree(shapes / "outline" / "star", ood / "star")      # a one-class OOD folder
    kw = dict(size=32, cache_dir=tmp_path / "cache", identity="tiny",
              corrupt_dir=tmp_path / "corrupt", corruptions=("contrast",), severities=(1, 3),
              log=lambda _: None)
    r = evaluate_backbone(tiny_backbone(), shapes, ood={"sketch": ood}, **kw)
    for clf in ("linear", "knn"):
        assert set(r[clf]) == {"val", "conflict", "outline", "sketch", "corrupt"}
        assert all(0.0 <= v <= 1.0 for v in r[clf].values())
        accs = r["corruptions"][clf]["contrast"]
        assert r[clf]["corrupt"] == pytest.approx(np.mean(accs)) and len(accs) == 2
    assert r["shape_bias"] is None or 0.0 <= r["shape_bias"] <= 1.0
    assert r["images"]["sketch"] == len(list((shapes / "outline" / "star").iterdir()))
    json.dumps(r)                                                     # JSON-ready

    cached = sorted(p.parent.name for p in (tmp_path / "cache").glob("*/manifest.json"))
    assert cached == sorted(["train", "val", "conflict", "outline", "sketch",
                             "corrupt-contrast-1", "corrupt-contrast-3"])
    # A different backbone under the same identity reads the cache: identical results.
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(2),
                                torch.nn.Flatten())
    assert evaluate_backbone(other, shapes, ood={"sketch": ood}, **kw) == r


@needs_corrupt_tta
def test_suite_errors_name_the_problem(shapes, tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        find_splits(tmp_path)
    with pytest.raises(ValueError, match="NAME=DIR"):
        parse_ood(["sketch"])
    bad = tmp_path / "bad"
    shutil.copytree(shapes / "val" / "star", bad / "dragon")
    with pytest.raises(ValueError, match="fogg"):
        evaluate_backbone(None, tmp_path, size=32, corruptions=("fogg",))   # checked first
    with pytest.raises(ValueError, match="dragon"):
        evaluate_backbone(tiny_backbone(), shapes, size=32, ood={"bad": bad}, corruptions=(),
                          log=lambda _: None)


# ---------------------------------------------------------------- `fastneg eval` end to end

@needs_corrupt_tta
def test_fastneg_eval_on_a_trainer_checkpoint(shapes, tmp_path, capsys):
    from fastneg.cli import main
    from fastneg.moco import build_model

    args = dict(arch="resnet10s", dim=8, moco_k=8, moco_m=0.9, moco_t=0.2, mlp_hidden=16,
                cifar_stem=True, size=32)
    torch.manual_seed(0)
    ckpt = tmp_path / "run" / "last.pt"
    ckpt.parent.mkdir()
    torch.save({"model": build_model(args).state_dict(), "args": args, "epoch": 1, "step": 1},
               ckpt)
    out = tmp_path / "eval.json"
    rc = main(["eval", str(ckpt), "--data", str(shapes), "--json", str(out),
               "--corruptions", "pixelate", "--severities", "2",
               "--corrupt-dir", str(tmp_path / "corrupt")])
    assert rc == 0
    r = json.loads(out.read_text())
    assert set(r["linear"]) == set(r["knn"]) == {"val", "conflict", "outline", "corrupt"}
    assert r["checkpoint"] == str(ckpt) and r["args"]["arch"] == "resnet10s"
    assert "shape_bias" in r and "shape bias" in capsys.readouterr().out
    assert (ckpt.parent / "eval-cache" / "last" / "train" / "manifest.json").exists()

    assert main(["eval", str(tmp_path / "missing.pt"), "--data", str(shapes)]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "--data", str(shapes), "--severities", "x"]) == 2
    assert "--severities" in capsys.readouterr().err


def test_corruptions_without_corrupt_tta_are_refused_in_one_line(monkeypatch):
    import sys
    from fastneg.eval.corrupt import check_corruptions
    monkeypatch.setitem(sys.modules, "corrupt_tta", None)     # import corrupt_tta -> ImportError
    with pytest.raises(ValueError, match=r"needs corrupt-tta \(pip install 'fastneg\[eval\]'"):
        check_corruptions(("fog",), (1,))
    with pytest.raises(ValueError, match="--corruptions none"):
        corrupt_image(np.zeros((8, 8, 3), np.uint8), "fog", 1, seed=0)

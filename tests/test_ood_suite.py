"""fastneg.eval.ood: the paper's out-of-domain sets in the layouts they ship as.

Folders mimic each release exactly (names, nesting, extensions); most tests score them with a
fake classifier that reads its prediction from the file name, so the expected numbers are known.
"""
import json

import numpy as np
import pytest
from PIL import Image

from fastneg.eval.ood import (IMAGENET_C, category_columns, category_decisions, category_wnids,
                              discover, imagenet_wnids, paper_table, prepare_paper_sets,
                              score_cue_conflict, score_paper_sets)

TABBY, TIGER_CAT = "n02123045", "n02123159"      # ImageNet-1k classes 281, 282: 'cat'
BEAGLE, BASSET = "n02088364", "n02088238"        # 'dog'
SPORTS_CAR, TENCH, ABSENT = "n04285008", "n01440764", "n09999999"   # 'car', no category, unknown


def write_image(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def fake_classify(train_classes, calls=None):
    """Probabilities with all mass on the class named by the file: '<wnid>_<k>.<ext>' or, for
    cue-conflict stimuli, the `picks` mapping {file stem: wnid}."""
    column = {c: i for i, c in enumerate(train_classes)}

    def classify(images, tag, picks=None):
        if calls is not None:
            calls.append((tag, images))
        probs = np.zeros((len(images), len(train_classes)))
        for i, f in enumerate(images.files):
            stem = f.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            wnid = (picks or {}).get(stem) or stem.split("_")[0]
            probs[i, column[wnid]] = 1.0
        return probs
    return classify


def class_folder(folder, right: int, wrong_as: str, wrong: int, ext: str):
    """`right` images predicted as the folder's class, `wrong` predicted as `wrong_as`."""
    for k in range(right):
        write_image(folder / f"{folder.name}_{k}{ext}")
    for k in range(wrong):
        write_image(folder / f"{wrong_as}_{k}{ext}")


# ---------------------------------------------------------------- ImageNet-C

def test_imagenet_c_scores_every_present_folder_and_averages_what_is_present(tmp_path):
    train = (TABBY, BEAGLE)
    c = tmp_path / "ood" / "imagenet-c"
    # (corruption, severity) -> right / wrong per class: accuracies 1.0, 0.5, 0.0, 1.0
    grid = {("gaussian_noise", 1): (2, 0), ("gaussian_noise", 3): (1, 1),
            ("contrast", 5): (0, 2), ("speckle_noise", 2): (2, 0)}   # speckle: "extra" tarball
    for (name, sev), (right, wrong) in grid.items():
        class_folder(c / name / str(sev) / TABBY, right, BEAGLE, wrong, ".JPEG")
        class_folder(c / name / str(sev) / BEAGLE, right, TABBY, wrong, ".JPEG")
        write_image(c / name / str(sev) / ABSENT / f"{TABBY}_0.JPEG")   # not a training class
    (c / "gaussian_noise" / "6" / TABBY).mkdir(parents=True)            # not a severity
    (c / "frost").mkdir()                                               # an empty corruption

    plan = prepare_paper_sets(tmp_path / "ood", train, log=lambda _: None)
    calls = []
    paper = score_paper_sets(plan, train, fake_classify(train, calls), log=lambda _: None)
    r = paper["imagenet-c"]
    assert r["top1"] == {"gaussian_noise": {"1": 1.0, "3": 0.5}, "contrast": {"5": 0.0},
                         "speckle_noise": {"2": 1.0}}
    assert r["present"] == {"gaussian_noise": [1, 3], "contrast": [5], "speckle_noise": [2]}
    assert r["mean"] == pytest.approx(0.5)            # the 15 benchmark corruptions: (1+.5+0)/3
    assert r["mean_extra"] == 1.0 and r["mean_all"] == pytest.approx(2.5 / 4)
    assert r["per_corruption"]["gaussian_noise"] == pytest.approx(0.75)
    assert r["per_severity"] == {"1": 1.0, "3": 0.5, "5": 0.0}
    assert r["missing_corruptions"] == [n for n in IMAGENET_C
                                        if n not in ("gaussian_noise", "contrast")]
    assert r["classes_dropped"] == 1 and r["images_dropped"] == 4 and r["classes_scored"] == 2
    assert r["images"] == 16 and r["ignored_folders"] == ["gaussian_noise/6"]
    # The classifier never saw the dropped class; the views were removed afterwards.
    assert all(set(images.classes) == set(train) for _, images in calls)
    assert not plan._views.exists()
    assert paper["table"]["IN-C"] == pytest.approx(0.5)
    assert paper["missing"] == ["sketch", "stylized", "imagenet-r", "cue-conflict"]


# ---------------------------------------------------------------- R, Sketch, Stylized

def test_class_restricted_sets_drop_and_count_absent_classes(tmp_path):
    train = (TABBY, BEAGLE, SPORTS_CAR)
    root = tmp_path / "ood"
    # ImageNet-R: .jpg, one training class present with 3/4 right, one absent class (3 images)
    class_folder(root / "imagenet-r" / TABBY, 3, BEAGLE, 1, ".jpg")
    for k in range(3):
        write_image(root / "imagenet-r" / ABSENT / f"{ABSENT}_{k}.jpg")
    # ImageNet-Sketch as its zip unpacks (sketch/), placed inside imagenet-sketch/
    class_folder(root / "imagenet-sketch" / "sketch" / TABBY, 1, BEAGLE, 0, ".JPEG")
    class_folder(root / "imagenet-sketch" / "sketch" / BEAGLE, 0, TABBY, 1, ".JPEG")
    class_folder(root / "imagenet-sketch" / "sketch" / SPORTS_CAR, 2, TABBY, 0, ".JPEG")
    # Stylized-ImageNet: train/ and val/ splits; val is scored
    class_folder(root / "stylized-imagenet" / "val" / BEAGLE, 1, TABBY, 1, ".JPEG")
    class_folder(root / "stylized-imagenet" / "train" / ABSENT, 1, TABBY, 0, ".JPEG")

    plan = prepare_paper_sets(root, train, log=lambda _: None)
    paper = score_paper_sets(plan, train, fake_classify(train), in_val=0.8, log=lambda _: None)
    r = paper["imagenet-r"]
    assert (r["top1"], r["images"], r["classes_scored"]) == (0.75, 4, 1)
    assert (r["classes_dropped"], r["images_dropped"], r["train_classes_absent"]) == (1, 3, 2)
    s = paper["sketch"]
    assert s["top1"] == pytest.approx(3 / 4) and s["classes_dropped"] == 0
    assert s["path"].endswith("imagenet-sketch/sketch") and s["classes_scored"] == 3
    st = paper["stylized"]
    assert st["path"].endswith("stylized-imagenet/val") and st["top1"] == 0.5
    assert st["images_dropped"] == 0 and st["train_classes_absent"] == 2
    assert paper["table"] == {"IN-val": 0.8, "IN-C": None, "Sketch": s["top1"],
                              "Stylized": 0.5, "IN-R": 0.75, "shape bias": None}
    json.dumps(paper)


# ---------------------------------------------------------------- cue conflict

def test_category_mapping_data():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids) and len(set(wnids)) == 1000
    assert wnids[281] == TABBY and wnids[404] == "n02690373"   # tabby, airliner
    cats = category_wnids()
    assert list(cats) == sorted(["airplane", "bear", "bicycle", "bird", "boat", "bottle", "car",
                                 "cat", "chair", "clock", "dog", "elephant", "keyboard", "knife",
                                 "oven", "truck"])
    assert {k: len(v) for k, v in cats.items()}["dog"] == 109 and cats["knife"] == ("n03041632",)
    assert TABBY in cats["cat"] and BEAGLE in cats["dog"]


def test_category_decision_is_the_argmax_of_mean_probabilities():
    train = (BEAGLE, BASSET, TABBY, TENCH)
    columns = category_columns(train)
    assert {k: sorted(v) for k, v in columns.items()} == {"cat": [2], "dog": [0, 1]}   # no tench
    one_hot_cat = np.array([[0.0, 0.0, 1.0, 0.0]])
    # dog's classes sum to 0.6 but average 0.3 < cat's 0.4: the released code averages
    split = np.array([[0.3, 0.3, 0.4, 0.0]])
    tie = np.array([[0.5, 0.5, 0.5, 0.0]])                  # first category in name order
    names = list(columns)
    assert [names[i] for i in category_decisions(np.vstack([one_hot_cat, split, tie]),
                                                 columns)] == ["cat", "cat", "cat"]
    # all 1000 classes: a probe with all its mass on tabby picks 'cat'
    full = category_columns(imagenet_wnids())
    assert len(full) == 16
    probs = np.zeros((1, 1000))
    probs[0, 281] = 1.0
    assert list(full)[category_decisions(probs, full)[0]] == "cat"


def cue_conflict_set(folder):
    """Stimuli named as in texture-vs-shape; the fake probe's pick per file."""
    picks = {"cat1-dog1": TABBY,        # shape
             "cat2-dog2": BEAGLE,       # texture
             "cat3-car1": TIGER_CAT,    # shape
             "dog1-cat1": BASSET,       # shape
             "dog2-dog3": BEAGLE,       # shape == texture: no information, left out
             "car1-knife1": SPORTS_CAR,  # knife is not a training category: dropped
             "car2-cat2": BEAGLE}       # neither cue: dog
    for stem in picks:
        write_image(folder / stem.split("-")[0].rstrip("0123456789") / f"{stem}.png")
    return picks


def test_shape_bias_of_constructed_stimuli(tmp_path):
    train = (BASSET, BEAGLE, TABBY, TIGER_CAT, SPORTS_CAR, TENCH)
    repo = tmp_path / "ood" / "texture-vs-shape"      # the repository, cloned
    picks = cue_conflict_set(repo / "stimuli" / "style-transfer-preprocessed-512")
    plan = prepare_paper_sets(tmp_path / "ood", train, log=lambda _: None)
    classify = fake_classify(train)
    r = score_paper_sets(plan, train, lambda im, tag: classify(im, tag, picks),
                         log=lambda _: None)["cue-conflict"]
    assert (r["shape_decisions"], r["texture_decisions"], r["other_decisions"]) == (3, 1, 1)
    assert r["shape_bias"] == pytest.approx(3 / 4)
    assert (r["images"], r["images_scored"], r["images_same_cue"], r["images_dropped"]) == \
        (7, 5, 1, 1)
    assert r["categories_scored"] == ["car", "cat", "dog"]
    assert "knife" in r["categories_not_covered"] and len(r["categories_not_covered"]) == 13


def test_cue_conflict_errors_name_the_problem(tmp_path):
    folder = tmp_path / "ood" / "cue-conflict"
    write_image(folder / "cat" / "dog1-cat1.png")           # shape prefix is not the folder
    with pytest.raises(ValueError, match="dog1-cat1.png"):
        prepare_paper_sets(tmp_path / "ood", (TABBY,), log=lambda _: None)
    (folder / "cat" / "dog1-cat1.png").unlink()
    write_image(folder / "cat" / "cat1-dog1.png")
    with pytest.raises(ValueError, match="none of the 16 categories"):   # before any feature
        prepare_paper_sets(tmp_path / "ood", (TENCH,), log=lambda _: None)
    plan = prepare_paper_sets(tmp_path / "ood", (TABBY, BEAGLE), log=lambda _: None)
    with pytest.raises(ValueError, match="none of the 16 categories"):
        score_cue_conflict(plan.cue_conflict, np.ones((1, 1)), (TENCH,))


# ---------------------------------------------------------------- discovery and errors

def test_suite_discovery_by_folder_names(tmp_path):
    root = tmp_path / "ood"
    write_image(root / "ImageNet-C" / "fog" / "2" / TABBY / f"{TABBY}_0.JPEG")
    write_image(root / "imagenet-sketch" / "sketch" / TABBY / f"{TABBY}_0.JPEG")
    write_image(root / "Stylized_ImageNet" / "val" / TABBY / f"{TABBY}_0.JPEG")
    (root / "unrelated").mkdir()
    found, missing = discover(root)
    assert found == {"imagenet-c": root / "ImageNet-C",
                     "sketch": root / "imagenet-sketch" / "sketch",
                     "stylized": root / "Stylized_ImageNet" / "val"}
    assert missing == ["imagenet-r", "cue-conflict"]
    (root / "sketch").mkdir()
    with pytest.raises(ValueError, match="imagenet-sketch, sketch"):
        discover(root)


def test_bad_roots_and_empty_sets_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover(tmp_path / "nowhere")
    (tmp_path / "ood" / "photos").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="none of the out-of-domain sets"):
        discover(tmp_path / "ood")
    (tmp_path / "ood" / "imagenet-r").mkdir()
    with pytest.raises(FileNotFoundError, match="imagenet-r has no class sub-folders"):
        prepare_paper_sets(tmp_path / "ood", (TABBY,), log=lambda _: None)
    write_image(tmp_path / "ood" / "imagenet-r" / ABSENT / "a.jpg")
    with pytest.raises(ValueError, match="none of the 1 classes .* is a training class"):
        prepare_paper_sets(tmp_path / "ood", (TABBY,), log=lambda _: None)
    write_image(tmp_path / "ood" / "imagenet-r" / TABBY / "b.jpg")
    (tmp_path / "ood" / "imagenet-r" / TABBY / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):                  # checked up front
        prepare_paper_sets(tmp_path / "ood", (TABBY,), log=lambda _: None)
    (tmp_path / "ood" / "imagenet-c" / "not_a_corruption").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no ImageNet-C folder"):
        prepare_paper_sets(tmp_path / "ood", (ABSENT,), log=lambda _: None)


def test_paper_table_order_and_format():
    paper = {"root": "ood", "missing": ["imagenet-r"],
             "table": {"IN-val": 0.7788, "IN-C": 0.4308, "Sketch": 0.2824, "Stylized": 0.162,
                       "IN-R": None, "shape bias": 0.25}}
    assert paper_table(paper, "moco").splitlines() == [
        "| model | IN-val | IN-C | Sketch | Stylized | IN-R | shape bias |",
        "|---|---|---|---|---|---|---|",
        "| moco | 77.88 | 43.08 | 28.24 | 16.20 | - | 0.250 |",
        "not found under ood: imagenet-r"]


# ---------------------------------------------------------------- `fastneg eval --suite paper`

def test_cli_errors_are_one_line(tmp_path, capsys):
    from fastneg.cli import main
    (tmp_path / "data" / "train").mkdir(parents=True)
    ckpt = tmp_path / "last.pt"
    assert main(["eval", str(ckpt), "--data", str(tmp_path / "data"), "--suite", "paper"]) == 2
    err = capsys.readouterr().err
    assert "--ood-root" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", str(ckpt), "--data", str(tmp_path / "data"), "--suite", "paper",
                 "--ood-root", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere does not exist" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_fastneg_eval_suite_paper_end_to_end(tmp_path, capsys):
    import torch

    from fastneg.cli import main
    from fastneg.moco import build_model

    classes = (TABBY, BEAGLE, SPORTS_CAR)
    data = tmp_path / "data"
    for split, n in (("train", 6), ("val", 2)):
        for c, value in zip(classes, (30, 130, 230)):
            for k in range(n):
                write_image(data / split / c / f"{c}_{k}.JPEG", value + 3 * k)
    ood = tmp_path / "ood"
    for c, value in zip(classes, (30, 130, 230)):
        write_image(ood / "imagenet-c" / "fog" / "3" / c / f"{c}_0.JPEG", value)
        write_image(ood / "sketch" / c / f"{c}_0.JPEG", 255 - value)
    write_image(ood / "sketch" / ABSENT / f"{ABSENT}_0.JPEG")
    write_image(ood / "imagenet-r" / BEAGLE / f"{BEAGLE}_0.jpg")
    for stem in ("cat1-dog1", "dog1-cat1", "car1-cat2"):
        write_image(ood / "cue-conflict" / stem.split("-")[0][:-1] / f"{stem}.png")

    args = dict(arch="resnet10s", dim=8, moco_k=8, moco_m=0.9, moco_t=0.2, mlp_hidden=16,
                cifar_stem=True, size=32)
    torch.manual_seed(0)
    ckpt = tmp_path / "run" / "last.pt"
    ckpt.parent.mkdir()
    torch.save({"model": build_model(args).state_dict(), "args": args, "epoch": 1, "step": 1},
               ckpt)
    out = tmp_path / "eval.json"
    assert main(["eval", str(ckpt), "--data", str(data), "--suite", "paper", "--ood-root",
                 str(ood), "--json", str(out), "--no-untrained", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| model | IN-val | IN-C | Sketch | Stylized | IN-R | shape bias |" in printed
    assert "not found under" in printed and "stylized" in printed
    r = json.loads(out.read_text())
    paper = r["paper"]
    assert "corrupt" not in r["linear"]                      # synthetic corruptions off
    assert paper["table"]["IN-val"] == r["linear"]["val"]
    assert paper["missing"] == ["stylized"]
    assert paper["sketch"]["classes_dropped"] == 1 and paper["sketch"]["images"] == 3
    assert paper["imagenet-c"]["present"] == {"fog": [3]}
    assert paper["cue-conflict"]["categories_scored"] == ["car", "cat", "dog"]
    for column in ("IN-C", "Sketch", "IN-R"):
        assert 0.0 <= paper["table"][column] <= 1.0
    cached = {p.name for p in (ckpt.parent / "eval-cache" / "last").glob("ood-*")
              if (p / "manifest.json").exists()}      # float16 shard caches (docs/probe.md)
    assert cached == {"ood-imagenet-c-fog-3", "ood-sketch", "ood-imagenet-r",
                      "ood-cue-conflict"}

"""`fastneg make-subset`: ImageNet-100 (or a class file) from ImageNet-1k trees laid out as the
real ones are (image-net.org and Kaggle), both val layouts, and every refusal leaving nothing."""
import io
import os
from pathlib import Path

import pytest
from PIL import Image

from fastneg.cli import main
from fastneg.data.imagefolder import scan_image_folder
from fastneg.data.subset import parse_class_list, read_classes

CLASSES = ["n01440764", "n01443537", "n02869837", "n13040303"]   # 4 of ImageNet-1k's classes
TRAIN_PER_CLASS = 3
VAL_PER_CLASS = 2


@pytest.fixture(scope="module")
def jpeg_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 90)).save(buf, "JPEG")
    return buf.getvalue()


def make_in1k(root: Path, jpeg: bytes, *, kaggle=False, flat_val=False, csv_at=None,
              classes=CLASSES) -> dict:
    """An ImageNet-1k tree in miniature; returns {val file name: wnid}.

    Train files are named as ImageNet's (n01440764/n01440764_10026.JPEG); val files are
    ILSVRC2012_val_%08d.JPEG, in class folders or flat with a LOC_val_solution.csv in the real
    format (ImageId,PredictionString with 'wnid x1 y1 x2 y2' per box, possibly several boxes).
    """
    base = root / "ILSVRC" / "Data" / "CLS-LOC" if kaggle else root
    truth, index = {}, 1
    rows = ["ImageId,PredictionString"]
    for c, wnid in enumerate(classes):
        (base / "train" / wnid).mkdir(parents=True)
        for i in range(TRAIN_PER_CLASS):
            (base / "train" / wnid / f"{wnid}_{10026 + 7 * i}.JPEG").write_bytes(jpeg)
        for _ in range(VAL_PER_CLASS):
            name = f"ILSVRC2012_val_{index:08d}.JPEG"
            folder = base / "val" if flat_val else base / "val" / wnid
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(jpeg)
            truth[name] = wnid
            boxes = f"{wnid} 12 34 400 300" + (f" {wnid} 1 2 30 40 " if index % 2 else " ")
            rows.append(f"ILSVRC2012_val_{index:08d},{boxes}")
            index += 1
    if flat_val and csv_at is not False:
        Path(csv_at or root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return truth


def listing(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def check_subset(out: Path, wanted, truth, in1k_base: Path, link="symlink"):
    """The subset holds exactly the wanted classes, every image of each, as links of the kind
    asked for, to the right source file."""
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        images = scan_image_folder(out / split)
        assert list(images.classes) == sorted(wanted)
        assert len(images) == per_class * len(wanted)
    for wnid in wanted:
        for f in (out / "train" / wnid).iterdir():
            src = in1k_base / "train" / wnid / f.name
            if link == "symlink":
                assert f.is_symlink() and Path(os.readlink(f)) == src.absolute()
            else:
                assert not f.is_symlink() and f.stat().st_ino == src.stat().st_ino
    val_files = {f.name: f.parent.name for f in (out / "val").rglob("*.JPEG")}
    assert val_files == {n: w for n, w in truth.items() if w in wanted}


# ---------------------------------------------------------------- the class lists

def test_in100_is_the_cmc_list_of_100_distinct_wnids():
    wnids, label = read_classes("in100")
    assert label == "in100"
    assert len(wnids) == 100 and len(set(wnids)) == 100
    # first and last entries of CMC's imagenet100.txt, in its order
    assert wnids[:3] == ["n02869837", "n01749939", "n02488291"]
    assert wnids[-1] == "n02090622"


def test_class_file_comments_and_errors(tmp_path):
    assert parse_class_list("# mine\nn01440764  # tench\n\nn01443537\n", "f") == \
        ["n01440764", "n01443537"]
    with pytest.raises(ValueError, match=r"f line 2: 'n0144' is not"):
        parse_class_list("n01440764\nn0144\n", "f")
    with pytest.raises(ValueError, match=r"line 3: n01440764 is listed twice \(first on line 1"):
        parse_class_list("n01440764\nn01443537\nn01440764\n", "f")
    with pytest.raises(ValueError, match="lists no class"):
        parse_class_list("# nothing\n", "f")


# ---------------------------------------------------------------- building

@pytest.mark.parametrize("kaggle, flat_val", [(False, False), (False, True), (True, True),
                                              (True, False)])
def test_subset_from_each_layout(tmp_path, jpeg_bytes, kaggle, flat_val, capsys):
    in1k = tmp_path / "in1k"
    truth = make_in1k(in1k, jpeg_bytes, kaggle=kaggle, flat_val=flat_val)
    classes = tmp_path / "mine.txt"
    wanted = ["n13040303", "n01440764", "n02869837"]
    classes.write_text("# three classes\n" + "\n".join(wanted) + "\n")
    out = tmp_path / "sub" / "in3"
    assert main(["make-subset", str(in1k), str(out), "--classes", str(classes)]) == 0
    base = in1k / "ILSVRC" / "Data" / "CLS-LOC" if kaggle else in1k
    check_subset(out, wanted, truth, base)
    printed = capsys.readouterr().out
    assert f"3 classes ({classes}), 9 train and 6 val images as symlinks" in printed
    assert [p.name for p in out.parent.iterdir()] == ["in3"]   # no staging folder left


def test_hardlinks_and_val_csv_flag(tmp_path, jpeg_bytes):
    in1k = tmp_path / "in1k"
    csv_file = tmp_path / "elsewhere" / "truth.csv"
    csv_file.parent.mkdir()
    truth = make_in1k(in1k, jpeg_bytes, flat_val=True, csv_at=csv_file)
    csv_file.write_bytes(b"\xef\xbb\xbf" + csv_file.read_bytes())   # saved with a BOM
    classes = tmp_path / "two.txt"
    classes.write_text("n01443537\nn02869837\n")
    out = tmp_path / "in2"
    assert main(["make-subset", str(in1k), str(out), "--classes", str(classes),
                 "--link", "hardlink", "--val-csv", str(csv_file)]) == 0
    check_subset(out, ["n01443537", "n02869837"], truth, in1k, link="hardlink")


def test_force_replaces_an_existing_subset(tmp_path, jpeg_bytes):
    in1k = tmp_path / "in1k"
    truth = make_in1k(in1k, jpeg_bytes)
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    one.write_text("n01440764\n")
    two.write_text("n01443537\nn13040303\n")
    out = tmp_path / "sub"
    assert main(["make-subset", str(in1k), str(out), "--classes", str(one)]) == 0
    assert main(["make-subset", str(in1k), str(out), "--classes", str(two), "--force"]) == 0
    check_subset(out, ["n01443537", "n13040303"], truth, in1k)
    assert len(list((in1k / "train").rglob("*.JPEG"))) == TRAIN_PER_CLASS * len(CLASSES)


# ---------------------------------------------------------------- refusals

def refused(capsys, argv, *expected):
    """main() exits 2 with one error line on stderr (after any progress bar) holding every
    expected piece, and no traceback."""
    assert main(argv) == 2
    text = capsys.readouterr().err
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1 and text.endswith(errors[0] + "\n"), text
    err = errors[0][errors[0].index("fastneg make-subset: error:"):]
    for piece in expected:
        assert piece in err, (piece, err)
    return err


@pytest.mark.parametrize("flat_val", [False, True])
def test_missing_classes_are_named_and_nothing_is_made(tmp_path, jpeg_bytes, capsys, flat_val):
    in1k = tmp_path / "in1k"
    make_in1k(in1k, jpeg_bytes, flat_val=flat_val)
    before = listing(tmp_path)
    # in100 has 2 of the tree's classes (n02869837, n13040303): 98 missing in train and val
    err = refused(capsys, ["make-subset", str(in1k), str(tmp_path / "out")],
                  "98 of 100 classes have no images in", "98 of 100 classes have no val images",
                  "n01749939, n02488291, n02107142, n13037406, n02091831 and 93 more")
    assert "n02869837" not in err
    assert listing(tmp_path) == before


def test_class_missing_from_val_only(tmp_path, jpeg_bytes, capsys):
    in1k = tmp_path / "in1k"
    make_in1k(in1k, jpeg_bytes)
    for f in (in1k / "val" / "n01443537").iterdir():
        f.unlink()
    classes = tmp_path / "c.txt"
    classes.write_text("n01440764\nn01443537\n")
    before = listing(tmp_path)
    err = refused(capsys, ["make-subset", str(in1k), str(tmp_path / "out"), "--classes",
                           str(classes)], "1 of 2 classes have no val images", "n01443537")
    assert "no images in" not in err   # train is complete
    assert listing(tmp_path) == before


def test_val_file_named_by_the_csv_but_missing(tmp_path, jpeg_bytes, capsys):
    in1k = tmp_path / "in1k"
    truth = make_in1k(in1k, jpeg_bytes, flat_val=True)
    gone = [n for n, w in truth.items() if w == "n01440764"][0]
    (in1k / "val" / gone).unlink()
    classes = tmp_path / "c.txt"
    classes.write_text("n01440764\n")
    before = listing(tmp_path)
    refused(capsys, ["make-subset", str(in1k), str(tmp_path / "out"), "--classes", str(classes)],
            "1 val images listed in", "missing from", Path(gone).stem)
    assert listing(tmp_path) == before


def test_flat_val_without_csv(tmp_path, jpeg_bytes, capsys):
    in1k = tmp_path / "in1k"
    make_in1k(in1k, jpeg_bytes, flat_val=True, csv_at=False)
    before = listing(tmp_path)
    refused(capsys, ["make-subset", str(in1k), str(tmp_path / "out")],
            "without class folders", "LOC_val_solution.csv", "--val-csv")
    assert listing(tmp_path) == before
    refused(capsys, ["make-subset", str(in1k), str(tmp_path / "out"), "--val-csv",
                     str(tmp_path / "nope.csv")], "--val-csv", "nope.csv")
    assert listing(tmp_path) == before


def test_bad_class_lists_and_bad_roots(tmp_path, jpeg_bytes, capsys):
    in1k = tmp_path / "in1k"
    make_in1k(in1k, jpeg_bytes)
    bad = tmp_path / "bad.txt"
    bad.write_text("n01440764\ntench\n")
    dup = tmp_path / "dup.txt"
    dup.write_text("n01440764\nn01440764\n")
    before = listing(tmp_path)
    out = str(tmp_path / "out")
    refused(capsys, ["make-subset", str(in1k), out, "--classes", str(bad)],
            "bad.txt line 2", "'tench'")
    refused(capsys, ["make-subset", str(in1k), out, "--classes", str(dup)],
            "dup.txt line 2", "listed twice")
    refused(capsys, ["make-subset", str(in1k), out, "--classes", "in1000"],
            "--classes in1000", "in100")
    refused(capsys, ["make-subset", str(tmp_path / "none"), out], "IN1K", "none")
    refused(capsys, ["make-subset", str(tmp_path), out], "neither train/", "ILSVRC")
    refused(capsys, ["make-subset", str(in1k), str(in1k)], "overlaps IN1K")
    refused(capsys, ["make-subset", str(in1k), str(tmp_path), "--force"], "overlaps IN1K")
    assert listing(tmp_path) == before


def test_existing_out_needs_force(tmp_path, jpeg_bytes, capsys):
    in1k = tmp_path / "in1k"
    make_in1k(in1k, jpeg_bytes)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = listing(tmp_path)
    refused(capsys, ["make-subset", str(in1k), str(out)], str(out), "exists", "--force")
    # with --force but an incomplete source, the old OUT stays as it was
    refused(capsys, ["make-subset", str(in1k), str(out), "--force"], "classes have no images")
    assert listing(tmp_path) == before and (out / "keep.txt").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("x")
    classes = tmp_path / "c.txt"
    classes.write_text("n01440764\n")
    refused(capsys, ["make-subset", str(in1k), str(afile), "--force", "--classes", str(classes)],
            "is not a folder")
    assert afile.read_text() == "x"


def test_a_failure_while_linking_leaves_nothing(tmp_path, jpeg_bytes, capsys, monkeypatch):
    """An error in the middle of the build (here the 5th link fails as on a full disk) removes
    the staging folder; OUT never appears."""
    import errno

    from fastneg.data import subset
    in1k = tmp_path / "in1k"
    make_in1k(in1k, jpeg_bytes)
    calls = []
    real = subset._link

    def failing(src, dst, kind):
        calls.append(dst)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst, kind)

    monkeypatch.setattr(subset, "_link", failing)
    classes = tmp_path / "c.txt"
    classes.write_text("n01440764\nn01443537\n")
    before = listing(tmp_path)
    refused(capsys, ["make-subset", str(in1k), str(tmp_path / "out"), "--classes", str(classes)],
            "No space left on device", "cannot create the link")
    assert len(calls) == 5 and listing(tmp_path) == before

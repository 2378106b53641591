"""Scalable evaluation: float16 shard cache, streaming statistics, mini-batch probe, chunked kNN."""
import json

import numpy as np
import pytest
import torch

from fastneg.data.imagefolder import scan_image_folder
from fastneg.data.synthetic import DatasetSpec, make_dataset
from fastneg.eval import knn_predict, top1, train_linear_probe
from fastneg.eval.features import cached_feature_shards, extract_features
from fastneg.eval.knn import knn_predict_chunked
from fastneg.eval.linear import feature_stats, fit_linear_probe, train_linear_probe_sgd
from fastneg.eval.shards import MANIFEST, FeatureShards, ShardWriter, open_shards, write_shards

DIM = 48
ROW_BYTES = 2 * DIM   # float16 bytes of one row: shard_bytes = ROW_BYTES * rows per shard


def blobs(n, dim=DIM, classes=10, separation=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(n) % classes
    return centres[labels] * separation + torch.randn(n, dim, generator=g), labels


def tiny_backbone():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())


@pytest.fixture
def one_thread():
    """One torch thread: thousands of tiny steps on shared cores are many times slower with
    threads that wait on each other (as fastneg.eval.readout does for its small problems)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- shard cache

def test_shards_round_trip_as_float16_memory_maps(tmp_path):
    x, _ = blobs(1000)
    shards = write_shards(tmp_path / "f", x, key="k1", shard_bytes=ROW_BYTES * 300)
    manifest = json.loads((tmp_path / "f" / MANIFEST).read_text())
    assert manifest["key"] == "k1" and manifest["n"] == 1000 and manifest["dim"] == DIM
    assert manifest["dtype"] == "float16"
    assert [e["rows"] for e in manifest["shards"]] == [300, 300, 300, 100]
    assert all(isinstance(s, np.memmap) and s.dtype == np.float16 for s in shards.shards)
    expected = x.half().float()
    assert torch.equal(shards.load(), expected)
    for rows in (1, 7, 300, 5000):   # blocks cover every row once, in order, within a shard
        got = torch.cat([torch.from_numpy(b) for _, b in shards.blocks(rows)])
        assert torch.equal(got, expected)
        assert all(len(b) <= rows for _, b in shards.blocks(rows))
    idx = np.random.default_rng(0).permutation(1000)[:77]
    assert torch.equal(torch.from_numpy(shards.rows(idx)), expected[idx])


def test_values_beyond_float16_keep_their_shard_in_float32(tmp_path):
    x = torch.ones(20, 4)
    x[15] = 1e6   # inf in float16
    shards = write_shards(tmp_path / "f", x, shard_bytes=8 * 10)   # two shards of 10 rows
    assert [s.dtype for s in shards.shards] == [np.float16, np.float32]
    assert torch.equal(shards.load(), x)


def test_rows_may_arrive_in_any_order(tmp_path):
    x, _ = blobs(100)
    order = np.random.default_rng(1).permutation(100)
    with ShardWriter(tmp_path / "f", 100, shard_bytes=ROW_BYTES * 30) as w:
        for part in np.array_split(order, 9):
            w.write(part, x[part])
    assert torch.equal(open_shards(tmp_path / "f").load(), x.half().float())


def test_an_interrupted_write_leaves_no_valid_cache(tmp_path):
    folder = tmp_path / "f"
    old, _ = blobs(50)
    write_shards(folder, old, key="old", shard_bytes=ROW_BYTES * 20)
    with pytest.raises(RuntimeError, match="killed"):
        with ShardWriter(folder, 50, key="new", shard_bytes=ROW_BYTES * 20) as w:
            w.write(np.arange(30), old[:30])
            raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["f"]          # no staging folder left
    assert open_shards(folder, key="new") is None
    assert torch.equal(open_shards(folder, key="old").load(), old.half().float())
    with pytest.raises(ValueError, match="rows missing"):          # rows never written
        with ShardWriter(tmp_path / "g", 50, shard_bytes=ROW_BYTES * 20) as w:
            w.write(np.arange(45), old[:45])
    assert not (tmp_path / "g").exists()


def test_damaged_or_foreign_caches_read_as_misses(tmp_path):
    x, _ = blobs(60)
    folder = tmp_path / "f"
    write_shards(folder, x, key="k", shard_bytes=ROW_BYTES * 25)
    assert open_shards(folder, key="other") is None
    shard = folder / "shard-00001.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])                     # truncated by a crash
    assert open_shards(folder, key="k") is None
    shard.unlink()
    assert open_shards(folder, key="k") is None
    (folder / MANIFEST).write_text("{not json")
    assert open_shards(folder) is None
    assert open_shards(tmp_path / "absent") is None


def test_cached_feature_shards_extracts_once_and_matches_extract_features(tmp_path):
    root = make_dataset(tmp_path / "shapes", DatasetSpec(images_per_class=3, size=32),
                        progress=False)
    images = scan_image_folder(root / "train")
    want = extract_features(tiny_backbone(), images, size=32, batch_size=7)
    got = cached_feature_shards(tiny_backbone(), images, size=32, folder=tmp_path / "c",
                                key="a", batch_size=7, shard_bytes=2 * 32 * 8)
    assert len(got.shards) == -(-len(images) // 8)
    assert torch.allclose(got.load(), want, rtol=1e-3, atol=1e-4)   # float16 precision

    class Refuses(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the cache should have been read")
    again = cached_feature_shards(Refuses(), images, size=32, folder=tmp_path / "c", key="a")
    assert torch.equal(again.load(), got.load())
    other = cached_feature_shards(tiny_backbone(), images, size=32, folder=tmp_path / "c",
                                  key="b")   # another key: recomputed, not served stale
    assert other.key == "b" and json.loads((tmp_path / "c" / MANIFEST).read_text())["key"] == "b"


# ---------------------------------------------------------------- probe

def test_streaming_statistics_match_float64_over_any_blocks():
    x = (torch.randn(999, 8, dtype=torch.float64) * 0.01 + 1e4).float()   # large offset
    ref = x.double()
    shards = FeatureShards.from_tensor(x, shard_rows=100)
    for rows in (1, 33, 4096):
        mean, std = feature_stats(shards, rows=rows)
        assert torch.allclose(mean.double(), ref.mean(0), rtol=0, atol=1e-3)
        assert torch.allclose(std.double(), ref.std(0, unbiased=False), rtol=1e-3)
    _, std = feature_stats(torch.ones(10, 3))
    assert torch.equal(std, torch.full((3,), 1e-6))   # constant features stay finite


def test_minibatch_probe_is_deterministic_given_its_seed(tmp_path, one_thread):
    x, y = blobs(400)
    kw = dict(num_classes=10, epochs=3)
    a = train_linear_probe_sgd(x, y, seed=5, **kw)
    b = train_linear_probe_sgd(write_shards(tmp_path / "f", x, shard_bytes=ROW_BYTES * 64),
                               y, seed=5, **kw)   # shards of the float16 values
    c = train_linear_probe_sgd(x.half().float(), y, seed=5, **kw)
    d = train_linear_probe_sgd(x.half().float(), y, seed=6, **kw)
    assert a.method == "sgd"
    assert torch.equal(b.weight, c.weight) and torch.equal(b.bias, c.bias)
    assert not torch.equal(c.weight, d.weight)
    assert not torch.equal(a.weight, c.weight)


def test_probe_choice_follows_the_memory_budget(one_thread):
    x, y = blobs(300)
    assert fit_linear_probe(x, y, num_classes=10).method == "lbfgs"
    assert fit_linear_probe(x, y, num_classes=10, budget=0, epochs=2).method == "sgd"
    assert fit_linear_probe(x, y, num_classes=10, probe="sgd", epochs=2).method == "sgd"
    assert fit_linear_probe(x, y, num_classes=10, probe="lbfgs", budget=0).method == "lbfgs"
    with pytest.raises(ValueError, match="--probe"):
        fit_linear_probe(x, y, num_classes=10, probe="adam")
    with pytest.raises(ValueError, match="labels must lie"):
        train_linear_probe_sgd(x, y + 5, num_classes=10)
    with pytest.raises(ValueError, match="epochs"):
        train_linear_probe_sgd(x, y, num_classes=10, epochs=0)


def test_minibatch_probe_predicts_shards_like_tensors(tmp_path, one_thread):
    x, y = blobs(500)
    probe = train_linear_probe_sgd(x, y, num_classes=10, epochs=2)
    shards = write_shards(tmp_path / "f", x, shard_bytes=ROW_BYTES * 128)
    assert torch.equal(probe.predict(shards), probe.predict(shards.load()))
    assert top1(probe.predict(x), y) > 0.9


@pytest.mark.slow
def test_minibatch_probe_scores_what_lbfgs_scores_on_the_embedded_dataset(tmp_path,
                                                                         one_thread):
    """The default hyper-parameters, on the features suite.py computes for the untrained
    reference network of the embedded dataset (resnet10s, CIFAR stem, 32 px)."""
    from fastneg.moco import build_backbone
    root = make_dataset(tmp_path / "shapes", DatasetSpec(images_per_class=100, size=32),
                        progress=False)
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet10s", cifar_stem=True)
    train, val = (scan_image_folder(root / s) for s in ("train", "val"))
    train_f = cached_feature_shards(backbone, train, size=32, folder=tmp_path / "train", key="")
    val_f = extract_features(backbone, val, size=32)
    train_y, val_y = torch.from_numpy(train.labels), torch.from_numpy(val.labels)
    assert len(val_y) == 200
    lbfgs = train_linear_probe(train_f, train_y, num_classes=10)
    sgd = fit_linear_probe(train_f, train_y, num_classes=10, probe="sgd")
    acc_lbfgs, acc_sgd = top1(lbfgs.predict(val_f), val_y), top1(sgd.predict(val_f), val_y)
    assert acc_lbfgs > 0.3                                 # there is something to learn
    assert abs(acc_sgd - acc_lbfgs) <= 0.01
    assert (sgd.predict(val_f) == lbfgs.predict(val_f)).float().mean() > 0.9


# ---------------------------------------------------------------- kNN

@pytest.mark.parametrize("bank_chunk,query_chunk,shard_rows", [
    (1, 60, None), (7, 5, 13), (64, 1000, 50), (100_000, 3, 128)])
def test_chunked_knn_equals_knn_predict(bank_chunk, query_chunk, shard_rows, one_thread):
    bank, labels = blobs(300, separation=0.3, seed=0)
    queries, _ = blobs(120, separation=0.3, seed=1)
    for k, t in ((1, 0.07), (20, 0.07), (50, 0.5), (500, 0.1)):   # k above the bank size too
        want = knn_predict(bank, labels, queries, num_classes=10, k=k, temperature=t)
        got = knn_predict_chunked(FeatureShards.from_tensor(bank, shard_rows), labels,
                                  FeatureShards.from_tensor(queries, 17), num_classes=10, k=k,
                                  temperature=t, bank_chunk=bank_chunk,
                                  query_chunk=query_chunk, query_budget=4 * DIM * 40)
        assert torch.equal(got, want), (k, t)
    assert 0.3 < top1(want, torch.arange(120) % 10) < 1.0   # neither trivial nor hopeless


def test_chunked_knn_checks_its_inputs():
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        knn_predict_chunked(torch.zeros(4, 2), torch.zeros(4), torch.zeros(3, 5),
                            num_classes=2)
    with pytest.raises(ValueError, match="labels"):
        knn_predict_chunked(torch.zeros(4, 2), torch.zeros(3), torch.zeros(3, 2),
                            num_classes=2)
    with pytest.raises(ValueError, match="chunks"):
        knn_predict_chunked(torch.zeros(4, 2), torch.zeros(4), torch.zeros(3, 2),
                            num_classes=2, bank_chunk=0)


# ---------------------------------------------------------------- benchmarks/probe.py

def _bench():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "probe.py"
    spec = importlib.util.spec_from_file_location("bench_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_benchmark_reports_every_phase_and_extrapolates(tmp_path, one_thread):
    out = tmp_path / "r.json"
    argv = ["--n", "600", "--dim", "16", "--classes", "6", "--queries", "120",
            "--separation", "1.0", "--epochs", "2", "--baseline-n", "300",
            "--baseline-iter", "20", "--target", "6000", "--json", str(out)]
    assert _bench().main(argv) == 0
    r = json.loads(out.read_text())
    phases = {p["phase"]: p for p in r["phases"]}
    assert set(phases) == {"write", "stats", "probe", "predict", "knn", "baseline-lbfgs",
                           "baseline-sgd"}
    assert all(p["peak_rss_mb"] > 0 and p["peak_anon_mb"] > 0 for p in phases.values())
    for key in ("probe_top1", "knn_top1", "baseline_lbfgs_top1", "baseline_sgd_top1"):
        assert 1 / 6 + 0.1 < r[key] <= 1.0, key        # separable data: well above chance
    ex = r["extrapolated"]
    assert ex["knn_s"] == pytest.approx(phases["knn"]["seconds"] * 10, abs=0.1)
    assert ex["probe_s_per_epoch"] == pytest.approx(ex["probe_s"] / 2, abs=0.1)


def test_probe_benchmark_refuses_bad_flags_and_foreign_folders(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--n", "0"]) == 2
    assert "--n" in capsys.readouterr().err
    assert bench.main(["--n", "10", "--baseline-n", "20"]) == 2
    assert "--baseline-n" in capsys.readouterr().err
    mine = tmp_path / "mine"
    (mine / "train").mkdir(parents=True)
    (mine / "train" / "photo.jpg").write_bytes(b"precious")
    assert bench.main(["--n", "10", "--baseline-n", "0", "--out", str(mine)]) == 2
    assert "not written by this benchmark" in capsys.readouterr().err
    assert (mine / "train" / "photo.jpg").read_bytes() == b"precious"

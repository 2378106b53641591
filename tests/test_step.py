"""fastneg.step: the data half of the training step, and that the trainer and the throughput
benchmark both run it."""
import importlib.util
from pathlib import Path

import pytest
import torch

from fastneg import step as step_module
from fastneg.augment import MoCoV2Augment
from fastneg.data.files import available_cpus
from fastneg.data.synthetic import DatasetSpec, make_dataset
from fastneg.kernels import patch_negatives, sample_textures
from fastneg.loaders import Batch
from fastneg.step import make_views_and_negatives, scaled_patch_range

REPO = Path(__file__).resolve().parents[1]
N, SIZE, SEED = 4, 32, 3


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch():
    gen = torch.Generator().manual_seed(0)
    views = tuple(torch.randint(0, 256, (N, SIZE, SIZE, 3), dtype=torch.uint8, generator=gen)
                  for _ in range(2))
    return Batch(views=views, labels=torch.zeros(N, dtype=torch.int64),
                 indices=torch.arange(N, dtype=torch.int64) * 2)


class Textures:
    """A bank of 8 textures where dataset index i has texture i % 8."""

    def __init__(self):
        gen = torch.Generator().manual_seed(1)
        self.bank = torch.randint(0, 256, (8, 40, 40, 3), dtype=torch.uint8, generator=gen)

    def for_batch(self, indices):
        return self.bank, indices % 8


def test_scaled_patch_range_keeps_the_trainers_rule():
    assert scaled_patch_range(224) == (16, 72)
    assert scaled_patch_range(64) == (5, 21)
    assert scaled_patch_range(16) == (2, 5)     # sides of at least 2 pixels


def test_views_and_negatives_follow_the_documented_draws():
    aug, batch, rank, world, step = MoCoV2Augment(), _batch(), 1, 2, 5
    views, negatives = make_views_and_negatives(
        batch, aug=aug, seed=SEED, step=step, rank=rank, world_size=world, negatives="both",
        patch_range=(2, 8), textures=Textures())
    draws = [aug.sample(N, seed=SEED, step=step, view=v, first=rank * N) for v in range(2)]
    for v in range(2):
        assert torch.equal(views[v], aug.apply(batch.views[v], draws[v]))
    draw_step = step * world + rank
    assert len(negatives) == 2
    assert torch.equal(negatives[0], patch_negatives(views[0], layout="nchw", patch_range=(2, 8),
                                                     seed=SEED, step=draw_step))
    tex = sample_textures(Textures().bank, batch.indices % 8, size=SIZE, seed=SEED,
                          step=draw_step)
    assert torch.equal(negatives[1], aug.apply(tex, draws[0]))   # the query's draws


def test_ranks_draw_apart_and_negatives_are_optional():
    aug, batch = MoCoV2Augment(), _batch()
    kwargs = dict(aug=aug, seed=SEED, step=0, world_size=2, patch_range=(2, 8))
    rank0, ns0 = make_views_and_negatives(batch, rank=0, **kwargs)
    rank1, ns1 = make_views_and_negatives(batch, rank=1, **kwargs)
    assert not torch.equal(rank0[0], rank1[0]) and not torch.equal(ns0[0], ns1[0])
    assert make_views_and_negatives(batch, rank=0, negatives="none", **kwargs)[1] == []


def test_bad_arguments_name_themselves():
    kwargs = dict(aug=MoCoV2Augment(), seed=0, step=0)
    with pytest.raises(ValueError, match="negatives must be one of"):
        make_views_and_negatives(_batch(), negatives="jigsaw", **kwargs)
    with pytest.raises(ValueError, match="needs a texture bank"):
        make_views_and_negatives(_batch(), negatives="texture", **kwargs)


@pytest.fixture
def tiny_data(tmp_path):
    return make_dataset(tmp_path / "shapes", DatasetSpec(images_per_class=4, size=SIZE),
                        progress=False)


def test_trainer_and_throughput_benchmark_run_the_same_step(tiny_data, tmp_path, monkeypatch):
    from fastneg.train import loop as trainer
    from fastneg.benchmarking import data as bench_data
    throughput = _load(REPO / "benchmarks" / "throughput.py", "bench_throughput_step_check")
    the_step = step_module.make_views_and_negatives
    assert trainer.make_views_and_negatives is the_step
    assert throughput.FastnegBatches is bench_data.FastnegBatches   # the rows' batches
    assert bench_data.make_views_and_negatives is the_step

    calls = []

    def spy(batch, **kwargs):
        calls.append(kwargs["negatives"])
        return the_step(batch, **kwargs)

    # The benchmark's fastneg rows: a finished batch is exactly the step function's output.
    monkeypatch.setattr(bench_data, "make_views_and_negatives", spy)
    batches = bench_data.FastnegBatches("torch", tiny_data / "train", batch_size=8, size=SIZE,
                                        device="cpu", workers=0, negatives="patch")
    views, negatives = next(iter(batches))
    assert calls == ["patch"]
    batch = next(iter(batches.loader))
    want = the_step(batch, aug=batches.aug, seed=0, step=0, negatives="patch",
                    patch_range=scaled_patch_range(SIZE))
    assert all(torch.equal(a, b) for a, b in zip(views + negatives, want[0] + want[1]))

    # The trainer's step.
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(trainer, "make_views_and_negatives", spy)
    try:
        trainer.main(["--data", str(tiny_data), "--loader", "torch", "--workers", "0",
                      "--device", "cpu", "--size", str(SIZE), "--batch-size", "8",
                      "--moco-k", "16", "--dim", "16", "--mlp-hidden", "32", "--max-steps", "2",
                      "--out", str(tmp_path / "run")])
    finally:
        torch.set_num_threads(available_cpus())   # main() sets it per process
    assert calls == ["patch", "patch", "patch"]

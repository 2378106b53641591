"""GPU readiness checks that make sense on a CPU machine: the packaging of the CUDA extra, the
trainer's refusal to train a GPU preset on the CPU by accident, and the shuffle-BN seed."""
import importlib.metadata
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def _extra(name):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["optional-dependencies"][name]]


def test_cuda_extra_brings_nvvm_for_torchs_cuda_major():
    reqs = {r.name: r for r in _extra("cuda")}
    numba_cuda = reqs["numba-cuda"]
    # the cu13 extra is the one that installs NVVM/libdevice (cuda-toolkit[...,nvvm]) for CUDA 13
    assert numba_cuda.extras == {"cu13"}, numba_cuda
    # no wheel built for another CUDA major (cupy-cuda12x, nvidia-*-cu12, ...)
    assert not [r for r in reqs.values() if "12" in r.name.replace("numba-cuda", "")], reqs
    # torch's CUDA build (from its wheel's dependencies) is the same major
    torch_cuda = [r for r in importlib.metadata.requires("torch") or [] if "-cu1" in r]
    if torch_cuda:
        assert all("-cu13" in r for r in torch_cuda), torch_cuda
    if torch.version.cuda is not None:
        assert torch.version.cuda.split(".")[0] == "13"


def test_installed_numba_cuda_has_the_cu13_extra_with_nvvm():
    try:
        meta = importlib.metadata.metadata("numba-cuda")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("numba-cuda is not installed (the cuda extra of this project needs it)")
    assert "cu13" in meta.get_all("Provides-Extra")
    pinned = next(r for r in _extra("cuda") if r.name == "numba-cuda")
    assert pinned.specifier.contains(meta["Version"]), (pinned, meta["Version"])
    cu13 = [Requirement(r) for r in meta.get_all("Requires-Dist")
            if "extra" in r and Requirement(r).marker.evaluate({"extra": "cu13"})]
    toolkit = [r for r in cu13 if r.name == "cuda-toolkit"]
    assert toolkit and "nvvm" in toolkit[0].extras, cu13


# ---------------------------------------------------------------- no silent CPU fallback

@pytest.fixture
def no_gpu(monkeypatch, tmp_path):
    """torch sees no GPU; returns a function that fakes a loaded NVIDIA driver of a version."""
    from fastneg import gpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "NVIDIA_DRIVER_DIR", tmp_path / "no-driver")

    def with_driver(version_line):
        driver = tmp_path / "nvidia"
        driver.mkdir(exist_ok=True)
        (driver / "version").write_text(version_line)
        monkeypatch.setattr(gpu, "NVIDIA_DRIVER_DIR", driver)
    return with_driver


DRIVER_LINE = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 "
               "UTC 2023\nGCC version:  gcc version 12.2.0\n")


def test_paper_preset_without_a_gpu_is_refused_unless_device_cpu(no_gpu):
    from fastneg.gpu import refuse_cpu_fallback
    with pytest.raises(ValueError, match="--preset paper-in100 .*--device cpu"):
        refuse_cpu_fallback(None, "paper-in100")
    with pytest.raises(ValueError, match="paper-in100-b512"):
        refuse_cpu_fallback(None, "paper-in100-b512")
    refuse_cpu_fallback("cpu", "paper-in100")      # asked for explicitly: allowed
    refuse_cpu_fallback(None, None)                 # a plain CPU run stays as it is


def test_a_driver_torch_cannot_use_is_refused_naming_both_versions(no_gpu, monkeypatch):
    from fastneg.gpu import refuse_cpu_fallback
    no_gpu(DRIVER_LINE)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(ValueError) as e:
        refuse_cpu_fallback(None, None)
    message = str(e.value)
    assert "535.104.05" in message and "CUDA 13.0" in message and "--device cpu" in message
    assert "\n" not in message
    with pytest.raises(ValueError, match="535.104.05"):
        refuse_cpu_fallback("cuda", None)
    refuse_cpu_fallback("cpu", "paper-in100")


def test_a_usable_gpu_passes(no_gpu, monkeypatch):
    from fastneg.gpu import refuse_cpu_fallback
    no_gpu(DRIVER_LINE)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    refuse_cpu_fallback(None, "paper-in100")


def test_driver_version_parsing(tmp_path):
    from fastneg.gpu import nvidia_driver_version
    assert nvidia_driver_version(tmp_path / "absent") is None
    (tmp_path / "version").write_text(DRIVER_LINE)
    assert nvidia_driver_version(tmp_path) == "535.104.05"
    (tmp_path / "version").write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  "
                                      "580.65.06  Release Build\n")
    assert nvidia_driver_version(tmp_path) == "580.65.06"
    (tmp_path / "version").write_text("garbage")
    assert nvidia_driver_version(tmp_path) == "unknown"


def test_trainer_refuses_paper_preset_on_a_cpu_machine_in_one_line(tmp_path):
    """The real script, in a child process, on this machine (no GPU usable here)."""
    import subprocess
    import sys
    if torch.cuda.is_available():
        pytest.skip("a GPU is usable here: the refusal cannot happen")
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "train" / "moco.py"), "--preset",
                           "paper-in100", "--data", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "paper-in100" in lines[0] and "--device cpu" in lines[0], lines


def test_resuming_a_gpu_run_without_a_gpu_is_refused_unless_device_cpu(no_gpu, monkeypatch,
                                                                       tmp_path):
    """--resume of a run that trained on cuda (a paper preset), without --preset or --device,
    on a machine with no usable GPU: refused in one line; --device cpu continues it."""
    import importlib.util

    from fastneg import rundir
    spec = importlib.util.spec_from_file_location("train_moco_gpu", REPO / "train" / "moco.py")
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    saved = {**vars(trainer.build_parser().parse_args([])), **trainer.PRESETS["paper-in100"],
             "preset": "paper-in100", "device": "cuda", "bn": "shuffle",
             "patch_range": [16, 72]}
    fake = {"args": saved, "step": 10}
    monkeypatch.setattr(rundir, "resume_checkpoint",
                        lambda arg: (Path(arg) / "checkpoint.pt", dict(fake), None))
    parser = trainer.build_parser()
    with pytest.raises(ValueError) as e:
        trainer.resolve_args(parser, ["--resume", str(tmp_path)])
    message = str(e.value)
    assert "trained on cuda" in message and "paper-in100" in message, message
    assert "--device cpu" in message and "\n" not in message
    args, _ = trainer.resolve_args(parser, ["--resume", str(tmp_path), "--device", "cpu"])
    assert args.device == "cpu" and args.preset == "paper-in100"
    fake["args"] = {**saved, "device": "cpu", "preset": None}    # a CPU run resumes as before
    args, _ = trainer.resolve_args(parser, ["--resume", str(tmp_path)])
    assert args.device == "cpu"


# ---------------------------------------------------------------- gathers and shuffle-BN

def test_shuffle_seed_is_valid_and_distinct_for_any_seed():
    from fastneg.moco import shuffle_seed
    seeds = [shuffle_seed(s, t) for s, t in [(0, 0), (1, 0), (0, 2 ** 32), (2 ** 32, 0),
                                             (2 ** 62, 7), (2 ** 63 - 1, 2 ** 63 - 1)]]
    assert len(set(seeds)) == len(seeds)        # seed*2**32+step had (1, 0) == (0, 2**32)
    for s in seeds:
        assert 0 <= s < 2 ** 64
        torch.Generator().manual_seed(s)        # torch takes it (seed*2**32 overflowed 2**64)
    assert shuffle_seed(5, 3) == shuffle_seed(5, 3)


def _gather_worker(rank, store, results):
    import torch.distributed as dist
    import torch.nn.functional as F

    from fastneg.moco import MoCo, concat_all_gather
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        flat = torch.arange(6, dtype=torch.float32).view(2, 3) + 100 * rank
        images = (torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5) + 1000 * rank
                  ).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        gathered = concat_all_gather(images)
        torch.manual_seed(0)           # the same weights on both ranks
        model = MoCo(arch="resnet10s", dim=8, K=8, mlp_hidden=16, seed=2 ** 40)
        model.encoder_k.eval()         # frozen BN: shuffle-BN must return each rank its own rows
        torch.manual_seed(rank)
        x = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        err = (model.encode_momentum(x, step=2 ** 33)
               - F.normalize(model.encoder_k(x), dim=1)).abs().max().item()
        results[rank] = (concat_all_gather(flat), gathered,
                         gathered.is_contiguous(memory_format=torch.channels_last), err)
    finally:
        dist.destroy_process_group()


def test_two_rank_gathers_into_one_tensor_and_shuffle_bn_with_a_large_seed(tmp_path):
    import torch.multiprocessing as mp
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_gather_worker, args=(str(tmp_path / "store"), results), nprocs=2,
                           start_method="spawn")
        results = dict(results)
    base = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    for rank in (0, 1):
        flat, images, channels_last, err = results[rank]
        assert torch.equal(flat, torch.cat([torch.arange(6.).view(2, 3),
                                            torch.arange(6.).view(2, 3) + 100]))
        assert torch.equal(images.float(), torch.cat([base, base + 1000]).to(torch.bfloat16)
                           .float())
        assert channels_last
        assert err < 1e-6


# ---------------------------------------------------------------- CUDA kernels' compile flags

def test_cuda_device_functions_are_force_inlined(monkeypatch):
    """numba-cuda deprecates inline=True (a bool) for device functions; forceinline is the flag.
    (Its deprecation warning is constructed but never issued, so only the call can be checked.)"""
    from numba import config, cuda

    from fastneg.kernels import rng
    calls = []
    monkeypatch.setattr(config, "ENABLE_CUDASIM", False)
    monkeypatch.setattr(cuda, "jit", lambda *a, **kw: calls.append(kw) or (lambda f: f))
    rng.cuda_device_jit()
    assert calls == [{"device": True, "forceinline": True}]


# ---------------------------------------------------------------- tqdm is optional

def test_progress_stand_in_without_tqdm(monkeypatch, capsys):
    import importlib.util
    import sys
    monkeypatch.setitem(sys.modules, "tqdm", None)          # `import tqdm` now fails
    spec = importlib.util.spec_from_file_location("progress_without_tqdm",
                                                  REPO / "fastneg" / "progress.py")
    progress = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(progress)
    assert progress.tqdm.__module__ == "progress_without_tqdm"   # the stand-in, not tqdm
    assert list(progress.tqdm(range(3), desc="x")) == [0, 1, 2]
    with progress.tqdm(total=30, initial=10, unit="step", dynamic_ncols=True) as bar:
        bar.update(10)
        bar.set_postfix(loss="1.5")
    quiet = progress.tqdm(total=5, disable=True)
    quiet.update(2)
    quiet.set_postfix(loss="2")
    assert capsys.readouterr().err.splitlines() == ["20/30 step loss=1.5"]


def test_a_usable_gpu_with_a_numba_cuda_below_the_floor_is_refused(no_gpu, monkeypatch):
    from fastneg import versions
    from fastneg.gpu import refuse_cpu_fallback
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(versions, "cuda_problems", lambda: versions.problems(
        {"numba-cuda": "0.30.0"}, versions.CUDA_FLOOR))
    with pytest.raises(ValueError) as e:
        refuse_cpu_fallback(None, "paper-in100")
    assert "numba-cuda >= 0.30.4 (found 0.30.0" in str(e.value) and "\n" not in str(e.value)
    refuse_cpu_fallback("cpu", "paper-in100")      # a CPU run does not need numba-cuda

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
    from fastneg import rundir
    from fastneg.train import loop as trainer
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


class _FakeCuda:
    """Stand-ins for the torch.cuda calls of the torch loader's prefetch thread, recording
    what a real GPU would see (the current device per thread, stream syncs)."""

    def __init__(self, monkeypatch):
        import threading

        from fastneg.loaders import torch_loader
        self.local, self.log = threading.local(), []
        fake = self

        class Stream:
            def __init__(self, device=None):
                self.device = device

            def synchronize(self):
                fake.log.append("sync")

            def wait_event(self, event):
                pass

        class Event:
            def record(self, stream=None):
                pass

        def set_device(device):
            fake.local.device = torch.device(device).index

        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: __import__("contextlib").nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(device))
        monkeypatch.setattr(torch.cuda, "set_device", set_device)
        monkeypatch.setattr(torch_loader, "decode_jpeg",
                            lambda encoded, mode, device: fake.log.append("decode") or [])

    def current_device(self):
        return getattr(self.local, "device", 0)    # a new thread starts on device 0


def test_the_prefetch_thread_runs_on_the_loaders_device_before_its_iterator_starts(monkeypatch):
    # torch's pin-memory thread takes the current device of the thread that makes the DataLoader
    # iterator; made on the prefetch thread at device 0, every rank put a context on GPU 0
    from fastneg.loaders.torch_loader import prefetched
    fake = _FakeCuda(monkeypatch)
    seen = []

    def items():
        seen.append(fake.current_device())     # runs on the prefetch thread, as iter() would
        yield 1

    got = list(prefetched(items(), lambda item: item, torch.device("cuda", 3)))
    assert got == [1] and seen == [3]


def test_nvjpeg_decode_waits_for_the_work_queued_on_its_stream(monkeypatch):
    # torchvision's nvJPEG writes on a stream of its own into memory allocated on ours: memory
    # freed by our still-queued work must not be written early, so our stream is drained first
    from fastneg.loaders.torch_loader import _decode_jpeg_gpu
    fake = _FakeCuda(monkeypatch)
    _decode_jpeg_gpu([torch.zeros(4, dtype=torch.uint8)], torch.device("cuda", 0))
    assert fake.log == ["sync", "decode"]


def test_split_bn_takes_any_seed_the_trainer_takes():
    """Split BN seeded its permutation with seed * 2**32 + step, which overflows torch's 64-bit
    seed from seed 2**32 on (a RuntimeError at the first step); it uses shuffle_seed now."""
    from fastneg.moco import MoCo
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    for seed in (2 ** 32, 2 ** 63 - 1):
        model = MoCo(arch="resnet10s", dim=16, K=16, mlp_hidden=32, cifar_stem=True, bn="split",
                     bn_splits=2, seed=seed)
        feats = model.encode_momentum(x, step=3)
        assert feats.shape == (8, 16) and torch.isfinite(feats).all()
    # still a function of (seed, step) only: same draws, same keys
    a = MoCo(arch="resnet10s", dim=16, K=16, mlp_hidden=32, cifar_stem=True, bn="split",
             bn_splits=2, seed=5)
    b = MoCo(arch="resnet10s", dim=16, K=16, mlp_hidden=32, cifar_stem=True, bn="split",
             bn_splits=2, seed=5)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.encode_momentum(x, step=4), b.encode_momentum(x, step=4))


# ---------------------------------------------------------------- DALI's GPU-only source mode

@pytest.mark.slow
def test_dali_parallel_source_of_the_gpu_path_gives_the_serial_batches(tmp_path, monkeypatch):
    """With a GPU the DALI loader reads files in DALI's spawned worker processes (parallel
    external_source, the callback pickled, the epoch table reopened there); on the CPU it reads
    them in the pipeline's thread. The parallel mode, forced here on the CPU, must give the
    same batches in the same order over two epochs (the table's slots alternate)."""
    pytest.importorskip("nvidia.dali")
    import nvidia.dali.fn as dali_fn

    from fastneg.data.synthetic import DatasetSpec, make_dataset
    from fastneg.loaders import build_loader
    root = make_dataset(tmp_path / "shapes", DatasetSpec(images_per_class=4, size=32),
                        progress=False)
    train = root / "train" if (root / "train").exists() else root

    def epochs():
        loader = build_loader("dali", train, batch_size=8, size=24, device="cpu", workers=2)
        seen = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            seen.append([(b.indices.tolist(), b.views[0].clone(), b.views[1].clone())
                         for b in loader])
        return seen

    serial = epochs()
    source, forced = dali_fn.external_source, []

    def parallel_source(**kw):
        forced.append(kw["parallel"])
        return source(**{**kw, "parallel": True, "prefetch_queue_depth": 2})

    monkeypatch.setattr(dali_fn, "external_source", parallel_source)
    parallel = epochs()
    assert forced == [False]       # one pipeline, built for the CPU, run in the GPU's mode
    assert [[i for i, _, _ in e] for e in parallel] == [[i for i, _, _ in e] for e in serial]
    assert serial[0][0][0] != serial[1][0][0]          # the epochs differ
    for a, b in zip(sum(serial, []), sum(parallel, [])):
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_ffcv_loading_thread_stays_on_the_consumers_gpu(monkeypatch):
    """FFCV's EpochIterator thread switches to its streams' device and back for every batch;
    "back" is device 0 in a new thread, and cudaSetDevice(0) makes a context on GPU 0. The
    thread takes its streams' device first."""
    pytest.importorskip("ffcv")
    import threading

    from ffcv.loader.epoch_iterator import EpochIterator

    from fastneg.loaders.ffcv import _ReportingEpochIterator
    current, seen = threading.local(), []

    class Stream:
        device = torch.device("cuda", 3)

    monkeypatch.setattr(torch.cuda, "set_device", lambda d: setattr(current, "device", d))
    monkeypatch.setattr(EpochIterator, "run",
                        lambda self: seen.append(getattr(current, "device", "unset")))
    it = object.__new__(_ReportingEpochIterator)     # the thread's state only, no loader
    it.terminate_event, it.closed = threading.Event(), True
    for streams in ([Stream(), Stream()], [None, None]):   # a GPU; none (FFCV made no streams)
        it.cuda_streams = streams
        thread = threading.Thread(target=it.run)
        thread.start()
        thread.join()
    assert seen == [torch.device("cuda", 3), "unset"] and it.error is None


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


def test_the_dali_extra_is_built_for_torchs_cuda_major():
    # torch's wheels are CUDA 13; DALI's cuda120 build stays an extra of its own (dali-cuda120)
    dali = {r.name for r in _extra("dali")}
    assert "nvidia-dali-cuda130" in dali and not any("cuda12" in name for name in dali)
    assert {r.name for r in _extra("dali-cuda120")} >= {"nvidia-dali-cuda120"}
    if torch.version.cuda is not None:
        assert torch.version.cuda.split(".")[0] == "13"

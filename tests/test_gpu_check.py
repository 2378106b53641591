"""benchmarks/gpu_check.sh and its Python stages on a CPU machine: the whole script in a Python
where every optional package is hidden (it must run to the end, GPU stages skipped, exit 0),
and the stages that can run without a GPU."""
import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
HIDDEN = ("tqdm", "scipy", "matplotlib", "psutil", "pytest", "nvidia", "ffcv", "cupy")

# Imported by every Python the script starts (PYTHONPATH): importing a hidden package fails as
# if it were not installed.
SHIM = f'''
import sys

HIDDEN = {HIDDEN!r}


class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ImportError(f"{{name}} is hidden by the test's sitecustomize")
        return None


sys.meta_path.insert(0, _Hide())
'''


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def test_script_runs_to_the_end_without_optional_packages_or_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is usable here: the script would measure it for minutes")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)
    out, work, wheels = tmp_path / "out", tmp_path / "work", tmp_path / "wheels"
    wheels.mkdir()
    import zipfile
    with zipfile.ZipFile(wheels / "carried-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("carried_module.py", "VALUE = 1\n")
    env = {**os.environ, "PYTHONPATH": str(shim), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--with-wheels",
                           str(wheels), "--work", str(work), str(out)],
                          capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    info = json.loads((out / "env.json").read_text())
    assert not info["gpu"] and not any(info["packages"][p] for p in ("tqdm", "pytest", "scipy"))
    with open(out / "stages.tsv", newline="") as fh:
        stages = {r["stage"]: r for r in csv.DictReader(fh, delimiter="\t")}
    assert list(stages) == ["env", "data", "cuda_tests", "kernels", "augment", "decode",
                            "ceiling", "trainer"]
    assert stages["env"]["status"] == "ok"
    for name in list(stages)[1:]:
        assert stages[name]["status"] == "skipped" and "GPU" in stages[name]["note"], name
    assert "pytest" in stages["cuda_tests"]["note"]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["value"] for r in summary["report"]] == [gpu_check.NOT_MEASURED] * 7
    for name in list(stages)[1:]:    # every stage's JSON is written, a skipped one with why
        assert json.loads((out / f"{name}.json").read_text())["status"] == "skipped", name
    assert "| trainer (--loader torch" in done.stdout          # the README table, printed last
    assert (out / "gpu_check.log").read_text().count("skipped") >= 7
    # the stages' limits leave a minute of the 8 for start-up and the summaries
    assert sum(int(s["limit"]) for s in stages.values()) <= 7.5 * 60
    # the carried wheel is unpacked in the work folder, not installed; OUTDIR holds small files
    assert (work / "wheels" / "carried_module.py").exists()
    assert all(f.stat().st_size < 1 << 20 for f in out.rglob("*") if f.is_file())


def test_bad_usage_is_one_line_and_exit_2(tmp_path):
    script = str(REPO / "benchmarks" / "gpu_check.sh")
    for argv, message in ((["--with-wheels", str(tmp_path), str(tmp_path / "o")], "holds no .whl"),
                          (["--bogus", str(tmp_path / "o")], "unknown option --bogus"),
                          ([], "usage:")):
        done = subprocess.run(["bash", script, *argv], capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and message in done.stderr, (argv, done.stderr)


def test_env_compiles_a_kernel_and_names_the_fix_when_nvvm_is_missing(tmp_path, monkeypatch):
    pytest.importorskip("numba_cuda")
    assert gpu_check.main(["env", "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "env.json").read_text())["nvvm"] is True
    assert "HAS_nvvm=1" in (tmp_path / "a" / "env.sh").read_text()
    from numba import cuda

    def no_nvvm(*args, **kwargs):
        raise RuntimeError("libNVVM cannot be found")

    monkeypatch.setattr(cuda, "compile_ptx", no_nvvm)
    assert gpu_check.main(["env", "--out", str(tmp_path / "b")]) == 0
    info = json.loads((tmp_path / "b" / "env.json").read_text())
    assert info["nvvm"] is False and "HAS_nvvm=0" in (tmp_path / "b" / "env.sh").read_text()
    assert any("CUDA_HOME" in p and "libNVVM cannot be found" in p for p in info["problems"])


def test_env_skips_the_kernel_stages_below_numba_cudas_floor(tmp_path, monkeypatch):
    import fastneg.versions
    monkeypatch.setattr(fastneg.versions, "cuda_problems",
                        lambda: ["numba-cuda 0.30.2 is installed; fastneg needs >= 0.30.4"])
    assert gpu_check.main(["env", "--out", str(tmp_path)]) == 0
    info = json.loads((tmp_path / "env.json").read_text())
    assert info["nvvm"] is False and "HAS_nvvm=0" in (tmp_path / "env.sh").read_text()
    assert any("0.30.4" in p and "skipped" in p for p in info["problems"])


def test_readme_command_writes_the_table_between_its_markers_only(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "env.json").write_text(json.dumps({"gpu_name": "NVIDIA H100 80GB HBM3",
                                              "driver": "580.1", "torch": "2.11.0",
                                              "torch_cuda": "13.0", "python": "3.12.3",
                                              "cpus": 16}))
    (out / "ceiling.json").write_text(json.dumps({"img_per_s": 2000.0}))
    readme = tmp_path / "README.md"
    before, after = "# title\n\ntext before\n", "\ntext after\n"
    readme.write_text(before + gpu_check.README_START + "\nold table\n" + gpu_check.README_END
                      + after)
    assert gpu_check.main(["readme", "--out", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(before + gpu_check.README_START) and text.endswith(
        gpu_check.README_END + after)
    assert "old table" not in text and "NVIDIA H100 80GB HBM3" in text
    assert "| synthetic-data ceiling, resnet50 224 px bf16 | 2000 img/s | - |" in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="gpu-table:start"):
        gpu_check.main(["readme", "--out", str(out), "--readme", str(readme)])
    assert readme.read_text() == "no markers\n"


def test_summary_fills_the_table_from_the_stages_json(tmp_path):
    (tmp_path / "kernels.json").write_text(json.dumps({"rows": [
        {"op": "patch_negatives out=", "input": "bfloat16 NCHW channels_last", "of_copy": 0.85,
         "ms": 0.05, "copy_ms": 0.0425, "host_us": 40.0},
        {"op": "sample_textures out=", "input": "bank", "of_copy": 0.5, "ms": 0.1,
         "copy_ms": 0.05, "host_us": 30.0}]}))
    (tmp_path / "augment.json").write_text(json.dumps({"runs": [
        {"fused_ms_per_batch": 1.5, "torch_ms_per_batch": 9.0, "speedup_fused_vs_torch": 6.0}]}))
    (tmp_path / "ceiling.json").write_text(json.dumps({"img_per_s": 2000.0}))
    (tmp_path / "trainer.json").write_text(json.dumps({"img_per_s": 1900.0,
                                                       "data_wait_pct": 3.25}))
    assert gpu_check.main(["summary", "--out", str(tmp_path)]) == 0
    report = {r["measure"]: r["value"] for r in
              json.loads((tmp_path / "summary.json").read_text())["report"]}
    assert report["patch NS, bf16 NCHW channels_last, out= (vs copy_)"].startswith("85% of copy")
    assert report["patch NS, uint8 NHWC, out= (vs copy_)"] == gpu_check.NOT_MEASURED
    assert report["texture sampling, out= (vs copy_)"].startswith("50% of copy")
    assert report["fused augmentation, 224 px batch of 256"].startswith("fused 1.50 ms")
    trainer = [v for k, v in report.items() if k.startswith("trainer")][0]
    assert trainer == "1900 img/s, data wait 3.2%, 95% of the ceiling"
    assert report["torch loader, GPU decode"] == gpu_check.NOT_MEASURED


def test_data_stage_writes_the_train_split_only_and_once(tmp_path):
    out = tmp_path / "data"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "data", "--out", str(out),
           "--images-per-class", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, timeout=120, env=env, capture_output=True)
    assert sorted(p.name for p in out.iterdir()) == ["train", "train.complete"]
    images = sorted((out / "train").rglob("*.jpg"))
    assert len(images) == 10 and len({p.parent for p in images}) == 10
    before = images[0].stat().st_mtime_ns
    done = subprocess.run(cmd, check=True, timeout=120, env=env, capture_output=True, text=True)
    assert "already made" in done.stdout and images[0].stat().st_mtime_ns == before


def test_trainer_stage_reads_the_run_and_drops_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({
        "steps": 30, "img_per_s": 1234.5, "data_wait_pct": 7.5, "final_loss": 9.0,
        "device": "cuda:0", "world_size": 1, "args": {"arch": "resnet50", "size": 224}}))
    (run / "checkpoint.pt").write_bytes(b"x")
    assert gpu_check.main(["trainer", "--run", str(run), "--json", str(tmp_path / "t.json")]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["img_per_s"] == 1234.5 and result["data_wait_pct"] == 7.5
    assert result["args"]["arch"] == "resnet50"
    assert not (run / "checkpoint.pt").exists()


@pytest.mark.slow
def test_decode_and_ceiling_stages_run_their_code_on_the_cpu(tmp_path):
    """The GPU stages' code with --device cpu and tiny sizes: everything but the device."""
    from fastneg.data.synthetic import DatasetSpec, make_dataset
    data = make_dataset(tmp_path / "shapes", DatasetSpec(images_per_class=2, size=32),
                        progress=False)
    assert gpu_check.main(["decode", "--device", "cpu", "--data", str(data / "train"),
                           "--size", "32", "--batch-size", "4", "--epochs", "2",
                           "--warmup-epochs", "1", "--workers", "1",
                           "--json", str(tmp_path / "decode.json")]) == 0
    decode = json.loads((tmp_path / "decode.json").read_text())
    # whole epochs are timed (20 images, 5 batches of 4 each): nothing decoded before the clock
    # started is counted
    assert decode["images"] == 2 * 20 and decode["img_per_s"] > 0
    assert gpu_check.main(["ceiling", "--device", "cpu", "--arch", "resnet10s", "--size", "32",
                           "--batch-size", "8", "--steps", "1", "--warmup", "1", "--queue", "16",
                           "--json", str(tmp_path / "ceiling.json")]) == 0
    ceiling = json.loads((tmp_path / "ceiling.json").read_text())
    assert ceiling["img_per_s"] > 0 and ceiling["arch"] == "resnet10s"
    # the one-process trainer's BatchNorm, so trainer / ceiling compares data paths only
    assert (ceiling["bn"], ceiling["bn_splits"]) == ("split", 4)


def test_the_ceiling_runs_the_trainers_step_functions(monkeypatch, tmp_path):
    """No second copy of the step: the ceiling calls fastneg.step with its patch-range rule."""
    import fastneg.step
    calls = []
    real = fastneg.step.make_views_and_negatives

    def spy(batch, **kw):
        calls.append(kw["patch_range"])
        return real(batch, **kw)

    monkeypatch.setattr(fastneg.step, "make_views_and_negatives", spy)
    assert gpu_check.main(["ceiling", "--device", "cpu", "--arch", "resnet10s", "--size", "20",
                           "--batch-size", "8", "--steps", "1", "--warmup", "0", "--queue", "16",
                           "--json", str(tmp_path / "ceiling.json")]) == 0
    assert calls == [fastneg.step.scaled_patch_range(20)] == [(2, 6)]

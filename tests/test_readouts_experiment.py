"""fastneg.experiments.readouts: pairing by seed, the tables and plots (no training here)."""
import json

import pytest

from fastneg.experiments import readouts as ex


def fake_results():
    def run(title, seeds, shift):
        m = {"title": title, "seeds": seeds, "train_s": [10.0] * len(seeds)}
        for k in ex.TITLES:
            m[k] = [0.5 + 0.01 * s + shift for s in seeds]
        return m
    return {"moco": run("MoCo-v2", [0, 1, 2], 0.0),
            "patch-a2": run("+ patch NS (alpha 2)", [2, 0, 1], 0.1),   # other seed order
            "untrained": {"title": "untrained (reference)", "seeds": [None], "train_s": [None],
                          **{k: [0.2] for k in ex.TITLES}}}


def test_differences_are_paired_by_seed_not_by_position():
    d = ex.paired_differences(fake_results())
    assert set(d) == {"patch-a2"}
    for k in ex.TITLES:
        assert d["patch-a2"][k] == pytest.approx([0.1, 0.1, 0.1])   # per-seed offset cancels


def test_tables_and_plots(tmp_path):
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (fastneg[eval])")
    results = fake_results()
    summary = ex.summarize(results)
    text = ex.markdown(summary, ex.Setup(), wall_s=60.0)
    assert "| untrained (reference) |" in text and "1.0 min" in text
    row = next(line for line in text.splitlines() if line.startswith("| + patch NS (alpha 2) | +"))
    # Predicted up (shape read-out): +0.1 with sd 0 moves the predicted way; predicted down
    # (texture read-out) does not.
    cells = row.split(" | ")
    assert cells[1].startswith("+0.100") and cells[1].endswith("✓")
    assert cells[2].startswith("+0.100") and "✓" not in cells[2]
    paths = ex.plot(results, summary, tmp_path)
    assert [p.name for p in paths] == ["readouts_paired.png", "readouts_absolute.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_quick_setup_and_methods_need_moco(tmp_path):
    with pytest.raises(ValueError, match="moco"):
        ex.main(["--out", str(tmp_path), "--quick", "--methods", "patch-a2"])


def test_run_commands_are_accepted_by_the_trainer_and_eval(tmp_path):
    from fastneg.cli import build_parser as fastneg_parser
    from fastneg.train.config import build_parser
    train = build_parser()
    jobs = ex.make_jobs(tmp_path, tmp_path / "data", tmp_path / "ind", tmp_path / "bank",
                        ex.Setup(), ex.METHODS)
    assert [j.name for j in jobs] == [f"{m.name}-s{s}" for m in ex.METHODS for s in (0, 1, 2)]
    for job in jobs:
        train_cmd, readout_cmd, eval_cmd = job.commands
        assert train_cmd[1:3] == ["-m", "fastneg.train"]
        args = train.parse_args(train_cmd[3:])
        assert args.negatives == job.method.negatives and args.seed == job.seed
        assert args.crop_scale == [0.2, 1.0] and args.bn is None   # split BN: one process
        for cmd, data in ((readout_cmd, "ind"), (eval_cmd, "data")):
            parsed = fastneg_parser().parse_args(cmd[3:])
            assert parsed.verb == "eval" and parsed.data == str(tmp_path / data)
        assert eval_cmd[-1].endswith("eval.json")   # job_done looks for it: written last


def test_finish_writes_the_report_and_table_and_fails_on_failed_runs(tmp_path, capsys):
    from fastneg.experiments.shape_bias import finish
    plot = tmp_path / "a.png"
    assert finish(tmp_path, "x", {"wall_s": 60.0}, "| table |\n", [plot], 60.0, []) == 0
    assert json.loads((tmp_path / "x.json").read_text()) == {"wall_s": 60.0}
    assert (tmp_path / "x.md").read_text() == "| table |\n"
    out = capsys.readouterr().out
    assert f"wrote {plot}" in out and "| table |" in out and "total 1.0 min" in out
    assert finish(tmp_path, "x", {}, "t\n", [], 1.0, ["moco-s0: exit 1"]) == 1
    assert "moco-s0: exit 1" in capsys.readouterr().err

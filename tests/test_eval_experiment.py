"""fastneg.experiments.shape_bias: commands, tables and plots (no training here)."""
import json

import pytest

from fastneg.experiments import shape_bias as sb


def trainer_parser():
    from fastneg.train.config import build_parser
    return build_parser()


def test_run_commands_are_accepted_by_the_trainer_and_eval(tmp_path):
    from fastneg.cli import build_parser as fastneg_parser
    from fastneg.experiments.supervised import build_parser as supervised_parser

    jobs = sb.make_jobs(tmp_path, tmp_path / "data", tmp_path / "bank", sb.Setup(),
                        sb.ALL_METHODS, processes=2)
    assert [j.name for j in jobs] == [f"{m.name}-s{s}" for m in sb.METHODS for s in (0, 1, 2)] \
        + ["supervised-s0", "random-init-s0"]
    train = trainer_parser()
    for job in jobs:
        if job.method in sb.REFERENCES:
            args = supervised_parser().parse_args(job.commands[0][3:])
            assert (args.epochs == 0) == (job.method is sb.RANDOM_INIT)
            continue
        train_cmd, eval_cmd = job.commands
        assert "--nproc_per_node=2" in train_cmd
        args = train.parse_args(train_cmd[train_cmd.index("fastneg.train") + 1:])
        assert args.negatives == job.method.negatives and args.seed == job.seed
        assert (args.alpha is None) == (job.method.alpha is None)
        assert (args.texture_bank is not None) == (job.method.negatives == "texture")
        assert fastneg_parser().parse_args(eval_cmd[3:]).verb == "eval"


def fake_results():
    """Two methods x two seeds, numbers chosen so every summary can be checked by hand."""
    def method(title, seeds, val, bias):
        return {"title": title, "seeds": seeds, "train_s": [10.0] * len(seeds),
                "linear": {"val": val, "conflict": [0.5] * len(seeds),
                           "outline": [0.2] * len(seeds), "corrupt": [0.4] * len(seeds)},
                "knn": {s: [0.3] * len(seeds) for s in sb.SPLITS},
                "shape_bias": bias, "shape_bias_knn": [None] * len(seeds),
                "texture_match": [0.1] * len(seeds)}
    return {"moco": method("MoCo-v2", [0, 1], [0.6, 0.7], [0.5, 0.7]),
            "patch-a2": method("+ patch", [1, 0], [0.9, 0.7], [0.8, 0.6])}


def test_summary_means_spreads_and_paired_differences():
    s = sb.summarize(fake_results())
    assert s["moco"]["linear"]["val"]["mean"] == pytest.approx(0.65)
    assert s["moco"]["linear"]["val"]["std"] == pytest.approx(0.0707107, abs=1e-6)  # ddof 1
    assert s["moco"]["shape_bias_knn"]["n"] == 0
    # Paired by seed: seed 0: 0.7 - 0.6, seed 1: 0.9 - 0.7.
    d = s["patch-a2"]["delta_vs_moco"]
    assert d["linear_val"]["mean"] == pytest.approx(0.15)
    assert d["shape_bias"]["mean"] == pytest.approx(0.1)   # (0.6-0.5 + 0.8-0.7) / 2
    assert "delta_vs_moco" not in s["moco"]


def test_tables_and_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (fastneg[eval])")
    results = fake_results()
    md = sb.markdown(sb.summarize(results), sb.Setup(), wall_s=600.0)
    assert "| MoCo-v2 | 0.650 ± 0.071 |" in md and "+0.150 ± 0.071" in md
    assert "10.0 min" in md
    paths = sb.plot(results, tmp_path)
    assert [p.name for p in paths] == ["shape_bias_accuracy.png", "shape_bias_bias.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_finished_runs_are_recognized_by_their_command(tmp_path):
    job = sb.Job("moco-s0", sb.METHODS[0], 0, tmp_path / "run", [["true"]])
    assert not sb.job_done(job)
    sb.run_job(job)
    (job.run_dir / "eval.json").write_text(json.dumps({}))
    assert sb.job_done(job)
    job.commands = [["true", "--changed"]]
    assert not sb.job_done(job)
    with pytest.raises(RuntimeError, match="moco-s0.*exit code"):
        sb.run_job(sb.Job("moco-s0", sb.METHODS[0], 0, tmp_path / "bad", [["false"]]))


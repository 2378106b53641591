"""What non-semantic negatives change in the features: shape and texture read-outs.

    python -m fastneg.experiments.readouts --out runs/readouts           # the reported numbers
    python -m fastneg.experiments.readouts --out runs/readouts-dev --dev # for tuning only
    python -m fastneg.experiments.readouts --out runs/readouts-quick --quick   # end-to-end check

Trains plain MoCo-v2, + patch NS (alpha 2 and 3) and + texture NS (alpha 2), for three seeds
each (the same seeds for every method, so differences are paired by seed), on the embedded
dataset (label = shape; texture a shortcut with probability p_dominant), one process per run
(split BatchNorm). Every run is evaluated twice with `fastneg eval`:

- on its training dataset: linear probe on val (in domain), conflict and outline, and the
  cue-conflict shape bias;
- on a Trifeature dataset (`fastneg make-data --independent`: shape and texture family drawn
  independently): a linear read-out of the shape and of the texture family from the frozen
  features (regularization by cross-validation on train), and the scramble similarity (features
  of a val image against its patch-scrambled copy, patch sides above the training range).

The untrained network's numbers come with every evaluation (computed once per dataset).

Predictions, written before the experiment was run (docs/readouts.md): against plain MoCo-v2 of
the same seed, NS lowers the texture read-out and the scramble similarity and raises the shape
read-out and the shape bias; alpha 3 more so than alpha 2, at some in-domain (val) cost; the
texture NS less than the patch NS.

The dataset seed separates tuning from reporting: --dev uses data seed 1, the default seed 0;
settings were chosen on --dev runs only. A run whose outputs match its commands is not redone,
so an interrupted experiment continues where it stopped.

Outputs in --out: data/, data-independent/, bank/, runs/<method>-s<seed>/ (checkpoint, logs,
eval.json, readout.json), readouts.json and readouts.md (tables), readouts_paired.png (paired
differences per seed) and readouts_absolute.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from fastneg.data.files import available_cpus
from fastneg.data.synthetic import DatasetSpec, make_dataset
from fastneg.experiments.shape_bias import (METHODS, TRAINER, Job, _cell, _stats,
                                            experiment_parser, finish, job_done, run_all)

DEV_DATA_SEED, MAIN_DATA_SEED = 1, 0
INDEPENDENT_SEED_OFFSET = 10   # the Trifeature set's data seed: the main (or dev) seed + 10

# (key, title, predicted sign of NS - MoCo): +1 up, -1 down.
METRICS = (
    ("readout_shape", "shape read-out", +1),
    ("readout_texture", "texture read-out", -1),
    ("scramble", "scramble similarity", -1),
    ("shape_bias", "shape bias (conflict)", +1),
    ("linear_val", "val top-1 (in domain)", -1),   # the in-domain cost (alpha 3: predicted)
    ("linear_conflict", "conflict top-1", +1),
    ("linear_outline", "outline top-1", +1),
)
TITLES = {k: t for k, t, _ in METRICS}


@dataclass(frozen=True)
class Setup:
    data_seed: int = MAIN_DATA_SEED
    images_per_class: int = 300
    size: int = 64
    p_dominant: float = 0.8
    arch: str = "resnet10s"
    epochs: int = 30
    batch_size: int = 128
    moco_k: int = 512
    lr: float = 0.06
    crop_scale: tuple[float, float] = (0.2, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)

    def spec(self, independent: bool) -> DatasetSpec:
        seed = self.data_seed + (INDEPENDENT_SEED_OFFSET if independent else 0)
        return DatasetSpec(images_per_class=self.images_per_class, size=self.size, seed=seed,
                           p_dominant=self.p_dominant, independent=independent)


QUICK = dict(images_per_class=12, size=32, epochs=1, batch_size=32, moco_k=64, seeds=(0, 1))


# ---------------------------------------------------------------- preparing

def prepare_data(root: Path, spec: DatasetSpec) -> tuple[Path, bool]:
    """(root, whether it was (re)generated now); a stamp file records the spec it holds."""
    stamp = root.with_name(root.name + ".json")
    want = json.dumps(asdict(spec), sort_keys=True)
    if stamp.exists() and stamp.read_text() == want and (root / "train").is_dir():
        return root, False
    stamp.unlink(missing_ok=True)   # written last: its presence means a finished dataset
    make_dataset(root, spec, force=True, progress=False)
    stamp.write_text(want)
    return root, True


def prepare_bank(out: Path, data: Path, size: int, rebuild: bool) -> Path:
    from fastneg.texture.build import BankSpec, build_bank
    bank = out / "bank"
    # Exemplars of half the image side (see README: a whole-image exemplar copies the shape).
    build_bank(data / "train", bank, BankSpec(size=size, exemplar=size // 2),
               resume=not rebuild, force=rebuild, progress=False)
    return bank


def make_jobs(out: Path, data: Path, independent: Path, bank: Path, setup: Setup,
              methods) -> list[Job]:
    py = sys.executable
    jobs = []
    for method in methods:
        for seed in setup.seeds:
            run = out / "runs" / f"{method.name}-s{seed}"
            train = [py, *TRAINER, "--data", str(data), "--negatives", method.negatives,
                     "--arch", setup.arch, "--size", str(setup.size),
                     "--epochs", str(setup.epochs), "--batch-size", str(setup.batch_size),
                     "--moco-k", str(setup.moco_k), "--lr", str(setup.lr),
                     "--crop-scale", *map(str, setup.crop_scale), "--seed", str(seed),
                     "--out", str(run), "--save-every", str(setup.epochs), "--no-eval"]
            if method.alpha is not None:
                train += ["--alpha", str(method.alpha)]
            if method.negatives == "texture":
                train += ["--texture-bank", str(bank)]
            evaluate = [py, "-m", "fastneg.cli", "eval", str(run / "checkpoint.pt"),
                        "--corruptions", "none", "--threads", "1"]
            # The read-outs first: job_done looks for eval.json, written by the last command.
            commands = [train,
                        [*evaluate, "--data", str(independent), "--json",
                         str(run / "readout.json"), "--cache-dir",
                         str(run / "eval-cache" / "independent")],
                        [*evaluate, "--data", str(data), "--json", str(run / "eval.json")]]
            jobs.append(Job(f"{method.name}-s{seed}", method, seed, run, commands))
    return jobs


# ---------------------------------------------------------------- results

def metrics_of(ev: dict, ro: dict) -> dict:
    """{metric key: value} of one run from its eval.json (training data) and readout.json."""
    readout = ro.get("readout", {})
    return {"readout_shape": readout.get("shape"), "readout_texture": readout.get("texture"),
            "scramble": ro.get("scramble_similarity"), "shape_bias": ev.get("shape_bias"),
            "linear_val": ev["linear"].get("val"), "linear_conflict": ev["linear"].get("conflict"),
            "linear_outline": ev["linear"].get("outline")}


def collect(jobs: list[Job]) -> dict:
    """{method: {"title", "seeds", "train_s", metric: [value per seed]}} over finished runs,
    plus "untrained": the reference (one value per metric)."""
    out = {}
    for job in jobs:
        if not job_done(job):
            continue
        ev = json.loads((job.run_dir / "eval.json").read_text())
        ro = json.loads((job.run_dir / "readout.json").read_text())
        seconds = json.loads((job.run_dir / "job.json").read_text())["seconds"]
        m = out.setdefault(job.method.name, {"title": job.method.title, "seeds": [],
                                             "train_s": [], **{k: [] for k in TITLES}})
        m["seeds"].append(job.seed)
        m["train_s"].append(seconds[0])
        for k, v in metrics_of(ev, ro).items():
            m[k].append(v)
        if "untrained" not in out and "untrained" in ev and "untrained" in ro:
            ref = metrics_of(ev["untrained"], ro["untrained"])
            out["untrained"] = {"title": "untrained (reference)", "seeds": [None],
                                "train_s": [None], **{k: [v] for k, v in ref.items()}}
    if "untrained" in out:   # the reference goes last in tables and plots
        out["untrained"] = out.pop("untrained")
    return out


def paired_differences(results: dict, base: str = "moco") -> dict:
    """{method: {metric: [method - base for each seed both have]}} (NS methods only)."""
    if base not in results:
        return {}
    b = results[base]
    out = {}
    for name, m in results.items():
        if name in (base, "untrained"):
            continue
        common = [s for s in m["seeds"] if s in b["seeds"]]
        out[name] = {}
        for k in TITLES:
            diffs = []
            for s in common:
                x, y = m[k][m["seeds"].index(s)], b[k][b["seeds"].index(s)]
                if x is not None and y is not None:
                    diffs.append(x - y)
            out[name][k] = diffs
    return out


def summarize(results: dict) -> dict:
    diffs = paired_differences(results)
    return {"absolute": {name: {"title": m["title"], "n": len(m["seeds"]),
                                **{k: _stats(m[k]) for k in (*TITLES, "train_s")}}
                         for name, m in results.items()},
            "paired": {name: {k: {**_stats(v), "values": v} for k, v in d.items()}
                       for name, d in diffs.items()}}


def markdown(summary: dict, setup: Setup, wall_s: float | None) -> str:
    seeds = ", ".join(map(str, setup.seeds))
    keys = list(TITLES)
    lines = [f"Dataset seed {setup.data_seed} ({setup.images_per_class} images per class at "
             f"{setup.size} px, p_dominant {setup.p_dominant}); read-outs and scramble "
             f"similarity on the independent-factor set (data seed "
             f"{setup.data_seed + INDEPENDENT_SEED_OFFSET}). {setup.arch}, {setup.epochs} "
             f"epochs, batch {setup.batch_size}, K {setup.moco_k}, lr {setup.lr}, crop area "
             f"{setup.crop_scale[0]}-{setup.crop_scale[1]}, one process (split BN); seeds "
             f"{seeds}." + (f" Whole experiment: {wall_s / 60:.1f} min." if wall_s else ""), "",
             "**Mean ± sd over seeds** (chance: 0.100 for shape and texture):", "",
             "| method | " + " | ".join(TITLES[k] for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for s in summary["absolute"].values():
        lines.append("| " + " | ".join([s["title"]] + [_cell(s[k]) for k in keys]) + " |")
    lines += ["", "**Paired differences to MoCo-v2 with the same seed** (mean ± sd over seeds; "
              "the prediction's sign in the header; ✓ = the mean moved the predicted way by more "
              "than one sd):", "",
              "| method | " + " | ".join(f"{TITLES[k]} ({'+' if sign > 0 else '-'})"
                                         for k, _, sign in METRICS) + " |",
              "|---" * (len(keys) + 1) + "|"]
    for name, d in summary["paired"].items():
        cells = []
        for k, _, sign in METRICS:
            st = d[k]
            held = st["mean"] is not None and st["n"] > 1 and sign * st["mean"] > st["std"]
            cells.append(_cell(st, True) + (" ✓" if held else ""))
        title = summary["absolute"][name]["title"]
        lines.append("| " + " | ".join([title] + cells) + " |")
    train = ", ".join(f"{s['title']} {s['train_s']['mean']:.0f} s"
                      for s in summary["absolute"].values() if s["train_s"]["mean"] is not None)
    lines += ["", f"Training time per run: {train}.", ""]
    return "\n".join(lines)


def plot(results: dict, summary: dict, out: Path) -> list[Path]:
    """readouts_paired.png: per metric, the paired differences per seed (dots) and their mean
    (bar); readouts_absolute.png: the read-outs and scramble similarity per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = plt.get_cmap("tab10")
    paths = []
    paired = summary["paired"]
    if paired:
        fig, axes = plt.subplots(1, len(METRICS), figsize=(3 * len(METRICS), 3.8))
        for ax, (k, title, sign) in zip(axes, METRICS):
            for i, (name, d) in enumerate(paired.items()):
                vals = d[k]["values"]
                if vals:
                    ax.bar(i, np.mean(vals), 0.7, color=colours(i + 1), alpha=0.6)
                    ax.scatter([i] * len(vals), vals, color="black", s=10, zorder=3)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xticks(range(len(paired)),
                          [results[n]["title"].replace("+ ", "").replace(" NS", "")
                           for n in paired], rotation=40, ha="right", fontsize=7)
            ax.set_title(f"{title}\n(predicted {'up' if sign > 0 else 'down'})", fontsize=8)
        axes[0].set_ylabel("NS - MoCo-v2, same seed")
        fig.tight_layout()
        paths.append(out / "readouts_paired.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    keys = ("readout_shape", "readout_texture", "scramble", "shape_bias")
    names = list(results)
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [[v for v in results[name][k] if v is not None] for k in keys]
        pos = np.arange(len(keys)) - 0.4 + width * (i + 0.5)
        ax.bar(pos, [np.mean(v) if v else np.nan for v in vals], width, color=colours(i),
               alpha=0.75, label=results[name]["title"])
        for p, v in zip(pos, vals):
            ax.scatter([p] * len(v), v, color="black", s=8, zorder=3)
    ax.set_xticks(range(len(keys)), [TITLES[k] for k in keys])
    ax.set_ylim(0, 1)
    ax.axhline(0.1, color="grey", lw=0.8, ls="--", label="chance (read-outs)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    paths.append(out / "readouts_absolute.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    d = Setup()
    p = experiment_parser(__doc__, f"tuning datasets (data seed {DEV_DATA_SEED} instead of "
                                   f"{MAIN_DATA_SEED})")
    p.add_argument("--quick", action="store_true",
                   help="a tiny end-to-end check (12 images per class, 32 px, 1 epoch, "
                        "2 seeds); its numbers mean nothing")
    p.add_argument("--images-per-class", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--p-dominant", type=float)
    p.add_argument("--arch")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--moco-k", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--crop-scale", type=float, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--methods", nargs="+", default=[m.name for m in METHODS],
                   choices=[m.name for m in METHODS])
    p.epilog += "\nDefaults: " + ", ".join(f"{k} {v}" for k, v in asdict(d).items())
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup = replace(Setup(), **(QUICK if args.quick else {}),
                    data_seed=DEV_DATA_SEED if args.dev else MAIN_DATA_SEED)
    given = {k: getattr(args, k) for k in ("images_per_class", "size", "p_dominant", "arch",
                                           "epochs", "batch_size", "moco_k", "lr",
                                           "crop_scale", "seeds")
             if getattr(args, k) is not None}
    for k in ("crop_scale", "seeds"):
        if k in given:
            given[k] = tuple(given[k])
    setup = replace(setup, **given)
    if "moco" not in args.methods:
        raise ValueError("--methods must include moco: every difference is paired with it")
    methods = [m for m in METHODS if m.name in args.methods]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data, regenerated = prepare_data(out / "data", setup.spec(independent=False))
    independent, _ = prepare_data(out / "data-independent", setup.spec(independent=True))
    bank = prepare_bank(out, data, setup.size, regenerated) \
        if any(m.negatives == "texture" for m in methods) else out / "bank"
    print(f"data and bank: {time.perf_counter() - start:.0f} s", flush=True)
    jobs = make_jobs(out, data, independent, bank, setup, methods)
    reused = sum(job_done(j) for j in jobs)
    failures = run_all(jobs)
    results = collect(jobs)
    summary = summarize(results)
    wall = time.perf_counter() - start
    report = {"setup": asdict(setup), "quick": args.quick, "wall_s": wall, "reused_runs": reused,
              "python": sys.version.split()[0], "cores": available_cpus(),
              "summary": summary, "runs": results}
    return finish(out, "readouts", report, markdown(summary, setup, None if reused else wall),
                  plot(results, summary, out), wall, failures)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:
        print(f"readouts: error: {e}", file=sys.stderr)
        sys.exit(2)

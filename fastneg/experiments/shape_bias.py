"""The paper's effect on the embedded dataset: do non-semantic negatives reduce texture bias?

    python -m fastneg.experiments.shape_bias --out runs/shape-bias          # the reported numbers
    python -m fastneg.experiments.shape_bias --out runs/shape-bias-dev --dev  # for tuning only

Trains plain MoCo-v2, + patch NS (alpha 2 and 3) and + texture NS (alpha 2) for three seeds each,
plus two references (fastneg.experiments.supervised: trained with labels, and untrained), on the
shapes dataset (label = shape; texture = a shortcut that agrees with the label with probability
p_dominant), then evaluates every run with `fastneg eval`: linear probe and kNN on val (in
domain), conflict (texture of another class), outline (no texture) and corrupted val, and the
shape bias.

The dataset seed separates tuning from reporting: --dev generates the dataset with seed 1, the
default run with seed 0; every choice below was made on --dev runs only.

Choices, for 2 CPU cores and under 30 minutes in all (docs/shape_bias.md has the why):
  data      300 images per class at 32 px (val/conflict/outline: 60 per class), stored in grey:
            random per-image colours let MoCo tell images apart by colour alone, and aug-plus's
            colour jitter does not stop it (dev runs: val top-1 0.25 in colour, 0.37 in grey)
  model     resnet10s (narrow ResNet, 32..256 channels), batch 128, lr 0.06, T 0.2, m 0.99;
            the references: 15 epochs with labels, and none
  schedule  30 epochs; queue K 1024, below the 3,000 training images (a longer queue holds an
            older key of the query's own image as a negative); lr 0.6 learned less on dev
  NS        patch sides 2..10 px (the paper's 16..72 at 224 px, scaled); texture bank by image
            quilting from 16 px exemplars
Each run trains with one process per core (torchrun: MoCo's shuffle-BN needs several), then is
evaluated; runs follow one another. A run whose outputs match its command is not redone, so an
interrupted experiment continues where it stopped.

Measured: 23.9 min for the default run on 2 CPU cores (docs/shape_bias.md).

Outputs in --out: data/, bank/, corrupt/, runs/<method>-s<seed>/ (checkpoint, logs, eval.json),
shape_bias.json and shape_bias.md (tables), shape_bias_accuracy.png and shape_bias_bias.png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from fastneg.data.files import available_cpus
from fastneg.data.synthetic import SHAPES, DatasetSpec, make_dataset

SPLITS = ("val", "conflict", "outline", "corrupt")
SPLIT_TITLES = {"val": "val (in domain)", "conflict": "conflict", "outline": "outline",
                "corrupt": "corrupted val (-C)"}
DEV_DATA_SEED, MAIN_DATA_SEED = 1, 0
TRAINER = ["-m", "fastneg.train"]   # after python or torchrun: the trainer (fastneg.train)


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    negatives: str           # the trainer's --negatives
    alpha: float | None


METHODS = (
    Method("moco", "MoCo-v2", "none", None),
    Method("patch-a2", "+ patch NS (alpha 2)", "patch", 2.0),
    Method("patch-a3", "+ patch NS (alpha 3)", "patch", 3.0),
    Method("texture-a2", "+ texture NS (alpha 2)", "texture", 2.0),
)
# References, one seed each, trained (or not) by fastneg.experiments.supervised.
SUPERVISED = Method("supervised", "supervised (labels; reference)", "labels", None)
RANDOM_INIT = Method("random-init", "random init (untrained; reference)", "untrained", None)
REFERENCES = (SUPERVISED, RANDOM_INIT)
ALL_METHODS = (*METHODS, *REFERENCES)


@dataclass(frozen=True)
class Setup:
    data_seed: int = MAIN_DATA_SEED
    images_per_class: int = 300
    size: int = 32
    p_dominant: float = 0.8
    arch: str = "resnet10s"
    epochs: int = 30
    batch_size: int = 128
    moco_k: int = 1024
    lr: float = 0.06
    supervised_epochs: int = 15
    seeds: tuple[int, ...] = (0, 1, 2)
    grayscale: bool = True


@dataclass
class Job:
    name: str                # <method>-s<seed>
    method: Method
    seed: int
    run_dir: Path
    commands: list[list[str]]


# ---------------------------------------------------------------- preparing

def prepare_data(out: Path, setup: Setup) -> tuple[Path, bool]:
    """(dataset root, whether it was (re)generated now)."""
    spec = DatasetSpec(images_per_class=setup.images_per_class, size=setup.size,
                       seed=setup.data_seed, p_dominant=setup.p_dominant)
    root, stamp = out / "data", out / "data.json"
    want = json.dumps({**asdict(spec), "grayscale": setup.grayscale}, sort_keys=True)
    if stamp.exists() and stamp.read_text() == want and (root / "train").is_dir():
        return root, False
    stamp.unlink(missing_ok=True)   # written last: its presence means a finished dataset
    make_dataset(root, spec, force=True, progress=False)
    if setup.grayscale:
        to_grayscale(root, spec.quality)
    stamp.write_text(want)
    return root, True


def to_grayscale(root: Path, quality: int) -> None:
    """Rewrite every JPEG under `root` as grey (kept 3-channel, so nothing else changes)."""
    from PIL import Image
    for path in sorted(root.rglob("*.jpg")):
        Image.open(path).convert("L").convert("RGB").save(path, format="JPEG", quality=quality)


def prepare_bank(out: Path, data: Path, setup: Setup, rebuild: bool) -> Path:
    from fastneg.texture.build import BankSpec, build_bank
    bank = out / "bank"
    # Exemplars of half the image side keep about as much of an image as the paper's 96 px
    # crops of ImageNet photos.
    build_bank(data / "train", bank, BankSpec(size=setup.size, exemplar=setup.size // 2),
               resume=not rebuild, force=rebuild, progress=False)
    return bank


def make_jobs(out: Path, data: Path, bank: Path, setup: Setup, methods,
              processes: int) -> list[Job]:
    py = sys.executable
    # Several processes give MoCo its shuffle-BN (a no-op in one process, where the key
    # encoder's BatchNorm sees the whole batch and leaks which key goes with which query).
    launch = [py, "-m", "torch.distributed.run", "--standalone",
              f"--nproc_per_node={processes}"] if processes > 1 else [py]
    jobs = []
    for method in methods:
        seeds = setup.seeds[:1] if method in REFERENCES else setup.seeds
        for seed in seeds:
            run = out / "runs" / f"{method.name}-s{seed}"
            evaluate = [py, "-m", "fastneg.cli", "eval", str(run / "checkpoint.pt"),
                        "--data", str(data), "--json", str(run / "eval.json"),
                        "--corrupt-dir", str(out / "corrupt"), "--threads", "1"]
            if method in REFERENCES:
                epochs = setup.supervised_epochs if method is SUPERVISED else 0
                commands = [[py, "-m", "fastneg.experiments.supervised", "--data", str(data),
                             "--out", str(run), "--arch", setup.arch, "--size", str(setup.size),
                             "--epochs", str(epochs), "--batch-size",
                             str(setup.batch_size), "--seed", str(seed), "--workers", "0",
                             "--corrupt-dir", str(out / "corrupt")]]
            else:
                train = [*launch, *TRAINER, "--data", str(data), "--loader", "torch",
                         "--workers", "0",   # one core per process: decode in the process
                         "--negatives", method.negatives, "--arch", setup.arch,
                         "--size", str(setup.size), "--epochs", str(setup.epochs),
                         "--batch-size", str(setup.batch_size), "--moco-k", str(setup.moco_k),
                         "--lr", str(setup.lr), "--seed", str(seed), "--out", str(run),
                         "--save-every", str(setup.epochs), "--no-eval"]
                if method.alpha is not None:
                    train += ["--alpha", str(method.alpha)]
                if method.negatives == "texture":
                    train += ["--texture-bank", str(bank)]
                commands = [train, evaluate]
            jobs.append(Job(f"{method.name}-s{seed}", method, seed, run, commands))
    return jobs


# ---------------------------------------------------------------- running

def job_done(job: Job) -> bool:
    record = job.run_dir / "job.json"
    return (record.exists() and (job.run_dir / "eval.json").exists()
            and json.loads(record.read_text()).get("commands") == job.commands)


def run_job(job: Job) -> dict:
    """Run the job's commands in order; its timings. Output goes to RUN/experiment.log."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    (job.run_dir / "job.json").unlink(missing_ok=True)
    # A job that is not done starts again: the trainer refuses a new run over old checkpoints.
    for old in [*job.run_dir.glob("checkpoint*.pt"), job.run_dir / "log.csv"]:
        old.unlink(missing_ok=True)
    seconds = []
    with open(job.run_dir / "experiment.log", "w") as log:
        for cmd in job.commands:
            start = time.perf_counter()
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
            seconds.append(time.perf_counter() - start)
            if rc != 0:
                raise RuntimeError(f"{job.name}: command failed with exit code {rc}; see "
                                   f"{job.run_dir / 'experiment.log'}")
    record = {"commands": job.commands, "seconds": seconds}
    (job.run_dir / "job.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def run_all(jobs: list[Job]) -> list[str]:
    """Run the unfinished jobs one after the other; returns the failures."""
    todo = [j for j in jobs if not job_done(j)]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already done; running {len(todo)}",
          flush=True)
    failures = []
    for i, job in enumerate(todo, 1):
        try:
            seconds = run_job(job)["seconds"]
            print(f"[{i}/{len(todo)}] {job.name}: {' + '.join(f'{s:.0f}' for s in seconds)} s",
                  flush=True)
        except RuntimeError as e:
            failures.append(str(e))
            print(e, flush=True)
    return failures


# ---------------------------------------------------------------- results

def collect(jobs: list[Job]) -> dict:
    """{method: {"title", "seeds", "linear": {split: [..]}, "knn": {..}, "shape_bias": [..],
    "shape_bias_knn", "texture_match", "train_s"}} over the finished runs."""
    out = {}
    for job in jobs:
        if not job_done(job):
            continue
        ev = json.loads((job.run_dir / "eval.json").read_text())
        seconds = json.loads((job.run_dir / "job.json").read_text())["seconds"]
        m = out.setdefault(job.method.name, {
            "title": job.method.title, "seeds": [], "train_s": [],
            "linear": {s: [] for s in SPLITS}, "knn": {s: [] for s in SPLITS},
            "shape_bias": [], "shape_bias_knn": [], "texture_match": []})
        m["seeds"].append(job.seed)
        m["train_s"].append(seconds[0])
        for clf in ("linear", "knn"):
            for split in SPLITS:
                m[clf][split].append(ev[clf].get(split))
        for key in ("shape_bias", "shape_bias_knn", "texture_match"):
            m[key].append(ev.get(key))
    return out


def _stats(values) -> dict:
    v = np.asarray([x for x in values if x is not None], float)
    if len(v) == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "n": int(len(v))}


def summarize(results: dict) -> dict:
    """Means and standard deviations over seeds; paired (same seed) differences to MoCo."""
    summary = {}
    base = results.get("moco")
    for name, m in results.items():
        s = {"title": m["title"], "n": len(m["seeds"]),
             "linear": {k: _stats(v) for k, v in m["linear"].items()},
             "knn": {k: _stats(v) for k, v in m["knn"].items()},
             **{k: _stats(m[k]) for k in ("shape_bias", "shape_bias_knn", "texture_match",
                                          "train_s")}}
        if base is not None and name in {m.name for m in METHODS} - {"moco"}:
            common = [sd for sd in m["seeds"] if sd in base["seeds"]]

            def paired(a, b):
                return _stats([a[m["seeds"].index(sd)] - b[base["seeds"].index(sd)]
                               for sd in common
                               if a[m["seeds"].index(sd)] is not None
                               and b[base["seeds"].index(sd)] is not None])
            s["delta_vs_moco"] = {
                **{f"linear_{k}": paired(m["linear"][k], base["linear"][k]) for k in SPLITS},
                "shape_bias": paired(m["shape_bias"], base["shape_bias"])}
        summary[name] = s
    return summary


def _cell(st, signed=False) -> str:
    if st["mean"] is None:
        return "-"
    mean = f"{st['mean']:+.3f}" if signed else f"{st['mean']:.3f}"
    return mean if st["n"] < 2 else f"{mean} ± {st['std']:.3f}"


def markdown(summary: dict, setup: Setup, wall_s: float | None) -> str:
    """The tables; wall_s: the whole experiment's time (None when runs were reused)."""
    seeds = ", ".join(map(str, setup.seeds))
    lines = [f"Mean ± standard deviation over seeds {seeds} (references: seed {setup.seeds[0]}). "
             f"Dataset seed {setup.data_seed}, {setup.images_per_class} images per class at "
             f"{setup.size} px, p_dominant {setup.p_dominant}; {setup.arch}, {setup.epochs} "
             f"epochs, K {setup.moco_k}."
             + (f" Whole experiment: {wall_s / 60:.1f} min." if wall_s else ""), ""]
    for clf, title in (("linear", "Linear probe"), ("knn", "kNN (k 20, cosine, T 0.07)")):
        bias = "shape_bias" if clf == "linear" else "shape_bias_knn"
        lines += [f"**{title}**, top-1:", "",
                  "| method | " + " | ".join(SPLIT_TITLES[s] for s in SPLITS) + " | shape bias |"
                  + (" conflict = texture class |" if clf == "linear" else ""),
                  "|---" * (len(SPLITS) + 2 + (clf == "linear")) + "|"]
        for s in summary.values():
            row = [s["title"]] + [_cell(s[clf][sp]) for sp in SPLITS] + [_cell(s[bias])]
            if clf == "linear":
                row.append(_cell(s["texture_match"]))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    deltas = {k: s for k, s in summary.items() if "delta_vs_moco" in s}
    if deltas:
        lines += ["**Difference to MoCo-v2 with the same seed** (linear probe; mean ± sd of the "
                  "paired differences):", "",
                  "| method | " + " | ".join(SPLIT_TITLES[s] for s in SPLITS) + " | shape bias |",
                  "|---" * (len(SPLITS) + 2) + "|"]
        for s in deltas.values():
            d = s["delta_vs_moco"]
            lines.append("| " + " | ".join([s["title"]]
                                           + [_cell(d[f"linear_{k}"], True) for k in SPLITS]
                                           + [_cell(d["shape_bias"], True)]) + " |")
        lines.append("")
    train = ", ".join(f"{s['title']} {s['train_s']['mean']:.0f} s" for s in summary.values()
                      if s["train_s"]["mean"] is not None)
    lines += [f"Training time per run: {train}.", ""]
    return "\n".join(lines)


def plot(results: dict, out: Path) -> list[Path]:
    """Bar charts with one dot per seed: accuracy per split (linear, kNN) and shape bias."""
    import matplotlib
    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt

    names = list(results)
    colours = plt.get_cmap("tab10")
    width = 0.8 / len(names)

    def bars(ax, keys, labels, values_of, ylabel, ymax):
        """One group of bars per key; values_of(method results, key) -> values over seeds."""
        x = np.arange(len(keys))
        for i, name in enumerate(names):
            vals = [[v for v in values_of(results[name], k) if v is not None] for k in keys]
            means = [np.mean(v) if v else np.nan for v in vals]
            pos = x - 0.4 + width * (i + 0.5)
            ax.bar(pos, means, width, color=colours(i), alpha=0.75,
                   label=results[name]["title"])
            for p, v in zip(pos, vals):
                ax.scatter([p] * len(v), v, color="black", s=8, zorder=3)
        ax.set_xticks(x, labels)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, ymax)
        ax.grid(axis="y", alpha=0.3)

    paths = []
    top = max(v for m in results.values() for clf in ("linear", "knn")
              for vs in m[clf].values() for v in vs if v is not None)
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.5), sharey=True)
    for ax, clf in zip(axes, ("linear", "knn")):
        bars(ax, SPLITS, [SPLIT_TITLES[s] for s in SPLITS],
             lambda m, split, clf=clf: m[clf][split], "top-1", min(1.0, top + 0.1))
        ax.axhline(1 / len(SHAPES), color="grey", lw=0.8, ls="--", label="chance")
        ax.set_title("linear probe" if clf == "linear" else "kNN (k 20)")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("Accuracy per split (bars: mean over seeds; dots: seeds)")
    fig.tight_layout()
    paths.append(out / "shape_bias_accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    bars(ax, ("shape_bias", "shape_bias_knn"), ("linear probe", "kNN (k 20)"),
         lambda m, key: m[key], "shape bias (share of cue decisions made by shape)", 1.0)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="no preference")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title("Shape bias on the cue-conflict split")
    fig.tight_layout()
    paths.append(out / "shape_bias_bias.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------- main (shared with readouts)

def experiment_parser(doc: str, dev_help: str) -> argparse.ArgumentParser:
    """An experiment's parser: its module docstring as description (first paragraph) and epilog
    (the rest), --out and --dev."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=doc.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, help="experiment folder (reused to continue)")
    p.add_argument("--dev", action="store_true", help=dev_help)
    return p


def finish(out: Path, name: str, report: dict, markdown_text: str, plots, wall: float,
           failures: list) -> int:
    """Write out/NAME.json and out/NAME.md, print the plots written, the table and the wall
    time; the exit status (1 when a run failed, naming them on stderr)."""
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown_text)
    for path in plots:
        print(f"wrote {path}")
    print(markdown_text)
    print(f"total {wall / 60:.1f} min; results in {out}")
    if failures:
        print("failed runs:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    d = Setup()
    p = experiment_parser(__doc__, f"tuning dataset (data seed {DEV_DATA_SEED} instead of "
                                   f"{MAIN_DATA_SEED})")
    p.add_argument("--images-per-class", type=int, default=d.images_per_class)
    p.add_argument("--size", type=int, default=d.size)
    p.add_argument("--p-dominant", type=float, default=d.p_dominant)
    p.add_argument("--grayscale", action=argparse.BooleanOptionalAction, default=d.grayscale,
                   help="store the dataset in grey (default %(default)s; see docs/shape_bias.md)")
    p.add_argument("--arch", default=d.arch)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--moco-k", type=int, default=d.moco_k)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--supervised-epochs", type=int, default=d.supervised_epochs)
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    p.add_argument("--methods", nargs="+", default=[m.name for m in ALL_METHODS],
                   choices=[m.name for m in ALL_METHODS])
    p.add_argument("--processes", type=int, default=available_cpus(),
                   help="training processes per run (torchrun; default: available cores)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.processes < 1:
        raise ValueError(f"--processes must be >= 1, got {args.processes}")
    setup = replace(Setup(), data_seed=DEV_DATA_SEED if args.dev else MAIN_DATA_SEED,
                    images_per_class=args.images_per_class, size=args.size,
                    p_dominant=args.p_dominant, grayscale=args.grayscale, arch=args.arch,
                    epochs=args.epochs, batch_size=args.batch_size, moco_k=args.moco_k,
                    lr=args.lr, supervised_epochs=args.supervised_epochs, seeds=tuple(args.seeds))
    methods = [m for m in ALL_METHODS if m.name in args.methods]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    stages = {}

    def stage(name, t0):
        stages[name] = time.perf_counter() - t0
        print(f"{name}: {stages[name]:.0f} s", flush=True)

    t0 = time.perf_counter()
    data, regenerated = prepare_data(out, setup)
    stage("dataset", t0)
    t0 = time.perf_counter()
    bank = prepare_bank(out, data, setup, regenerated) \
        if any(m.negatives == "texture" for m in methods) else out / "bank"
    stage("texture bank", t0)
    t0 = time.perf_counter()
    from fastneg.eval.corrupt import corrupt_split
    corrupt_split(data / "val", out / "corrupt")   # once, before runs share it
    stage("corrupted val", t0)

    jobs = make_jobs(out, data, bank, setup, methods, args.processes)
    reused = sum(job_done(j) for j in jobs)
    t0 = time.perf_counter()
    failures = run_all(jobs)
    stage("training and evaluation", t0)

    results = collect(jobs)
    summary = summarize(results)
    wall = time.perf_counter() - start
    report = {"setup": asdict(setup), "processes": args.processes, "wall_s": wall,
              "stages_s": stages, "reused_runs": reused,
              "python": sys.version.split()[0], "cores": available_cpus(),
              "summary": summary, "runs": results}
    return finish(out, "shape_bias", report, markdown(summary, setup, None if reused else wall),
                  plot(results, out), wall, failures)


if __name__ == "__main__":
    sys.exit(main())

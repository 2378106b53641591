#!/usr/bin/env bash
# GPU check: everything fastneg claims about one NVIDIA GPU, in one run of under 8 minutes,
# with the Python that is already there (torch, torchvision, cupy, numba-cuda); no network,
# nothing installed.
#
#   benchmarks/gpu_check.sh OUTDIR        (PYTHON=... to pick the interpreter; default python3)
#
# Stages, each under its own time limit; a stage that fails or times out is recorded and the
# script goes on to the next one and to the summary:
#   data         the benchmark dataset (2,560 ImageNet-like ~500x375 JPEG q90 images), made once
#   cuda_tests   pytest -m cuda
#   kernels      benchmarks/kernels.py --device cuda   (NS kernels vs device-to-device copy)
#   augment      benchmarks/augment.py --device cuda
#   throughput   benchmarks/throughput.py --device cuda: the torch loader's nvJPEG path, DALI and
#                FFCV if importable, against the published baseline, <= 4 CPU workers
#   moco_step    benchmarks/moco_step.py: ResNet-50 MoCo-v2 step, bf16, channels_last, patch NS:
#                synthetic on-device data (the ceiling) vs the real data path (data-wait %)
# Writes to OUTDIR: <stage>.log and <stage>.json (or .xml), env.txt, stages.tsv, summary.json and
# gpu_check.log (everything printed); prints a short table last. Exit status: 0 when every stage
# passed, 1 when one failed, 2 when a needed package or the GPU is missing (nothing run).
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: benchmarks/gpu_check.sh OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
CPU_WORKERS=4                      # the target: the data path needs <= 4 CPU cores per GPU
DATA=data/imagenet-like-2560       # 20 batches of 128 per epoch: moco_step crosses one epoch end
exec > >(tee "$OUT/gpu_check.log") 2>&1
STAGES=$OUT/stages.tsv
printf 'stage\tstatus\texit\tseconds\tlimit\n' > "$STAGES"

# ---------------------------------------------------------------- preflight: fail clearly
if ! command -v "$PYTHON" >/dev/null; then
  echo "gpu_check: error: no '$PYTHON' interpreter (set PYTHON=...)"
  exit 2
fi
if ! "$PYTHON" - > "$OUT/env.txt" 2>&1 <<'EOF'
import importlib, platform, sys

missing = []
for name in ("torch", "torchvision", "numpy", "numba", "cupy", "pytest", "psutil", "PIL",
             "matplotlib"):
    try:
        importlib.import_module(name)
    except Exception as e:
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    sys.exit("gpu_check: error: missing Python packages: " + "; ".join(missing))
import cupy
import torch
from numba import cuda

problems = []
if not torch.cuda.is_available():
    problems.append(f"torch {torch.__version__} sees no CUDA GPU (torch.version.cuda="
                    f"{torch.version.cuda})")
try:
    if not cuda.is_available():
        problems.append("numba.cuda.is_available() is False (numba-cuda missing or no driver)")
except Exception as e:
    problems.append(f"numba.cuda: {type(e).__name__}: {e}")
try:
    cupy.arange(4).sum().item()
except Exception as e:
    problems.append(f"cupy cannot run on the GPU: {type(e).__name__}: {e}")
if problems:
    sys.exit("gpu_check: error: " + "; ".join(problems))
print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})"
      f"  cupy {cupy.__version__}  GPU {torch.cuda.get_device_name(0)}")
for name in ("nvidia.dali", "ffcv"):
    try:
        importlib.import_module(name)
        print(f"optional {name}: importable")
    except Exception as e:
        print(f"optional {name}: not importable ({type(e).__name__})")
EOF
then
  cat "$OUT/env.txt"
  exit 2
fi
cat "$OUT/env.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
  >> "$OUT/env.txt" 2>&1 || echo "nvidia-smi unavailable" >> "$OUT/env.txt"
echo "cpu cores: $(nproc)" >> "$OUT/env.txt"

LOADERS=torch
grep -q "optional nvidia.dali: importable" "$OUT/env.txt" && LOADERS="dali,$LOADERS"
grep -q "optional ffcv: importable" "$OUT/env.txt" && LOADERS="$LOADERS,ffcv"

# ---------------------------------------------------------------- stages
FAILED=0
run_stage() {   # run_stage NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2 start=$SECONDS rc=0 status=ok
  shift 2
  echo "== $name (limit ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  tail -n 25 "$OUT/$name.log"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status=timeout
  elif [ "$rc" -ne 0 ]; then
    status=failed
  fi
  [ "$status" = ok ] || FAILED=1
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - start))" "$limit" \
    >> "$STAGES"
}

# Limits add up to 465 s (+ preflight) so that the whole check ends inside 8 minutes.
if [ -f "$DATA/train/metadata.csv" ]; then
  printf 'data\tok\t0\t0\t0\n' >> "$STAGES"
else
  run_stage data 45 "$PYTHON" -m fastneg.cli make-data --out "$DATA" --imagenet-like \
    --images-per-class 256 --force
fi
run_stage cuda_tests 100 "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider -o timeout=60 \
  --junitxml "$OUT/cuda_tests.xml"
run_stage kernels 50 "$PYTHON" benchmarks/kernels.py --device cuda --json "$OUT/kernels.json"
run_stage augment 45 "$PYTHON" benchmarks/augment.py --device cuda --json "$OUT/augment.json"
run_stage throughput 110 "$PYTHON" benchmarks/throughput.py --device cuda --data "$DATA/train" \
  --loaders "$LOADERS" --workers "$CPU_WORKERS" --row-timeout 40 \
  --json "$OUT/throughput.json" --plot "$OUT/throughput.png"
run_stage moco_step 115 "$PYTHON" benchmarks/moco_step.py --device cuda --arch resnet50 \
  --batch-size 128 --precision bf16 --channels-last --negatives patch --steps 20 --warmup 5 \
  --loaders "$LOADERS" --workers "$CPU_WORKERS" --data "$DATA/train" --json "$OUT/moco_step.json"

# ---------------------------------------------------------------- summary (printed last)
"$PYTHON" - "$OUT" <<'EOF' || FAILED=1
import csv, json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
stages = list(csv.DictReader(open(out / "stages.tsv"), delimiter="\t"))


def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


notes = {}
try:
    suite = ET.parse(out / "cuda_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    notes["cuda_tests"] = (f"{suite.get('tests')} tests, {suite.get('failures')} failed, "
                           f"{suite.get('errors')} errors, {suite.get('skipped')} skipped")
except (OSError, ET.ParseError, IndexError):
    pass
lines = []
throughput = load("throughput.json") or []
for r in throughput:
    if r.get("status") == "ok":
        ratio = r.get("ratio_vs_baseline")
        lines.append(f"throughput  {r['loader']:>9}/{r['negatives']:<7} {r['img_per_s']:8.0f} img/s"
                     + (f"  {ratio:5.2f}x baseline" if ratio else ""))
    else:
        lines.append(f"throughput  {r['loader']:>9}/{r['negatives']:<7} {r['status']}: "
                     f"{r.get('reason', '')[:70]}")
moco = load("moco_step.json")
if moco:
    lines.append(f"moco_step   synthetic         {moco['ceiling']['img_per_s']:8.0f} img/s  "
                 f"(ceiling, {moco['arch']} {moco['precision']} batch {moco['batch_size']})")
    for r in moco["rows"]:
        if r["status"] == "ok":
            lines.append(f"moco_step   {r['loader']:>9}/{r['negatives']:<7} "
                         f"{r['img_per_s']:8.0f} img/s  {r['vs_ceiling']:5.2f}x ceiling, "
                         f"data wait {r['data_wait_pct']:.1f}%, {r['cpu_cores']:.1f} CPU cores")
        else:
            lines.append(f"moco_step   {r['loader']:>9}: {r['status']}: {r['reason'][:70]}")
summary = {"stages": stages, "throughput": throughput, "moco_step": moco,
           "kernels": load("kernels.json"), "augment": load("augment.json")}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print("\n================ gpu_check summary ================")
print((out / "env.txt").read_text().splitlines()[0])
print(f"{'stage':<12}{'status':<9}{'exit':>5}{'s':>6}{'limit':>7}  note")
for s in stages:
    print(f"{s['stage']:<12}{s['status']:<9}{s['exit']:>5}{s['seconds']:>6}{s['limit']:>7}  "
          f"{notes.get(s['stage'], '')}")
print("kernels, augment: see kernels.log / augment.log above and their .json")
print("\n".join(lines))
print(f"files: {out}")
EOF
exit "$FAILED"

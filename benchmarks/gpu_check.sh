#!/usr/bin/env bash
# GPU check: fastneg's GPU path measured in ONE call of under 8 minutes on a bare machine with
# one NVIDIA GPU and the Python already there (torch + torchvision for CUDA 13, numpy, numba,
# numba-cuda, Pillow); no network, nothing installed.
#
#   bash benchmarks/gpu_check.sh [--with-wheels DIR] [--work DIR] OUTDIR
#
#   --with-wheels DIR  wheels carried beside the tree (e.g. `pip download --no-deps` on a
#                      machine with a network) for packages the image lacks: unpacked into the
#                      work folder and put first on PYTHONPATH, nothing installed
#   --work DIR         where the bulky files go: the 1,920 JPEGs (kept, so a rerun skips that
#                      stage) and the trainer's run with its ~350 MB checkpoint (deleted after)
#                      (default: $TMPDIR/fastneg-gpu-check, or /tmp/...)
#   PYTHON=...         the interpreter (default: the first of python3, python3.12, python3.11,
#                      python that imports torch)
#
# Every other package is optional: a stage that needs a missing one (or the GPU) is recorded
# as skipped with the reason and the rest runs. Stages, each under its own time limit (they add
# up to 450 s); a stage that fails or times out is recorded and the next one runs:
#   env          packages, GPU, driver, one tiny kernel compiled  (benchmarks/gpu_check.py env)
#   data         the imagenet-like train split only, 1,920 JPEGs (gpu_check.py data)
#   cuda_tests   pytest -m cuda                                   (needs pytest)
#   kernels      patch NS and texture sampling vs device-to-device copy, CUDA events
#   augment      fused aug-plus kernel vs the torch-op chain, 224 px batch of 256
#   decode       the torch loader's GPU decode, img/s, whole epochs (gpu_check.py decode)
#   ceiling      the trainer's step on synthetic on-device data   (gpu_check.py ceiling)
#   trainer      torchrun --nproc_per_node=1 train/moco.py --loader torch --max-steps 30,
#                resnet50 224 px bf16 (--preset paper-in100), 4 loader workers
# OUTDIR gets only small files: <stage>.log, <stage>.json as each stage ends, stages.tsv,
# summary.json (rewritten after every stage, so a time-out keeps what ran before it) and
# gpu_check.log; the README's GPU table is printed last, and
#   python benchmarks/gpu_check.py readme --out OUTDIR
# writes it into README.md. Exit status: 0 when no stage failed or timed out (skipped stages
# included: on a machine without a GPU every GPU stage is skipped), 1 otherwise, 2 on bad usage.
set -uo pipefail

usage() {
  echo "usage: benchmarks/gpu_check.sh [--with-wheels DIR] [--work DIR] OUTDIR" >&2
  exit 2
}
WHEELS="" WORK=""
while [ $# -gt 0 ]; do
  case $1 in
    --with-wheels) [ $# -ge 2 ] || usage; WHEELS=$2; shift 2 ;;
    --work) [ $# -ge 2 ] || usage; WORK=$2; shift 2 ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    -*) echo "gpu_check: error: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || usage
if [ -n "$WHEELS" ] && ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "gpu_check: error: --with-wheels $WHEELS holds no .whl file" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
WORK=${WORK:-${TMPDIR:-/tmp}/fastneg-gpu-check}
mkdir -p "$WORK" || exit 2
WORK=$(cd "$WORK" && pwd)
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then      # the first interpreter that holds torch
  for candidate in python3 python3.12 python3.11 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
      PYTHON=$candidate
      break
    fi
  done
fi
if [ -z "${PYTHON:-}" ] || ! command -v "$PYTHON" >/dev/null; then
  echo "gpu_check: error: no Python with torch found (tried python3, python3.12, python3.11," \
       "python; set PYTHON=...)" >&2
  exit 2
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
if [ -n "$WHEELS" ]; then          # unpacked, never installed: a wheel is a zip of its files
  SITE=$WORK/wheels
  rm -rf "$SITE" && mkdir -p "$SITE"
  for whl in "$WHEELS"/*.whl; do
    "$PYTHON" -m zipfile -e "$whl" "$SITE" || { echo "gpu_check: error: cannot unpack $whl" >&2; exit 2; }
  done
  export PYTHONPATH=$SITE:$PYTHONPATH
fi
export PYTHONUNBUFFERED=1
DATA=$WORK/data
CPU_WORKERS=4          # the goal: the data path on <= 4 CPU cores per GPU
exec > >(tee "$OUT/gpu_check.log") 2>&1
STAGES=$OUT/stages.tsv
printf 'stage\tstatus\texit\tseconds\tlimit\tnote\n' > "$STAGES"
FAILED=0

summarize() {   # summary.json from every stage so far
  "$PYTHON" benchmarks/gpu_check.py summary --out "$OUT" "$@" || FAILED=1
}

record() {      # record NAME STATUS EXIT SECONDS LIMIT NOTE
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$STAGES"
  summarize
}

has() {         # has NAME: 1 when env found it (HAS_<NAME>=1 in env.sh)
  local var="HAS_$1"
  [ "${!var:-0}" = 1 ]
}

run_stage() {   # run_stage NAME LIMIT_SECONDS NEEDS COMMAND...   (NEEDS: comma list or -)
  local name=$1 limit=$2 needs=$3 start=$SECONDS rc=0 status=ok need missing=""
  shift 3
  for need in ${needs//,/ }; do
    [ "$need" = - ] || has "$need" || missing="$missing ${need}"
  done
  if [ -n "$missing" ]; then
    echo "== $name: skipped (missing:$missing)"
    # every stage leaves its JSON, a skipped one saying why
    printf '{"stage": "%s", "status": "skipped", "reason": "missing:%s"}\n' "$name" "$missing" \
      > "$OUT/$name.json"
    record "$name" skipped - 0 "$limit" "missing:$missing"
    return
  fi
  echo "== $name (limit ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  tail -n 15 "$OUT/$name.log"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status=timeout
  elif [ "$rc" -ne 0 ]; then
    status=failed
  fi
  [ "$status" = ok ] || FAILED=1
  record "$name" "$status" "$rc" "$((SECONDS - start))" "$limit" \
    "$([ "$status" = ok ] || tail -n 1 "$OUT/$name.log" | tr '\t' ' ' | cut -c1-100)"
}

# Limits: 45 + 40 + 110 + 45 + 40 + 40 + 50 + 80 = 450 s, the rest of 8 min for start-up and
# the summaries. cuda_tests compile every kernel cold (Numba's cache is empty on a new machine).
run_stage env 45 - "$PYTHON" benchmarks/gpu_check.py env --out "$OUT"
# shellcheck disable=SC1091
[ -f "$OUT/env.sh" ] && . "$OUT/env.sh"
run_stage data 40 GPU "$PYTHON" benchmarks/gpu_check.py data --out "$DATA"
# only the files that hold cuda tests: the others may import packages this machine lacks
mapfile -t CUDA_TEST_FILES < <(grep -l "mark\.cuda\b" tests/test_*.py)
run_stage cuda_tests 110 GPU,pytest,nvvm "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider \
  -o timeout=100 --junitxml "$OUT/cuda_tests.xml" "${CUDA_TEST_FILES[@]}"
run_stage kernels 45 GPU,nvvm "$PYTHON" benchmarks/kernels.py --device cuda --repeats 10 \
  --json "$OUT/kernels.json"
run_stage augment 40 GPU,nvvm "$PYTHON" benchmarks/augment.py --device cuda --batch 256 \
  --size 224 --repeats 5 --baseline-images 16 --dtype bfloat16 --json "$OUT/augment.json"
run_stage decode 40 GPU "$PYTHON" benchmarks/gpu_check.py decode --data "$DATA/train" \
  --workers "$CPU_WORKERS" --json "$OUT/decode.json"
run_stage ceiling 50 GPU,nvvm "$PYTHON" benchmarks/gpu_check.py ceiling \
  --json "$OUT/ceiling.json"
trainer() {
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 train/moco.py \
    --loader torch --max-steps 30 --preset paper-in100 --data "$DATA" \
    --workers "$CPU_WORKERS" --log-every 10 --out "$WORK/trainer-run" &&
  "$PYTHON" benchmarks/gpu_check.py trainer --run "$WORK/trainer-run" --json "$OUT/trainer.json"
}
export -f trainer
export PYTHON DATA CPU_WORKERS OUT WORK
rm -rf "$WORK/trainer-run"          # the trainer refuses to overwrite an earlier run
run_stage trainer 80 GPU,nvvm bash -c trainer
rm -rf "$WORK/trainer-run"          # its checkpoint is ~350 MB and measures nothing

summarize --print
exit "$FAILED"

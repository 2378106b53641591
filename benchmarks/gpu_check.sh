#!/usr/bin/env bash
# GPU check: fastneg's GPU path measured in ONE call of under 8 minutes on a bare machine with
# one NVIDIA GPU and the Python already there (torch + torchvision for CUDA 13, numpy, numba,
# numba-cuda, Pillow); no network, nothing installed, everything written under OUTDIR.
#
#   PYTHONPATH=. bash benchmarks/gpu_check.sh OUTDIR      (PYTHON=... picks the interpreter)
#
# Every other package is optional: a stage that needs a missing one (or the GPU) is recorded
# as skipped with the reason and the rest runs. Stages, each under its own time limit (they add
# up to 415 s); a stage that fails or times out is recorded and the next one runs:
#   env          packages, GPU, driver                          (benchmarks/gpu_check.py env)
#   data         the imagenet-like train split only, 1,920 JPEGs (gpu_check.py data)
#   cuda_tests   pytest -m cuda                                   (needs pytest)
#   kernels      patch NS and texture sampling vs device-to-device copy, CUDA events
#   augment      fused aug-plus kernel vs the torch-op chain, 224 px batch of 256
#   decode       the torch loader's GPU decode, img/s             (gpu_check.py decode)
#   ceiling      the trainer's step on synthetic on-device data   (gpu_check.py ceiling)
#   trainer      torchrun --nproc_per_node=1 train/moco.py --loader torch --max-steps 30,
#                resnet50 224 px bf16 (--preset paper-in100), 4 loader workers
# OUTDIR gets <stage>.log, <stage>.json as each stage ends, stages.tsv, summary.json (rewritten
# after every stage, so a time-out keeps what ran before it) and gpu_check.log; the README's
# GPU table is printed last. Exit status: 0 when no stage failed or timed out (skipped stages
# included: on a machine without a GPU every GPU stage is skipped), 1 otherwise, 2 on bad usage.
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: benchmarks/gpu_check.sh OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" >/dev/null; then
  echo "gpu_check: error: no '$PYTHON' interpreter (set PYTHON=...)" >&2
  exit 2
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
DATA=$OUT/data
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

# Limits: 30 + 40 + 70 + 45 + 40 + 40 + 60 + 90 = 415 s (< 7 min), the rest of 8 min for
# start-up and the summaries.
run_stage env 30 - "$PYTHON" benchmarks/gpu_check.py env --out "$OUT"
# shellcheck disable=SC1091
[ -f "$OUT/env.sh" ] && . "$OUT/env.sh"
run_stage data 40 GPU "$PYTHON" benchmarks/gpu_check.py data --out "$DATA"
# only the files that hold cuda tests: the others may import packages this machine lacks
mapfile -t CUDA_TEST_FILES < <(grep -l "mark\.cuda\b" tests/test_*.py)
run_stage cuda_tests 70 GPU,pytest "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider \
  -o timeout=60 --junitxml "$OUT/cuda_tests.xml" "${CUDA_TEST_FILES[@]}"
run_stage kernels 45 GPU,numba_cuda "$PYTHON" benchmarks/kernels.py --device cuda --repeats 10 \
  --json "$OUT/kernels.json"
run_stage augment 40 GPU,numba_cuda "$PYTHON" benchmarks/augment.py --device cuda --batch 256 \
  --size 224 --repeats 5 --baseline-images 16 --dtype bfloat16 --json "$OUT/augment.json"
run_stage decode 40 GPU "$PYTHON" benchmarks/gpu_check.py decode --data "$DATA/train" \
  --workers "$CPU_WORKERS" --json "$OUT/decode.json"
run_stage ceiling 60 GPU,numba_cuda "$PYTHON" benchmarks/gpu_check.py ceiling \
  --json "$OUT/ceiling.json"
trainer() {
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 train/moco.py \
    --loader torch --max-steps 30 --preset paper-in100 --data "$DATA" \
    --workers "$CPU_WORKERS" --log-every 10 --out "$OUT/trainer-run" &&
  "$PYTHON" benchmarks/gpu_check.py trainer --run "$OUT/trainer-run" --json "$OUT/trainer.json"
}
export -f trainer
export PYTHON DATA CPU_WORKERS OUT
run_stage trainer 90 GPU,numba_cuda bash -c trainer

summarize --print
exit "$FAILED"

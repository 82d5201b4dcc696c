#!/bin/bash
# Everything of conspo-jax that needs a GPU, in one command that ends inside 8 minutes on an H100/H200
# and prints one table last (bench/suite_table.py). Parts, each under its own time limit so that a slow
# or failing part cannot take the table with it:
#   (a) logprob  bench/logprob_step.py: the policy log-prob step (forward + backward), JAX vs the HF
#                PyTorch peer in the same run, at 8x2048, 16x2048, 4x8192, 16x8192 (1.5B architecture)
#   (b) sampler  bench/sampler.py --preset gpu: the JAX sampler vs HF generate (skipped, with the
#                reason printed, while that script does not exist)
#   (c) profile  bench/profile_model.py: compile analyses, HLO facts and a trace of the 1.5B training
#                step and one decode step, through conspo_jax.profiling
#
#   bench/gpu_suite.sh [--cpu] [--out DIR]
#
# --cpu runs a CPU-sized variant of every part to the end (tiny shapes; a check that the suite works,
# not a measurement). The GPU machine has no network: on the CPU machine, first run
#   ../shared/gpu/fetch_wheels.sh        # fills .whl/ with the wheels the GPU image lacks
# and take .whl/ along with the checkout; this script installs them from .whl/ when present and
# downloads nothing. Logs of every part, the HLO, traces and summary.json go to DIR (default
# /tmp/gpu_suite.<date>); when $OUT is set (the device tool's folder that comes back, at most 8 files)
# the logs, status.tsv, summary.json and the final table are also copied there. Time limits per part
# (seconds): LOGPROB_S, SAMPLER_S, PROFILE_S; PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."

cpu=0
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) cpu=1 ;;
    --out) out="$2"; shift ;;
    *) echo "gpu_suite.sh: unknown argument '$1' (expected --cpu or --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$out" ] || out="/tmp/gpu_suite.$(date -u +%Y%m%dT%H%M%S)"
mkdir -p "$out"

# JAX must not take 75% of the GPU up front: torch runs in the same command. Output arrives even when cut.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
  export PYTHONPATH="$PWD:$site"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$cpu" = 1 ]; then
  logprob_args=(--arch cpu-small --shapes 2x128,2x256 --steps 1 --warmup 1)
  sampler_args=(--preset cpu)
  profile_args=(--cpu --steps 2)
  : "${LOGPROB_S:=600}" "${SAMPLER_S:=300}" "${PROFILE_S:=300}"
else
  logprob_args=(--arch r1-distill-qwen-1.5b --shapes 8x2048,4x8192,16x8192,16x2048 --steps 3 --warmup 1)
  sampler_args=(--preset gpu)
  profile_args=(--steps 3 --shape 8x2048 --decode-shape 64x1024)
  : "${LOGPROB_S:=290}" "${SAMPLER_S:=80}" "${PROFILE_S:=90}"
fi

{
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  mode: $([ "$cpu" = 1 ] && echo cpu || echo gpu)"
  dirty=$(git diff --quiet 2> /dev/null || echo ' (dirty)')
  echo "commit: $(git rev-parse --short HEAD 2> /dev/null || echo unknown)$dirty"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -1
} | tee "$out/header.txt"

: > "$out/status.tsv"
run_part() {  # name, seconds, command...: runs under `timeout` (which ends the part's whole process group)
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$out/status.tsv"
  [ $rc = 124 ] && echo "--- $name: cut at its ${limit}s limit; rows finished so far are kept"
  [ $rc != 0 ] && [ $rc != 124 ] && { echo "--- $name failed (rc=$rc); last lines:"; tail -5 "$out/$name.log"; }
  return 0
}

run_part logprob "$LOGPROB_S" "$PY" bench/logprob_step.py "${logprob_args[@]}"
if [ -f bench/sampler.py ]; then
  run_part sampler "$SAMPLER_S" "$PY" bench/sampler.py "${sampler_args[@]}"
else
  echo "=== sampler: skipped, bench/sampler.py does not exist yet" | tee "$out/sampler.log"
  printf 'sampler\tskipped\t0\n' >> "$out/status.tsv"
fi
run_part profile "$PROFILE_S" "$PY" bench/profile_model.py "${profile_args[@]}" --out "$out/profile"

echo
echo "logs, HLO, traces: $out"
{
  cat "$out/header.txt"
  "$PY" bench/suite_table.py "$out"
} | tee "$out/table.txt"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ "$out" != "$OUT" ]; then
  cp "$out"/*.log "$out/status.tsv" "$out/table.txt" "$OUT"/ 2> /dev/null
  [ -f "$out/profile/summary.json" ] && cp "$out/profile/summary.json" "$OUT/profile_summary.json"
fi

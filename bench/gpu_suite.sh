#!/bin/bash
# Everything of conspo-jax that needs a GPU, in one command that ends inside 8 minutes on an H100/H200
# and prints one table last (bench/suite_table.py). Parts, each under its own time limit so that a slow
# or failing part cannot take the table with it:
#   (a) logprob  bench/logprob_step.py: the policy log-prob step (forward + backward), JAX vs the HF
#                PyTorch peer in the same run, at 8x2048, 16x2048, 4x8192, 16x8192 (1.5B architecture)
#   (b) sampler  bench/sampler.py --preset gpu: the JAX sampler vs HF generate (skipped, with the
#                reason printed, while that script does not exist)
#   (c) profile  `conspo profile` of experiments/r1_distill_qwen_1p5b.py:random (random weights, one
#                group of 8 x 2048 tokens, the arith tokenizer and a generated prompt file, since the GPU
#                machine has no checkpoint or data): compile analyses, HLO facts and traces of the RL
#                update and the sampler's prefill and decode chunk, through conspo_jax.profiling
#                (--cpu: the same command with the tiny-qwen2 architecture and short sequences)
#   (d) real     bench/real_model.py --arch r1-distill-qwen-1.5b --dtype bfloat16: rollouts (16 prompts x 8,
#                512 new tokens, full-length and long-tailed) against HF generate and the train step at
#                16x512 and 64x512 against torch, each with its fraction of the measured matmul and copy
#                limits (random weights: no checkpoint travels; --cpu: SmolLM2-sized tiny shapes)
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
# (seconds): LOGPROB_S, SAMPLER_S, PROFILE_S, REAL_S; PYTHON picks the interpreter (default python3).
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
  sampler_args=(--preset cpu --batches 16 --new 32 --tail-batch 16)  # a check, not the BENCHMARKS run
  profile_args=(--steps 2 --config.model.arch=tiny-qwen2 --config.rollout.n=4 --config.data.max_prompt_len=64
    --config.rollout.max_new_tokens=64)
  real_args=(--arch tiny-qwen2 --batches 2 --n 2 --new 16 --only limits,rollout)
  : "${LOGPROB_S:=600}" "${SAMPLER_S:=300}" "${PROFILE_S:=300}" "${REAL_S:=300}"
else
  logprob_args=(--arch r1-distill-qwen-1.5b --shapes 8x2048,4x8192,16x8192,16x2048 --steps 3 --warmup 1)
  sampler_args=(--preset gpu)
  profile_args=(--steps 3 --config.rollout.n=8 --config.data.max_prompt_len=256 --config.rollout.max_new_tokens=1792)
  real_args=(--arch r1-distill-qwen-1.5b --dtype bfloat16 --batches 16 --new 512 --only limits,rollout,train)
  : "${LOGPROB_S:=280}" "${SAMPLER_S:=80}" "${PROFILE_S:=120}" "${REAL_S:=150}"
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
# No checkpoint, tokenizer or data travel to the GPU machine: random weights of the config's architecture
# (its 151,936-token vocabulary kept), the synthetic task's tokenizer for the prompts, a generated prompt
# file, no benchmark evaluation. One prompt per step: the update is one micro-batch of n rows.
for i in $(seq 1 16); do echo "{\"problem\": \"What is $i + $i?\", \"answer\": \"$((2 * i))\"}"; done \
  > "$out/profile_prompts.jsonl"
run_part profile "$PROFILE_S" "$PY" -m conspo_jax profile --config experiments/r1_distill_qwen_1p5b.py:random \
  --workdir "$out/profile" --config.tokenizer=arith --config.data.train="$out/profile_prompts.jsonl" \
  --config.eval.benchmarks= --config.eval.every=0 --config.rollout.prompts_per_step=1 "${profile_args[@]}"
run_part real "$REAL_S" "$PY" bench/real_model.py "${real_args[@]}"

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

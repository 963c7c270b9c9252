#!/usr/bin/env bash
# Create .venv with the pinned stack and mmeff installed in editable mode (idempotent, offline-safe
# once the wheels are cached). Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import transformers, diffusers, lmms_eval, open_clip, triton, gradio" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
fi
# (re)install mmeff itself so the `mmeff` command and the lmms-eval entry point are registered
if ! (cd /tmp && "$OLDPWD/.venv/bin/python" -c "import importlib.metadata as m; m.version('mmeff')") 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
fi
.venv/bin/python -c "import mmeff; print('mmeff', mmeff.__version__, 'ready in .venv')"

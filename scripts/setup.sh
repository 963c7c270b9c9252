#!/usr/bin/env bash
# Create (or bring up to date) .venv with exactly the locked stack, and mmeff installed in editable mode.
#   bash scripts/setup.sh            # install what requirements.lock pins (fast when nothing changed)
#   bash scripts/setup.sh --fresh    # delete .venv first and build it from nothing (what CI does)
# The lock pins every package, transitive ones included; `bash scripts/lock.sh` refreshes it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv_common.sh
prepare_venv .venv "$@"
"${PIP[@]}" install -q -r requirements.lock
# mmeff itself, so the `mmeff` command and the lmms-eval entry point are registered
"${PIP[@]}" install -q --no-deps --no-build-isolation -e .
"${PIP[@]}" check
(cd /tmp && "$OLDPWD/.venv/bin/python" -c "
import transformers, diffusers, lmms_eval, open_clip, triton, gradio, filelock, mmeff
from lmms_eval.evaluator import simple_evaluate  # imports filelock._api: fails on an unlocked filelock
print('mmeff', mmeff.__version__, 'ready in .venv')")

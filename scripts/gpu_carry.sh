#!/usr/bin/env bash
# Pack the pure-Python packages the GPU image lacks (diffusers) or has at another version (transformers) from this
# machine's environment into .carry/pylibs.tar.xz (~6.5 MB), for `run`'s carry list. No download: the packages are
# copied from the installed environment; scripts/gpu_train_diffusion.sh unpacks them there in front of the image's own.
#
#   bash scripts/gpu_carry.sh            # PY=/path/to/python to pick the environment (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SITE=$("$PY" -c "import diffusers, os; print(os.path.dirname(os.path.dirname(diffusers.__file__)))")
mkdir -p .carry
names=()
for pkg in diffusers transformers importlib_metadata lazy_importer; do
  [ -d "$SITE/$pkg" ] || { echo "missing $SITE/$pkg: install the project's environment first (scripts/setup.sh)"; exit 1; }
  names+=("$pkg" $(cd "$SITE" && ls -d "${pkg}"-*.dist-info))
done
tar --exclude=__pycache__ -C "$SITE" -cJf .carry/pylibs.tar.xz "${names[@]}"
ls -la .carry/pylibs.tar.xz
"$PY" -c "import diffusers, transformers; print('carried: diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

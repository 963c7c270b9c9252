#!/usr/bin/env bash
# Pack the pure-Python packages the GPU image lacks (diffusers) or has at another version (transformers) from this
# machine's environment into .carry/pylibs.tar.xz (about 3 MB), for `run`'s carry list. No download: the packages are
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
# transformers' model families other than these are left out (the working tree that travels, carry included, has a
# 64 MiB limit); the list is what the GPU scripts import (zoo VLMs, the diffusion pipelines' text encoders,
# the benchmarks' LLaVA / Qwen2-VL configs), checked by tests/zoo/test_gpu_carry.py.
KEEP_MODELS="auto bloom clip dinov2_with_registers encoder_decoder llama llava llava_next qwen2 qwen2_5_vl qwen2_vl
siglip t5 umt5 vit_mae"
# the same for diffusers' pipeline folders (the zoo's SD3, FLUX, PixArt, Wan, HunyuanVideo, CogVideoX and PAG)
KEEP_PIPELINES="cogvideo flux hunyuan_video pag pixart_alpha stable_diffusion stable_diffusion_3 wan"
excludes=()
for d in "$SITE"/transformers/models/*/; do
  m=$(basename "$d")
  case " $(echo $KEEP_MODELS) " in *" $m "*) ;; *) excludes+=(--exclude="transformers/models/$m") ;; esac
done
for d in "$SITE"/diffusers/pipelines/*/; do
  m=$(basename "$d")
  case " $KEEP_PIPELINES " in *" $m "*) ;; *) excludes+=(--exclude="diffusers/pipelines/$m") ;; esac
done
tar --exclude=__pycache__ "${excludes[@]}" -C "$SITE" -cJf .carry/pylibs.tar.xz "${names[@]}"
ls -la .carry/pylibs.tar.xz
"$PY" -c "import diffusers, transformers; print('carried: diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

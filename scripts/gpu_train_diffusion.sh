#!/usr/bin/env bash
# Continue tiny-sd3 and tiny-wan on a lent GPU in ONE device call (mmeff/zoo/train_gpu.py): slimmed checkpoints with
# their training.json, a quick shipped-vs-new fidelity (summary.json, samples.png) land in $OUT as at most 7
# files, each under 16 MiB. The Python side stops itself before SECONDS (default 450), so $OUT always comes back.
#
#   bash scripts/gpu_carry.sh                                  # once, here: .carry/pylibs.tar.xz (diffusers, transformers)
#   run: command "bash scripts/gpu_train_diffusion.sh 450", carry [".carry"], timeout_s 540   (docs/diffusion-testbed.md)
#   OUT=/tmp/g bash scripts/gpu_train_diffusion.sh 300 --smoke  # the same path on the CPU (3 steps a model)
#
# Back here: python -m mmeff.zoo.train_gpu --unpack <files_at> --to .zoo_ckpt/gpu (re-exports the pipelines), then the CPU
# trainers resume with
# --ckpt-dir .zoo_ckpt/gpu/<model>/ckpt (or continue with --init-from .zoo_ckpt/gpu/<model>/model).
set -u
SECONDS_LIMIT=${1:-450}
shift || true
OUT=${OUT:-runs/gpu-train}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONPATH="$PWD"
PY=${PY:-python3}
LOG="$OUT/train.log"
# the carried packages in front of the image's own (it has no diffusers and another transformers)
source scripts/gpu_pylibs.sh || true
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } >>"$LOG" 2>&1
$PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, diffusers.__file__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"
timeout $((${SECONDS_LIMIT%.*} + 45)) $PY -m mmeff.zoo.train_gpu --out "$OUT" --work "${WORK:-/tmp/mmeff-gpu-work}" --seconds "$SECONDS_LIMIT" "$@" >>"$LOG" 2>&1
rc=$?
echo "train_gpu rc=$rc" | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"
tail -c 3000 "$LOG"
exit $rc

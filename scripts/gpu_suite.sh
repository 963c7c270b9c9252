#!/usr/bin/env bash
# The GPU work of one device lease, in one command: environment, the Triton kernel tests on real
# hardware, and the benchmarks (block-sparse kernel, video sparse attention incl. a full Wan
# transformer forward, VLM pruning at LLaVA-1.5-7B size). Every step has its own time limit, so
# one failure never costs the others. Results land in $OUT (default runs/gpu).
#
#   bash scripts/gpu_suite.sh [step ...]    # steps: env tests bsa bsa-tune video video-random vmoba video-batch vlm
#                                         vlm-compiled zooprune-cost (default: env tests bsa video vlm vlm-compiled)
#   TINY=1 OUT=/tmp/suite bash scripts/gpu_suite.sh vlm-compiled   # the same step on the CPU, tiny model (a dry run)
#
# vlm-compiled: batch 1, dense vs FastV / EntropyPrune at budget 64 (BUDGETS=192,64 for both), all compiled
# (prefill: torch.compile mode reduce-overhead; decode: generate()'s CUDA-graph compile on a static cache);
# the JSON records compile times too, as each case compiles LLaVA-7B twice.
#
# A GPU image without diffusers (or with another transformers) gets them from .carry/pylibs.tar.xz
# (`bash scripts/gpu_carry.sh`, about 3 MB; name ".carry" in the call's carry list), else from wheels in .whl:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 transformers==5.23.0 importlib_metadata
# (keep .whl out of git, e.g. in .git/info/exclude). The wheels are about 16 MB: with the repository they pass the
# 64 MiB the call may send, so prefer the carry (python scripts/device_tree_size.py checks).
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
TINY=${TINY:-}
if source scripts/gpu_pylibs.sh; then
  :
elif ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
LOG="$OUT/suite.log"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "=== $name rc=$? in $((SECONDS - t0))s" | tee -a "$LOG"
}

steps=${*:-env tests bsa video vlm vlm-compiled}
for s in $steps; do
  case $s in
    env) step env 60 bash -c "nvidia-smi; $PY -c 'import torch, triton, transformers, diffusers; print(torch.__version__, triton.__version__, transformers.__version__, diffusers.__version__, torch.cuda.get_device_name())'" ;;
    tests) step tests 240 $PY -m pytest tests/kernels tests/video/test_vmoba_triton.py -o addopts="" -q -p no:cacheprovider ;;
    bsa) step bsa 170 $PY benchmarks/bench_block_sparse_attn.py --out "$OUT/bench_block_sparse_attn.json" ;;
    bsa-tune) step bsa-tune 170 $PY benchmarks/bench_block_sparse_attn.py --tune --out "$OUT/bench_block_sparse_attn_tune.json" ;;
    video) step video 300 $PY benchmarks/bench_video_sparse_attn.py --transformer wan1.3b-480p wan14b-720p \
             --transformer-repeats 2 --out "$OUT/bench_video_sparse_attn.json" ;;
    video-random) step video-random 200 $PY benchmarks/bench_video_sparse_attn.py --inputs random \
             --out "$OUT/bench_video_sparse_attn_random.json" ;;
    vmoba) step vmoba 200 $PY benchmarks/bench_video_sparse_attn.py --shapes wan1.3b-480p,wan14b-720p --drops 0.8 \
             --out "$OUT/bench_vmoba_breakdown.json" ;;
    video-batch) step video-batch 200 $PY benchmarks/bench_video_sparse_attn.py --shapes wan1.3b-480p --drops 0.8 \
             --batch 2 --out "$OUT/bench_video_batch2.json" ;;
    vlm) step vlm 200 $PY benchmarks/bench_vlm_pruning.py --profile dense fastv:budget=64 entropyprune:budget=64 \
             --out "$OUT/bench_vlm_pruning.json" ;;
    zooprune-cost) step zooprune-cost 150 $PY benchmarks/zooprune_cost.py --device cuda --out "$OUT/zooprune_cost.json" ;;
    vlm-compiled) step vlm-compiled 420 $PY benchmarks/bench_vlm_pruning.py --compiled ${TINY:+--tiny} \
             --budgets "${BUDGETS:-64}" --new-tokens 32 --repeats 5 --out "$OUT/bench_vlm_compiled.json" ;;
    *) echo "unknown step $s" | tee -a "$LOG" ;;
  esac
done

"""vLLM with the plugin against the transformers path on the shipped tiny-qwen2-vl (M-RoPE, float32, CPU).

Pruned Qwen keeps each kept token's original (t, h, w) position, as mmeff.apply's default
positions='original' does; in vLLM the positions are rebuilt after the encoder by the EVS route, which
needs mmeff's worker (the CPU runner never enables that route by itself).
"""
from __future__ import annotations

import pytest

import mmeff
from mmeff.zoo.load import load
from tests_vllm.conftest import run_vllm, vllm_answers
from tests_vllm.zoo_questions import transformers_answers

N_SCENES = 4
MAX_TOKENS = 8
DENSE_TOKENS = 144  # 336x336 image: 24x24 patches merged 2x2
MODEL = ("--model", "tiny-qwen2-vl", "--scenes", str(N_SCENES), "--max-tokens", str(MAX_TOKENS))


@pytest.fixture(scope="module")
def hf():
    return load("tiny-qwen2-vl")


@pytest.fixture(scope="module")
def dense_vllm():
    return vllm_answers(*MODEL)


def test_dense_vllm_equals_dense_transformers(hf, dense_vllm):
    model, processor = hf
    assert dense_vllm["answers"] == transformers_answers(model, processor, N_SCENES, MAX_TOKENS)


def test_pruned_vllm_keeps_original_mrope_positions_like_mmeff_apply(hf, dense_vllm):
    model, processor = hf
    spec = "test_featnorm:budget=48"
    served = vllm_answers(*MODEL, "--spec", spec)
    assert served["prompt_lengths"] == [n - (DENSE_TOKENS - 48) for n in dense_vllm["prompt_lengths"]]
    with mmeff.apply(model, spec):
        expected = transformers_answers(model, processor, N_SCENES, MAX_TOKENS)
    assert served["answers"] == expected
    assert served["answers"] != dense_vllm["answers"]


def test_pruned_qwen_without_mmeffs_worker_is_refused_in_one_line():
    proc = run_vllm(*MODEL[:4], "--spec", "test_featnorm:budget=48", "--worker-cls", "auto")
    assert proc.returncode != 0
    assert "needs its positions rebuilt: start vLLM with --worker-cls mmeff.serving.vllm.worker.MmeffCPUWorker" \
        in proc.stdout + proc.stderr

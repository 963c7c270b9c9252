"""vLLM with the plugin against the transformers path on the shipped tiny-llava (float32, CPU, greedy).

Each vLLM configuration runs in its own process (see conftest.run_vllm); the transformers references
use mmeff.zoo's batched greedy ``answer`` with the same prompts and images.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import mmeff
from mmeff.zoo.eval_dense import answer
from mmeff.zoo.load import load
from tests_vllm.conftest import run_vllm, vllm_answers
from tests_vllm.pruners_for_tests import FixedIndices
from tests_vllm.zoo_questions import scenes, transformers_answers

N_SCENES = 4
MAX_TOKENS = 8
DENSE_TOKENS = 576  # (336 / 14) ** 2 placeholders per image in tiny-llava


@pytest.fixture(scope="module")
def hf():
    model, processor = load("tiny-llava")
    return model, processor


@pytest.fixture(scope="module")
def dense_vllm():
    return vllm_answers("--scenes", str(N_SCENES), "--max-tokens", str(MAX_TOKENS))


def test_dense_vllm_equals_dense_transformers(hf, dense_vllm):
    model, processor = hf
    assert dense_vllm["answers"] == transformers_answers(model, processor, N_SCENES, MAX_TOKENS)
    assert len(dense_vllm["answers"]) >= 40


def test_pruned_vllm_equals_mmeff_apply_with_the_same_spec(hf, dense_vllm):
    """A deterministic feature scorer: vLLM and mmeff.apply(positions='reindex') keep the same tokens."""
    model, processor = hf
    spec = "test_featnorm:budget=64,positions=reindex"
    served = vllm_answers("--scenes", str(N_SCENES), "--max-tokens", str(MAX_TOKENS), "--spec", spec)
    dense_lengths = dense_vllm["prompt_lengths"]
    assert served["prompt_lengths"] == [n - (DENSE_TOKENS - 64) for n in dense_lengths]
    with mmeff.apply(model, spec):
        expected = transformers_answers(model, processor, N_SCENES, MAX_TOKENS)
    assert served["answers"] == expected
    assert served["answers"] != dense_vllm["answers"]  # 64 of 576 tokens do change some answers


def _served_random_indices(seed: int, pixels: torch.Tensor, k: int) -> tuple[int, ...]:
    """The tokens the served random pruner keeps for an image (its rule restated: uniform scores seeded by
    the pruner seed and a CRC-32 of the image's float32 pixels, top k, original order)."""
    digest = zlib.crc32(pixels.float().contiguous().numpy().tobytes())
    g = torch.Generator().manual_seed((seed * 1_000_003 + digest) % (2 ** 63))
    return tuple(sorted(torch.topk(torch.rand(DENSE_TOKENS, generator=g), k).indices.tolist()))


def test_served_random_equals_mmeff_apply_keeping_the_same_tokens(hf):
    """random seeds from the image in vLLM (encoder outputs are cached per image, not per prompt): given the
    tokens it keeps, the answers are exactly those of mmeff.apply keeping them with positions='reindex'."""
    model, processor = hf
    served = vllm_answers("--scenes", str(N_SCENES), "--max-tokens", str(MAX_TOKENS),
                          "--spec", "random:budget=64,positions=reindex,seed=7")
    expected = []
    for image, questions in scenes(N_SCENES):
        pixels = processor(images=[image], text=["<image>"], return_tensors="pt")["pixel_values"][0]
        fixed = FixedIndices(keep=64, positions="reindex", indices=_served_random_indices(7, pixels, 64))
        with mmeff.apply(model, fixed):
            expected += answer(model, processor, [image] * len(questions), questions, max_new_tokens=MAX_TOKENS)
    assert served["answers"] == expected


def test_in_llm_pruner_is_refused_when_the_server_starts():
    proc = run_vllm("--scenes", "1", "--spec", "fastv:budget=64")
    assert proc.returncode != 0
    assert "mmeff_prune='fastv:budget=64': fastv prunes inside the LLM" in proc.stdout + proc.stderr

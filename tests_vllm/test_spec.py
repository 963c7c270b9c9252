"""Which specs the vLLM plugin serves, and how one image's kept tokens are chosen (no engine needed)."""
from __future__ import annotations

import zlib

import pytest
import torch

from mmeff.core.errors import BudgetError, ConfigError
from mmeff.pruners import RandomPrune
from mmeff.serving.vllm import kept_per_image, parse_serving_spec
from mmeff.serving.vllm.selection import image_seed, prune_image
from tests_vllm.pruners_for_tests import FeatureNorm


def test_empty_spec_serves_dense():
    assert parse_serving_spec(None, "llava") is None
    assert parse_serving_spec("  ", "llava") is None
    assert kept_per_image(None, 576, 12) == 576


def test_pre_llm_spec_is_the_same_config_as_mmeff_apply():
    p = parse_serving_spec("random:budget=64,positions=reindex,seed=3", "llava")
    assert p == RandomPrune(budget=64, positions="reindex", seed=3)
    assert kept_per_image(p, 576, 12) == 64
    assert kept_per_image(parse_serving_spec("random:keep=10,positions=reindex", "llava"), 576, 12) == 10


@pytest.mark.parametrize("spec, cause", [
    ("fastv:budget=64", "prunes inside the LLM"),
    ("entropyprune:budget=64", "prunes inside the LLM"),
    ("softpag:layers=1", "not a visual-token pruner"),
    ("nosuch:budget=64", "nosuch"),
    ("random:budget=64", "positions=reindex"),
    ("random:ratio=0.25,positions=reindex", "give budget=N or keep=N"),
    ("random:budget=64,positions=reindex,bogus=1", "unknown option 'bogus'"),
    ("random:positions=reindex", "give a budget"),
    ("random:budget=64,positions=reindex,oops", "key=value"),
])
def test_unservable_specs_are_refused_in_one_line(spec, cause):
    with pytest.raises(ConfigError) as err:
        parse_serving_spec(spec, "llava")
    msg = str(err.value)
    assert cause in msg and "\n" not in msg
    assert msg.startswith(f"mmeff_prune={spec!r}")


def test_qwen_keeps_original_positions_and_refuses_reindex():
    assert parse_serving_spec("random:budget=64", "qwen2_vl") == RandomPrune(budget=64)
    with pytest.raises(ConfigError, match="add positions=original"):
        parse_serving_spec("random:budget=64,positions=reindex", "qwen2_vl")


def test_budget_above_the_image_tokens_is_refused():
    p = parse_serving_spec("random:budget=600,positions=reindex", "llava")
    with pytest.raises(BudgetError, match="use budget <= 576"):
        kept_per_image(p, 576, 12)


def _oracle_random_keep(seed: int, pixels: torch.Tensor, n: int, k: int) -> list[int]:
    """Independent re-statement of the served random rule: a uniform score per token, seeded by
    (seed, CRC-32 of the image's float32 pixels); keep the k highest, in original order."""
    digest = zlib.crc32(pixels.float().numpy().tobytes())
    g = torch.Generator().manual_seed((seed * 1_000_003 + digest) % (2 ** 63))
    scores = torch.rand(n, generator=g)
    return sorted(torch.topk(scores, k).indices.tolist())


def test_served_random_matches_its_oracle_and_depends_on_the_image_only():
    torch.manual_seed(0)
    feats = torch.randn(576, 16)
    pixels_a, pixels_b = torch.rand(3, 8, 8), torch.rand(3, 8, 8)
    p = RandomPrune(budget=64, positions="reindex", seed=5)
    kept = prune_image(p, feats, pixels_a, 64)
    want = _oracle_random_keep(5, pixels_a, 576, 64)
    assert torch.equal(kept, feats[want])
    assert torch.equal(prune_image(p, feats, pixels_a, 64), kept)          # same image, same tokens
    assert not torch.equal(prune_image(p, feats, pixels_b, 64), kept)      # another image, other tokens
    assert image_seed(5, pixels_a) != image_seed(6, pixels_a)


def test_deterministic_scorer_keeps_its_top_tokens_in_order():
    feats = torch.randn(50, 8)
    kept = prune_image(FeatureNorm(keep=7, positions="reindex"), feats, torch.zeros(1), 7)
    top = sorted(torch.topk(feats.norm(dim=-1), 7).indices.tolist())
    assert torch.equal(kept, feats[top])


def test_llm_only_quantities_are_refused():
    from mmeff.serving.vllm.selection import ImageFeatureView
    view = ImageFeatureView(torch.zeros(4, 2), 0, "x")
    with pytest.raises(ConfigError, match="exists only inside the LLM"):
        view.last_query_attention()

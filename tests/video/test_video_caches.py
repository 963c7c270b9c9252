"""Rectified SpaAttn and VMoBA next to diffusers' caches (PAB, FasterCache, First Block Cache), both orders.

The sparse methods only replace the attention op, so they compose with caches that skip whole attention
calls or blocks: with no-op settings the cached run is reproduced exactly, and with sparse settings the
run completes, the method really runs sparse, and the result differs from the cache-only run.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

import mmeff
from mmeff.video import RectifiedSpaAttn, VMoBA
from mmeff.zoo import tiny_pipelines as tp

# 64 x 64 px, 5 frames -> latent grid 2 x 4 x 4 (32 video tokens) on both tiny pipelines
SIZE = {"height": 64, "width": 64, "num_frames": 5}
CASES = [("wan", "pab"), ("wan", "first_block"), ("cogvideox", "pab"), ("cogvideox", "faster"),
         ("cogvideox", "first_block")]

NOOP = {"rectified": lambda: RectifiedSpaAttn(drop=0.0, block=4, preset="none"),
        "vmoba": lambda: VMoBA(temporal_chunk="1", spatial_chunk="2x2", st_chunk="1x2x2", mode="topk",
                               topk=(8, 8, 8), first_full_layer=99)}
SPARSE = {"rectified": lambda: RectifiedSpaAttn(drop=0.75, tau=0.2, block=4, preset="none"),
          "vmoba": lambda: VMoBA(temporal_chunk="1", spatial_chunk="2x2", st_chunk="1x2x2", mode="topk",
                                 topk=(1, 1, 1))}


def run(pipe: Any, family: str) -> torch.Tensor:
    with torch.no_grad():
        return tp.image_of(pipe(**tp.call_kwargs(family, steps=3, **SIZE)))


def with_cache(family: str, cache: str) -> tuple[Any, torch.Tensor]:
    pipe = tp.tiny_pipeline(family)
    plain = run(pipe, family)
    pipe.transformer.enable_cache(tp.diffusers_cache(cache, pipe))
    cached = run(pipe, family)
    assert torch.equal(run(pipe, family), cached)  # the cache resets between generations
    assert not torch.equal(cached, plain)          # and really skips work in this tiny run
    return pipe, cached


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("method", list(NOOP))
@pytest.mark.parametrize("family,cache", CASES)
def test_noop_settings_reproduce_the_cached_run_in_both_orders(family, cache, method):
    pipe, cached = with_cache(family, cache)
    with mmeff.apply(pipe, NOOP[method]()):                       # cache, then apply
        assert torch.equal(run(pipe, family), cached)
    pipe.transformer.disable_cache()
    with mmeff.apply(pipe, NOOP[method]()):                       # apply, then cache
        pipe.transformer.enable_cache(tp.diffusers_cache(cache, pipe))
        assert torch.equal(run(pipe, family), cached)


@pytest.mark.parametrize("method", list(SPARSE))
@pytest.mark.parametrize("family,cache", CASES)
def test_sparse_settings_run_with_the_cache_in_both_orders(family, cache, method):
    pipe, cached = with_cache(family, cache)
    outs = []
    for order in ("cache_first", "apply_first"):
        if order == "apply_first":
            pipe.transformer.disable_cache()
        with mmeff.apply(pipe, SPARSE[method]()) as h:
            if order == "apply_first":
                pipe.transformer.enable_cache(tp.diffusers_cache(cache, pipe))
            outs.append(run(pipe, family))
            rep = h.report()["per_method"][SPARSE[method]().name]
        assert rep["calls"]["sparse"] > 0, rep
        assert torch.isfinite(outs[-1]).all() and not torch.equal(outs[-1], cached)
    assert torch.equal(outs[0], outs[1])  # the order of enabling makes no difference
    assert torch.equal(run(pipe, family), cached)  # remove() left the cache alone

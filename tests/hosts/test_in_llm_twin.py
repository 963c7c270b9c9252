"""In-LLM pruning against its obvious twin: the unmodified model whose layers >= K cannot see the dropped tokens.

Dropping visual tokens at layer K (FastV, EntropyPrune) means: layers < K see everything, and from layer K on no
query attends to a dropped token. The twin runs the stock model in eager attention with exactly that mask
(dropped key columns blocked in every layer >= K, positions untouched) and must give the same logits at every kept
position. This checks the gather of hidden states, RoPE tables, masks and positions with no shared code.
"""
from __future__ import annotations

import pytest
import torch

import mmeff

from .conftest import FixedKeepLLM, inputs_for


def _twin_logits(model, inputs, dropped: torch.Tensor, layer: int) -> torch.Tensor:
    """Stock forward, eager attention, dropped columns blocked for layers >= ``layer`` (dropped: [B, L] bool)."""
    def block(module, args, kwargs):
        mask = kwargs["attention_mask"].clone()
        cols = dropped[:, None, None, :].expand_as(mask)
        kwargs["attention_mask"] = mask.masked_fill(cols, False) if mask.dtype == torch.bool else \
            mask.masked_fill(cols, torch.finfo(mask.dtype).min)
        return args, kwargs

    layers = model.model.language_model.layers
    handles = [layers[i].self_attn.register_forward_pre_hook(block, with_kwargs=True) for i in range(layer, len(layers))]
    try:
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("spec", ["fixed", "fastv:ratio=0.6,layer=2", "entropyprune:ratio=0.5,layer=1"])
def test_in_llm_cut_equals_masking_the_dropped_tokens(vlm, family, spec):
    model = vlm(family, "eager")
    inputs = inputs_for(model, n=2)
    method = FixedKeepLLM(ratio=0.7, layer=2, indices=(0, 3, 5, 9)) if spec == "fixed" else mmeff.parse_method(spec)
    with mmeff.apply(model, method) as h, torch.no_grad():
        pruned = model(**inputs, use_cache=False).logits
        rep = h.report()
    ids = inputs["input_ids"]
    visual = ids == model.config.image_token_id
    dropped = torch.zeros_like(visual)
    for b, kept in enumerate(rep["kept_visual_index"]):
        pos = visual[b].nonzero().squeeze(-1)
        keep = torch.zeros(pos.numel(), dtype=torch.bool)
        keep[kept] = True
        dropped[b, pos[~keep]] = True
    assert int(dropped.sum()) > 0
    twin = _twin_logits(model, inputs, dropped, rep["layer"])
    # the pruned batch is left-filled to its longest sample: compare each sample's kept positions, in order
    for b in range(ids.shape[0]):
        real = inputs["attention_mask"][b].bool() & ~dropped[b]
        got = pruned[b, -int(real.sum()):]
        torch.testing.assert_close(got, twin[b, real], atol=2e-5, rtol=1e-4)

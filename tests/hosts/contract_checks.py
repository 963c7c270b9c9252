"""Checks shared by the VLM host contract tests: batch == each sample alone, cached == the slow twin."""
from __future__ import annotations

import torch

import mmeff

from .conftest import generate, inputs_for


def _methods(method) -> list:
    """One method, or several applied together (a list: a pruner and a mitigator)."""
    return list(method) if isinstance(method, (list, tuple)) else [method]


def uncached_reference(model, inputs, method, n_new: int):
    """Greedy decoding that re-runs the whole prefix every step (no cache) under the same decision."""
    seq, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    tt = inputs.get("mm_token_type_ids")
    logits_all = []
    eos_ids = model.generation_config.eos_token_id
    eos = torch.zeros(model.config.get_text_config().vocab_size, dtype=torch.bool)
    eos[[eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])] = True
    with mmeff.apply(model, *_methods(method)):
        for _ in range(n_new):
            kw = dict(extra)
            if tt is not None:
                kw["mm_token_type_ids"] = torch.cat([tt, tt.new_zeros(tt.shape[0], seq.shape[1] - tt.shape[1])], 1)
            if not type(model).__name__.startswith("Qwen"):
                kw["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
            out = model(input_ids=seq, attention_mask=mask, use_cache=False, **kw)
            step = out.logits[:, -1]
            logits_all.append(step)
            nxt = step.masked_fill(eos, float("-inf")).argmax(-1, keepdim=True)  # as generate(min_new_tokens=n)
            seq = torch.cat([seq, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return seq, torch.stack(logits_all, 1)


def take_sample(batch, i, model):
    """Sample i of a padded batch, padding removed (images included)."""
    keep = batch["attention_mask"][i].bool()
    out = {"input_ids": batch["input_ids"][i:i + 1, keep], "attention_mask": batch["attention_mask"][i:i + 1, keep]}
    if "mm_token_type_ids" in batch:
        out["mm_token_type_ids"] = batch["mm_token_type_ids"][i:i + 1, keep]
    name = type(model).__name__
    if name.startswith("Qwen"):
        grid = batch["image_grid_thw"]
        per = [int(g.prod()) for g in grid]
        start = sum(per[:i])
        out["pixel_values"] = batch["pixel_values"][start:start + per[i]]
        out["image_grid_thw"] = grid[i:i + 1]
    else:
        out["pixel_values"] = batch["pixel_values"][i:i + 1]
        if "image_sizes" in batch:
            out["image_sizes"] = batch["image_sizes"][i:i + 1]
            from mmeff.zoo.tiny_models import _llava_next_patches
            hgt, wid = batch["image_sizes"][i].tolist()
            out["pixel_values"] = out["pixel_values"][:, :_llava_next_patches(model, hgt, wid)]
    return out


def assert_batch_equals_single(model, method, *, n: int = 3, atol: float = 5e-5, rtol: float = 1e-4) -> None:
    """A left-padded batch of ``n`` different images decodes as each sample does alone, under ``method``."""
    batch = inputs_for(model, n=n)
    with mmeff.apply(model, *_methods(method)):
        tokens, logits = generate(model, batch)
        for i in range(n):
            one = take_sample(inputs_for(model, n=n), i, model)  # same images, sample i without padding
            t1, l1 = generate(model, one)
            n_new = t1.shape[1] - one["input_ids"].shape[1]
            assert torch.equal(tokens[i, -n_new:], t1[0, -n_new:]), f"sample {i} differs"
            torch.testing.assert_close(logits[i], l1[0], atol=atol, rtol=rtol)


def assert_cached_equals_slow_twin(model, inputs, method, n_new: int, *, atol: float = 2e-5,
                                   rtol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached greedy generation equals re-running the whole prefix every step under the same decision.

    Returns the cached run's (tokens, per-step logits) for further checks."""
    with mmeff.apply(model, *_methods(method)):
        tokens, logits = generate(model, inputs, n=n_new)
    ref_tokens, ref_logits = uncached_reference(model, inputs, method, n_new)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=rtol)
    return tokens, logits

"""Oracle: a plain re-implementation of AdaptInfer's released scoring rule, on the trained zoo models.

The oracle runs the dense model with eager attention, takes the *full* attention map of the pruning layer
(what the released code materialises), and applies the rule to the block after the image: T2T, S = T2T + T2T^T -
diag, w = column sums of S, score = sum over heads of w^T T2V, top-k. For the second cut it re-runs the model with
the first cut's kept set frozen (the test pruner of tests/hosts) and applies the rule again. mmeff computes only
the text rows from q/k under SDPA; the kept sets must agree up to float ties.
"""
from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.calibrate.cli_calibrate import world_batches
from mmeff.pruners import AdaptInfer
from mmeff.zoo.load import load

from ..hosts.conftest import FixedKeepLLM

CASES = {"tiny-llava": ((1, 5), (0.35, 0.1)), "tiny-qwen2-vl": ((0, 3), (0.4, 0.15))}


def _official_rule(attn: torch.Tensor, v_start: int, v_num: int, k: int) -> tuple[set[int], torch.Tensor]:
    """attn: [H, L, L] of one sample (no padding). Returns the kept visual indices (0..v_num) and the scores."""
    t0 = v_start + v_num
    t2t = attn[:, t0:, t0:].double()
    sym = t2t + t2t.transpose(-1, -2) - torch.diag_embed(torch.diagonal(t2t, dim1=-2, dim2=-1))
    importance = sym.sum(dim=1)                                   # [H, T]: attention text token j gets + gives
    t2v = attn[:, t0:, v_start:t0].double()                       # [H, T, V]
    scores = (importance.unsqueeze(-2) @ t2v).squeeze(-2).sum(0)  # [V]
    return set(torch.topk(scores, k).indices.tolist()), scores


def _agree(got: set[int], want: set[int], scores: torch.Tensor, k: int) -> None:
    if got == want:
        return
    kth = torch.topk(scores, k).values[-1]
    for i in got ^ want:  # any disagreement must sit on the k-th score (a float tie)
        assert abs(float(scores[i] - kth)) <= 1e-5 * float(scores.abs().max()), (sorted(got ^ want), float(kth))


@pytest.mark.parametrize("name", list(CASES))
def test_kept_sets_match_the_official_rule(name):
    model, processor = load(name)                                # SDPA: mmeff computes the text rows itself
    eager, _ = load(name, attn_implementation="eager")
    (l1, l2), (r1, r2) = CASES[name]
    image_id = int(model.config.image_token_id)
    for batch in world_batches(processor, 2, 1):
        vis = torch.nonzero(batch["input_ids"][0] == image_id).flatten()
        v_start, n = int(vis[0]), int(vis.numel())
        k1, k2 = int(r1 * n), int(r2 * n)
        with torch.no_grad():
            dense = eager(**batch, output_attentions=True, use_cache=False)
        want1, s1 = _official_rule(dense.attentions[l1][0], v_start, n, k1)
        with mmeff.apply(model, AdaptInfer(layers=(l1,), keeps=(k1,))) as h, torch.no_grad():
            model(**batch)
            got1 = set(h.report()["kept_visual_index"][0])
        _agree(got1, want1, s1, k1)
        # second cut: the oracle re-runs with the first kept set frozen, on the pruned sequence
        first = sorted(want1)
        with mmeff.apply(eager, FixedKeepLLM(keep=k1, layer=l1 + 1, indices=tuple(first))), torch.no_grad():
            pruned = eager(**batch, output_attentions=True, use_cache=False)
        assert pruned.attentions[l2].shape[-1] == batch["input_ids"].shape[1] - (n - k1)
        local2, s2 = _official_rule(pruned.attentions[l2][0], v_start, k1, k2)
        with mmeff.apply(model, AdaptInfer(layers=(l1, l2), keeps=(k1, k2))) as h, torch.no_grad():
            model(**batch)
            got2 = set(h.report()["kept_visual_index"][0])
        _agree({first.index(i) for i in got2 if i in want1} | {-1 for i in got2 if i not in want1}, local2, s2, k2)

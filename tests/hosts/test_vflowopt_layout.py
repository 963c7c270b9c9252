"""VFlowOpt's importance map lands on the right visual tokens: Qwen2.5-VL's window permutation is undone and
LLaVA-NeXT's anyres packing follows the features (tiny random models)."""
from __future__ import annotations

import torch

import mmeff
from mmeff.pruners import VFlowOpt

from .conftest import inputs_for


def _relevance(probs: torch.Tensor, t: float) -> torch.Tensor:
    """Released rule on a full [H, n, n] map (forced-free: Qwen has no CLS)."""
    a = probs.mean(0)
    received = a.mean(0)
    glob = received > t * received.mean()
    if not bool(glob.any()):
        glob[received.argmax()] = True
    return a[glob].mean(0)


def test_qwen25_window_permutation_is_undone(vlm):
    model = vlm("qwen2_5_vl")
    inputs = inputs_for(model, n=2)
    visual = model.model.visual
    assert list(visual.fullatt_block_indexes) == [len(visual.blocks) - 1]  # the probed layer sees whole images
    seen = {}
    h1 = visual.patch_embed.register_forward_hook(lambda m, a, o: seen.__setitem__("orig", o.detach()))
    h2 = visual.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("perm", a[0].detach()))
    last = visual.blocks[-1]
    h3 = last.register_forward_pre_hook(
        lambda m, a, k: seen.update(x=a[0].detach(), pe=k["position_embeddings"]), with_kwargs=True)
    t = 0.5
    with torch.no_grad(), mmeff.apply(model, VFlowOpt(ratio=0.5, vit_t=t, alpha_v=0.0)):
        maps = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                              return_dict=True).vflowopt_maps
    for h in (h1, h2, h3):
        h.remove()
    # the permutation, found by matching rows (layer order row i is original row perm[i])
    perm = torch.cdist(seen["perm"], seen["orig"]).argmin(1)
    assert sorted(perm.tolist()) == list(range(perm.numel()))
    assert not torch.equal(perm, torch.arange(perm.numel()))  # the tiny config really permutes
    with torch.no_grad():
        x = last.norm1(seen["x"])
        attn = last.attn
        s = x.shape[0]
        q, k, _ = attn.qkv(x).reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = (e.unsqueeze(-2).float() for e in seen["pe"])
        rot = lambda v: torch.cat([-v[..., v.shape[-1] // 2:], v[..., :v.shape[-1] // 2]], -1)
        q, k = (q * cos + rot(q) * sin).transpose(0, 1), (k * cos + rot(k) * sin).transpose(0, 1)
    per_image = [int(g.prod()) for g in inputs["image_grid_thw"]]
    start = 0
    for i, n in enumerate(per_image):
        layer_rows = torch.nonzero((perm >= start) & (perm < start + n)).flatten()  # this image, layer order
        probs = (q[:, layer_rows] @ k[:, layer_rows].transpose(-1, -2) * attn.scaling).softmax(-1)
        rel_layer = _relevance(probs, t)
        rel = torch.zeros(n)
        rel[perm[layer_rows] - start] = rel_layer            # back to the processor's (original) order
        expected = rel.view(-1, 4).sum(-1)
        torch.testing.assert_close(maps[i].importance, expected, atol=1e-6, rtol=1e-5)
        start += n


def test_llava_next_map_follows_the_packed_features(vlm):
    """Newline tokens get importance 1 and the packed map has one entry per placeholder of each image."""
    model = vlm("llava_next")
    inputs = inputs_for(model, n=3)
    with torch.no_grad(), mmeff.apply(model, VFlowOpt(ratio=0.5, alpha_v=0.3, vit_t=1.0)):
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                             return_dict=True)
    newline = model.model.image_newline
    for feats, m in zip(out.pooler_output, out.vflowopt_maps):
        assert m.importance.shape[0] == feats.shape[0]
        is_newline = (feats == newline).all(-1)
        assert bool(is_newline.any())
        assert torch.equal(m.importance[is_newline], torch.ones(int(is_newline.sum())))
        assert bool((m.importance[~is_newline] < 1).all())
        base = (m.region == 0)
        assert int(base.sum()) == 16  # the 4x4 base grid comes first, on its own grid

"""Oracle: a plain re-implementation of the official ZOO-Prune rule agrees with mmeff's on real zoo inputs.

The oracle takes the projector input straight from the vision tower (LLaVA: the last CLIP layer without CLS;
Qwen2-VL: the PatchMerger's input, grouped 2x2), estimates the sensitivity with the official central
differences in float64 (one direction at a time), and runs the greedy SADS with an explicit N x N cosine
matrix. mmeff uses the float32 JVP, chunked. Kept sets must be equal, except after a near-tie in the greedy
gains (a float tie, e.g. identical background tokens), where the oracle may take the method's choice.
"""
from __future__ import annotations

import copy

import pytest
import torch

import mmeff
import mmeff.pruners.zooprune as zp
from mmeff.zoo import load
from mmeff.zoo.processors import chat
from mmeff.zoo.world import generate_scene, render

M, H, BUDGET = 6, 0.01, {"tiny-llava": 64, "tiny-qwen2-vl": 32}


def _inputs(processor, n: int = 2):
    images = [render(generate_scene(5_000_000 + i)) for i in range(n)]
    texts = [processor.apply_chat_template(chat(q), add_generation_prompt=True)
             for q in ("Is there a red circle?", "How many squares are there?")[:n]]
    processor.tokenizer.padding_side = "left"
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def _oracle_rows(model, inputs, name):
    """Per image: projector input rows [N, d] and the projector (float64 copy), taken independently."""
    if name == "tiny-llava":
        tower = model.model.vision_tower
        with torch.no_grad():
            hs = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-1][:, 1:]
        proj = copy.deepcopy(model.model.multi_modal_projector).double()
        return [h.double() for h in hs], proj
    merger = model.model.visual.merger
    seen = []
    handle = merger.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    handle.remove()
    d = seen[0].shape[-1]
    rows = seen[0].reshape(-1, 4 * d).double()
    sizes = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    merger64 = copy.deepcopy(merger).double()
    return list(torch.split(rows, sizes)), (lambda r: merger64(r.reshape(-1, d)))


def _official_rule(x, proj, u, k, prefer=frozenset(), tol=1e-6):
    """Central differences per direction, min-max, then greedy argmax S_hat * min(1 - cos) (plain steps).

    Among gains within ``tol`` of the best (a float tie), a token in ``prefer`` is taken first; returns the
    picks and the number of steps that had such a tie."""
    with torch.no_grad():
        deltas = [(proj(x + H * uj) - proj(x - H * uj)) / (2 * H) for uj in u]
        s = torch.stack([d.norm(dim=-1) for d in deltas]).mean(0)
        s_hat = (s - s.min()) / (s.max() - s.min())
        z = proj(x)
        zn = z / z.norm(dim=-1, keepdim=True)
        dist = 1 - zn @ zn.T
    picks, ties = [], 0
    for step in range(k):
        gains = s_hat.tolist() if step == 0 else (s_hat * dist[:, picks].min(dim=1).values).tolist()
        for p in picks:
            gains[p] = -1.0
        best = max(gains)
        tied = [i for i, g in enumerate(gains) if g >= best - tol]
        ties += len(tied) > 1
        preferred = [i for i in tied if i in prefer]
        picks.append(preferred[0] if preferred else gains.index(best))
    return picks, ties


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_zooprune_matches_the_official_rule_on_zoo_inputs(name, monkeypatch):
    torch.set_num_threads(1)
    model, processor = load(name)
    inputs = _inputs(processor)
    drawn = []

    def spy(*args, **kwargs):
        drawn.append(zp_draw(*args, **kwargs))
        return drawn[-1]

    zp_draw = zp.draw_directions
    monkeypatch.setattr(zp, "draw_directions", spy)
    k = BUDGET[name]
    with mmeff.apply(model, f"zooprune:budget={k},directions={M}") as h, torch.no_grad():
        model(**inputs)
        kept = [sorted(int(i) for i in s) for s in h.report()["kept_visual_index"]]
    rows, proj = _oracle_rows(model, inputs, name)
    assert len(drawn) == len(rows) == 2
    for b, (x, u) in enumerate(zip(rows, drawn)):
        picks, ties = _official_rule(x, proj, u.double(), k, prefer=frozenset(kept[b]))
        assert len(kept[b]) == k and ties < k // 2
        assert kept[b] == sorted(picks), f"sample {b}: kept sets differ beyond float ties ({ties} tied steps)"
    assert kept[0] != kept[1]

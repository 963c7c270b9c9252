"""Units of the mitigators: GIFT's additive bias = multiply-and-renormalise, the POS fallback, VHR layers, the bench."""
from __future__ import annotations

import torch

from mmeff.eval.halluc_bench import pope_pairs, sign_test, summarise
from mmeff.mitigators import gift_math as gm
from mmeff.mitigators.base import scaled_layers
from mmeff.mitigators.query_words import informative_tokens, tagger_name
from mmeff.mitigators.vhd import select_heads
from mmeff.zoo.world import COOCCUR
from mmeff.zoo.world.weak import WeakKnobs, absent_partners, render_weak, weak_scene, weak_seeds


def _eager_gift(p: torch.Tensor, w: torch.Tensor, vis: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Reference §7 pass 2 on one row ``p [H, K]``: multiply, then renormalise (plain loops)."""
    p = p.clone()
    k = p.shape[0] // 2
    hv = sorted(range(p.shape[0]), key=lambda h: -float(p[h, vis].sum()))[:k]
    before = sum(float(p[h, vis].sum()) for h in hv)
    for h in hv:
        p[h, vis] = p[h, vis] * w
    r = sum(float(p[h, vis].sum()) for h in hv) / before
    ht = sorted(range(p.shape[0]), key=lambda h: -float(p[h, query].sum()))[:k]
    for h in ht:
        p[h, query] = p[h, query] * r
    return p / p.sum(-1, keepdim=True)


def test_additive_sdpa_bias_equals_eager_multiply_and_renormalise():
    gen = torch.Generator().manual_seed(0)
    B, H, R, K, d = 2, 6, 3, 40, 8
    q, k, v = (torch.randn(B, H, n, d, generator=gen, dtype=torch.float64) for n in (R, K, K))
    vis_cols = torch.arange(5, 25)
    query_cols = torch.arange(27, 35)
    w = torch.exp(3.0 * torch.rand(len(vis_cols), generator=gen, dtype=torch.float64))
    log_w = torch.zeros(B, K, dtype=torch.float64)
    log_w[:, vis_cols] = w.log()
    vis = torch.zeros(B, K, dtype=torch.bool)
    vis[:, vis_cols] = True
    qm = torch.zeros(B, K, dtype=torch.bool)
    qm[:, query_cols] = True
    probs = (q @ k.transpose(-1, -2) / d ** 0.5).softmax(-1)
    bias = gm.enhancement_bias(probs, log_w, vis, qm)
    fast = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1 / d ** 0.5)
    for b in range(B):
        for r in range(R):
            ref = torch.einsum("hk,hkd->hd", _eager_gift(probs[b, :, r], w, vis_cols, query_cols), v[b])
            torch.testing.assert_close(fast[b, :, r], ref, atol=1e-10, rtol=1e-9)
    assert (bias != 0).any()


def test_saliency_falls_back_to_all_question_tokens():
    attn = torch.rand(4, 5, 7)
    none = torch.zeros(4, dtype=torch.bool)
    torch.testing.assert_close(gm.gaze_shift(attn, none), (attn[:, 1:] - attn[:, :-1]).clamp_min(0))
    some = torch.tensor([False, True, False, True])
    assert gm.gaze_shift(attn, some).shape == (4, 2, 7)
    w = gm.visual_weights(torch.tensor([0.0, 1.0, 3.0]), 5.0)
    assert float(w.min()) == 1.0 and abs(float(w.max()) - torch.e ** 5) < 1e-3
    assert torch.equal(gm.visual_weights(torch.zeros(3), 5.0), torch.ones(3))  # flat saliency: no weights


def test_pos_fallback_keeps_content_words():
    pieces = {1: "▁Is", 2: "▁there", 3: "▁a", 4: "▁red", 5: "▁circle", 6: "▁in", 7: "▁the", 8: "▁image", 9: "?"}
    flags = informative_tokens(list(pieces), lambda ids: [pieces[i] for i in ids])
    assert flags == [False, False, False, True, True, False, False, True, False]
    assert tagger_name() == "fallback:closed-class-stoplist"  # spaCy's English model is not installable offline


def test_vhr_default_layers_scale_the_paper_set():
    assert scaled_layers(32, (1,), 14, 32) == (1, *range(18, 32))  # the paper's LLaVA-1.5-7B set
    assert scaled_layers(28, (1,), 14, 32) == (1, *range(16, 28))
    assert scaled_layers(12, (1,), 14, 32) == (1, 7, 8, 9, 10, 11)


def test_vhd_outlier_zeroing_and_median_selection():
    no_img = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [9.0, 0.0]]])
    with_img = no_img + torch.tensor([[[0.1, 0.0], [0.5, 0.0], [0.3, 0.0], [5.0, 0.0]]])
    chosen, vhd = select_heads(with_img, no_img)
    assert vhd[0, 3] == 0  # high divergence *and* a surging text-only norm: an outlier
    assert chosen.tolist() == [[False, True, True, False]]
    chosen, _ = select_heads(with_img, no_img, outliers=False)
    assert chosen.tolist() == [[False, True, False, True]]


def test_weak_scenes_break_the_cooccurrence_and_are_deterministic():
    knobs = WeakKnobs()
    seeds = list(weak_seeds(20))
    assert min(seeds) >= 1_100_000  # held-out test split
    for s in seeds:
        scene = weak_scene(s, knobs)
        assert absent_partners(scene) and any(t in scene.shapes() for t in COOCCUR)
        assert knobs.n_objects[0] - 2 <= len(scene.objects) <= knobs.n_objects[1]
    a, b = render_weak(weak_scene(seeds[0])), render_weak(weak_scene(seeds[0]))
    assert a.tobytes() == b.tobytes()
    (q_no, a_no), (q_yes, a_yes) = pope_pairs(weak_scene(seeds[0]))
    assert (a_no, a_yes) == ("no", "yes")


def test_bench_metrics_and_sign_test():
    scene_seed = list(weak_seeds(1))[0]
    scene = weak_scene(scene_seed)
    present = sorted(scene.shapes())[0]
    absent = absent_partners(scene)[0]
    rows = [{"seed": scene_seed, "caption": f"a {present} and a {absent}", "hallucinated": [absent],
             "pope": [{"answer": "no", "pred": "yes"}, {"answer": "yes", "pred": "yes"}],
             "caption_seconds": 1.0, "pope_seconds": 1.0}]
    m = summarise(rows, WeakKnobs())
    assert m["chair_s"] == 1.0 and m["pope_accuracy"] == 0.5 and m["pope_yes_rate"] == 1.0
    assert abs(m["pope_f1"] - 2 / 3) < 1e-9
    t = sign_test([True] * 10, [False] * 10)
    assert t["only_dense"] == 10 and abs(t["p_value"] - 2 / 2 ** 10) < 1e-12
    assert sign_test([True, False], [True, False])["p_value"] == 1.0


def test_halluc_tasks_render_weak_scenes_and_score_like_the_world_tasks():
    import json

    from mmeff.eval import data as data_mod
    from mmeff.eval.tasks import GROUPS, TASKS
    from mmeff.eval.tasks import utils as tu
    from mmeff.zoo.world import make_caption

    rows = data_mod.task_rows(3, tasks=["mmeff_halluc_caption", "mmeff_halluc_pope"])
    assert set(GROUPS["mmeff_halluc"]) == {"mmeff_halluc_caption", "mmeff_halluc_pope"}
    assert not set(GROUPS["mmeff_halluc"]) & set(GROUPS["mmeff_world"])
    cap = rows["mmeff_halluc_caption"][0]
    scene = tu.scene(cap)
    assert scene == weak_scene(cap["seed"]) and cap["answer"] == make_caption(scene)
    (img,) = tu.doc_to_visual(cap)
    assert img.tobytes() == render_weak(scene).convert("RGB").tobytes()
    pope = rows["mmeff_halluc_pope"]
    assert [r["answer"] for r in pope[:2]] == ["no", "yes"] and TASKS["mmeff_halluc_pope"].weak
    assert json.loads(pope[0]["meta"])["shape"] not in tu.scene(pope[0]).shapes()
    assert tu.process_results(pope[0], ["Yes"])["exact_match"] == 0.0

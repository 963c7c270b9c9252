"""Tests for VMoBA: partitions and layer schedule, selection, attention vs the reference twin, presets.

The Triton path of the attention primitive is covered in tests/kernels/test_chunk_routed_attn.py
(including one VMoBA end-to-end case run through the interpreter).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmeff.video.vmoba_core import (
    apply_dense_fallback,
    chunk_gates,
    select_chunks,
    vmoba_attention,
    vmoba_reference,
)
from mmeff.video.vmoba_partition import (
    chunk_kind,
    chunk_starts,
    inverse_permutation,
    layer_chunk,
    layer_kind,
    partition_order,
)
from mmeff.video.vmoba_presets import (
    PRESETS,
    TINY_WAN,
    WAN21_1_3B_448P_TOPK,
    WAN21_1_3B_480P,
    WAN21_14B_720P,
    VMoBAPreset,
    get_preset,
    wan_latent_grid,
)

GRID = (4, 6, 8)  # T, H, W


def _coords(t: int, h: int, w: int) -> torch.Tensor:
    """(t, h, w) of every native token, [N, 3]."""
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt.flatten(), hh.flatten(), ww.flatten()], dim=1)


# ----------------------------------------------------------------------------- partitions


@pytest.mark.parametrize("chunk", [2, 3, (3, 4), (2, 8), (2, 3, 4), (1, 6, 2), (4, 6, 8)])
def test_partition_is_permutation_with_sorted_chunk_ids(chunk) -> None:
    t, h, w = GRID
    perm, ids, n = partition_order(t, h, w, chunk)
    assert perm.dtype == ids.dtype == torch.int64 and perm.numel() == ids.numel() == t * h * w
    assert torch.equal(perm.sort().values, torch.arange(t * h * w))
    assert int(ids[0]) == 0 and int(ids[-1]) == n - 1 and bool((ids.diff() >= 0).all())
    assert torch.equal(inverse_permutation(perm)[perm], torch.arange(t * h * w))
    x = torch.randn(2, t * h * w, 3)
    assert torch.equal(x[:, perm][:, inverse_permutation(perm)], x)
    starts = chunk_starts(ids)
    assert starts.numel() == n + 1 and int(starts[-1]) == t * h * w


def test_1d_is_whole_frames_without_permutation() -> None:
    t, h, w = GRID
    perm, ids, n = partition_order(t, h, w, 2)
    assert torch.equal(perm, torch.arange(t * h * w)) and n == 2
    assert torch.equal(ids, _coords(t, h, w)[:, 0] // 2)
    _, ids, n = partition_order(t, h, w, 3)  # 4 frames in chunks of 3: ragged last chunk
    assert n == 2 and int((ids == 0).sum()) == 3 * h * w and int((ids == 1).sum()) == h * w


def test_2d_chunks_are_spatial_tiles_across_all_frames() -> None:
    t, h, w = GRID
    c_h, c_w = 3, 4
    perm, ids, n = partition_order(t, h, w, (c_h, c_w))
    assert n == (h // c_h) * (w // c_w)
    xyz = _coords(t, h, w)[perm]
    for c in range(n):
        pts = xyz[ids == c]
        assert pts.shape[0] == t * c_h * c_w
        assert sorted(set(pts[:, 0].tolist())) == list(range(t))  # every frame
        assert len(set(pts[:, 1].tolist())) == c_h and int(pts[:, 1].max() - pts[:, 1].min()) == c_h - 1
        assert len(set(pts[:, 2].tolist())) == c_w and int(pts[:, 2].max() - pts[:, 2].min()) == c_w - 1
        assert int(pts[:, 1].min()) % c_h == 0 and int(pts[:, 2].min()) % c_w == 0
    # an explicit small case: T=2, H=2, W=4 with 2x2 tiles
    perm, ids, _ = partition_order(2, 2, 4, (2, 2))
    assert perm.tolist() == [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15]
    assert ids.tolist() == [0] * 8 + [1] * 8


def test_3d_chunks_are_contiguous_cubes() -> None:
    t, h, w = GRID
    cube = (2, 3, 4)
    perm, ids, n = partition_order(t, h, w, cube)
    assert n == (t // 2) * (h // 3) * (w // 4)
    xyz = _coords(t, h, w)[perm]
    seen = set()
    for c in range(n):
        pts = xyz[ids == c]
        lo, hi = pts.min(0).values, pts.max(0).values
        assert (hi - lo + 1).tolist() == list(cube) and pts.shape[0] == 2 * 3 * 4  # a full box
        assert [int(a) % s for a, s in zip(lo, cube)] == [0, 0, 0]  # aligned to the cube grid
        seen.add(tuple(lo.tolist()))
    assert len(seen) == n
    # chunk order is t-major over the chunk grid
    assert xyz[ids == 1].min(0).values.tolist() == [0, 0, 4]


def test_partition_cache_returns_fresh_tensors() -> None:
    perm, ids, _ = partition_order(2, 2, 4, (2, 2))
    perm.zero_()
    ids.fill_(7)
    perm2, ids2, _ = partition_order(2, 2, 4, (2, 2))
    assert perm2.tolist() == [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15] and int(ids2[0]) == 0


def test_partition_errors() -> None:
    with pytest.raises(ValueError, match=r"latent height 6 is not divisible by the chunk height c_h=4.*\[1, 2, 3, 6\]"):
        partition_order(4, 6, 8, (4, 4))
    with pytest.raises(ValueError, match="latent width 8 is not divisible by the chunk width c_w=3"):
        partition_order(4, 6, 8, (2, 3))
    with pytest.raises(ValueError, match="latent frames 4 is not divisible by the chunk frames c_t=3"):
        partition_order(4, 6, 8, (3, 3, 4))
    with pytest.raises(ValueError, match="pair \\(c_h, c_w\\)"):
        partition_order(4, 6, 8, (1, 2, 3, 4))
    with pytest.raises(ValueError, match="positive ints"):
        partition_order(4, 6, 8, (0, 2))
    with pytest.raises(ValueError, match="T \\(latent frames\\)"):
        partition_order(0, 6, 8, 1)
    with pytest.raises(ValueError, match="chunk order"):
        chunk_starts(torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="chunk order"):
        chunk_starts(torch.tensor([0, 0, 2, 2]))  # a gap


# ----------------------------------------------------------------------------- layer schedule


def test_layer_schedule() -> None:
    chunks = (2, (3, 4), (4, 6, 4))
    kinds = [layer_kind(i) for i in range(7)]
    assert kinds == ["temporal", "spatial", "spatiotemporal"] * 2 + ["temporal"]
    assert [layer_chunk(i, 0, 1, 1, 1, chunks) for i in range(4)] == [2, (3, 4), (4, 6, 4), 2]
    assert [layer_chunk(i, 2, 1, 1, 1, chunks) for i in range(4)] == [None, None, 2, (3, 4)]
    assert [layer_kind(i, 1, 2, 1, 1)[0] for i in range(7)] == ["f", "t", "t", "s", "s", "t", "t"]
    assert [layer_kind(i, 0, 0, 1, 2) for i in range(3)] == ["spatial", "spatiotemporal", "spatiotemporal"]
    assert chunk_kind(2) == "temporal" and chunk_kind((3, 4)) == "spatial" and chunk_kind([1, 2, 3]) == "spatiotemporal"
    with pytest.raises(ValueError, match="at least one sparse kind"):
        layer_kind(0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="layer_idx"):
        layer_kind(-1)
    with pytest.raises(ValueError, match="temporal_chunk, spatial_chunk, st_chunk"):
        layer_chunk(0, 0, 1, 1, 1, (2, (3, 4)))
    with pytest.raises(ValueError, match="the spatial entry"):
        layer_chunk(0, 0, 1, 1, 1, (2, 3, (4, 6, 4)))


# ----------------------------------------------------------------------------- attention


def _qkv(seq: int, *, b: int = 2, h: int = 2, d: int = 16, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, seq, d, generator=gen).to(dtype) for _ in range(3))


def _ids_3d() -> torch.Tensor:
    return partition_order(3, 4, 4, (1, 2, 2))[1]  # 12 chunks of 4 tokens, S = 48


LAYOUTS = {"cube_ids": lambda: {"chunk_ids": _ids_3d()}, "ragged_size": lambda: {"chunk_size": 10}}


@pytest.mark.parametrize("threshold_type", ["query_head", "head_global"])
@pytest.mark.parametrize(
    "mode_kw",
    [{"mode": "threshold", "threshold": 1.5}, {"mode": "topk", "topk": 12}],
    ids=["threshold_gt1", "topk_all"],
)
def test_everything_selected_equals_dense(threshold_type: str, mode_kw: dict) -> None:
    q, k, v = _qkv(48, seed=1)
    dense = F.scaled_dot_product_attention(q, k, v)
    for layout in ({"chunk_ids": _ids_3d()}, {"chunk_size": 4}):  # both give 12 chunks
        out, stats = vmoba_attention(q, k, v, threshold_type=threshold_type, return_stats=True, **layout, **mode_kw)
        assert stats["mean_selected_chunks"] == 12 and stats["sparsity"] == pytest.approx(0.0, abs=1e-6)
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
        fused = vmoba_attention(q, k, v, threshold_type=threshold_type, split_self=False, **layout, **mode_kw)
        torch.testing.assert_close(fused, dense, atol=1e-5, rtol=1e-5)


def test_threshold_one_selects_every_chunk_up_to_float32_rounding() -> None:
    # Official: T = sum + 1e-6, so tau = 1 is not reached before the last chunk in exact arithmetic; the
    # margin is ~1e-7 relative, so float32 (official and ours) can stop one chunk short in a few rows.
    q, k, _ = _qkv(48, seed=2)
    cs = chunk_starts(_ids_3d())
    gates = chunk_gates(q, k, cs)
    sel = select_chunks(gates, _ids_3d(), mode="threshold", threshold=1.0)
    assert bool((sel.sum(-1) >= 11).all()) and sel.all(-1).float().mean() > 0.95
    _, ref = vmoba_reference(q, k, k, chunk_ids=_ids_3d(), threshold=1.0, return_stats=True)  # float64 loops
    assert bool(ref["selected"].all())


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("threshold_type", ["query_head", "head_global"])
@pytest.mark.parametrize(
    "mode_kw",
    [{"mode": "threshold", "threshold": 0.25}, {"mode": "threshold", "threshold": 0.6}, {"mode": "topk", "topk": 3}],
    ids=["tau0.25", "tau0.6", "top3"],
)
def test_vmoba_matches_reference(layout: str, threshold_type: str, mode_kw: dict) -> None:
    q, k, v = _qkv(48, seed=3)
    kw = {**LAYOUTS[layout](), **mode_kw, "threshold_type": threshold_type}
    out, stats = vmoba_attention(q, k, v, return_stats=True, **kw)
    ref, ref_stats = vmoba_reference(q, k, v, return_stats=True, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    selected = ref_stats.pop("selected")
    assert stats == pytest.approx(ref_stats)
    # the same selection, own chunk always in it
    cs = chunk_starts(kw["chunk_ids"]) if "chunk_ids" in kw else torch.tensor([0, 10, 20, 30, 40, 48])
    own = torch.repeat_interleave(torch.arange(cs.numel() - 1), cs.diff().long())
    mk = {key: kw[key] for key in ("mode", "threshold_type")} | {key: kw[key] for key in ("threshold", "topk") if key in kw}
    sel = select_chunks(chunk_gates(q, k, cs), own, **mk)
    assert torch.equal(sel, selected)
    assert bool(sel.gather(-1, own.view(1, 1, -1, 1).expand(2, 2, -1, 1)).all())
    assert 1.0 < stats["mean_selected_chunks"] < cs.numel() - 1 and 0.0 < stats["sparsity"] < 1.0
    if mode_kw["mode"] == "threshold" and threshold_type == "head_global":
        assert sel.sum(-1).min() < sel.sum(-1).max()  # queries compete: counts vary across a head


def test_vmoba_scale_bf16_and_fused() -> None:
    q, k, v = _qkv(48, seed=4, dtype=torch.bfloat16)
    kw = {"chunk_ids": _ids_3d(), "threshold": 0.4, "scale": 0.5}
    out = vmoba_attention(q, k, v, **kw)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), vmoba_reference(q, k, v, **kw).float(), atol=2e-2, rtol=2e-2)
    q, k, v = _qkv(48, seed=4)
    torch.testing.assert_close(
        vmoba_attention(q, k, v, split_self=False, **kw), vmoba_attention(q, k, v, **kw), atol=1e-5, rtol=1e-5
    )


def test_threshold_zero_keeps_own_and_best_other_chunk() -> None:
    # Official VMoBA always routes at least the best other chunk, even when the own chunk reaches tau.
    q, k, v = _qkv(48, seed=5)
    ids = _ids_3d()
    out, stats = vmoba_attention(q, k, v, chunk_ids=ids, threshold=0.0, return_stats=True)
    assert stats["mean_selected_chunks"] == 2.0
    gates = chunk_gates(q, k, chunk_starts(ids))
    best_other = gates.masked_fill(torch.nn.functional.one_hot(ids, 12).bool(), float("-inf")).argmax(-1)
    keys = (ids.view(1, 1, 1, -1) == ids.view(1, 1, -1, 1)) | (ids.view(1, 1, 1, -1) == best_other.unsqueeze(-1))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=keys), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("split_self", [True, False])
@pytest.mark.parametrize("budget_scope", ["sample", "batch"])
def test_topk_one_falls_back_to_dense(split_self: bool, budget_scope: str) -> None:
    # Official VMoBA: nothing routed beyond the own chunks anywhere -> plain dense attention.
    q, k, v = _qkv(48, seed=7)
    dense = F.scaled_dot_product_attention(q, k, v)
    for tt in ("query_head", "head_global"):
        kw = {"chunk_ids": _ids_3d(), "mode": "topk", "topk": 1, "threshold_type": tt, "budget_scope": budget_scope}
        out, stats = vmoba_attention(q, k, v, return_stats=True, split_self=split_self, **kw)
        assert stats["sparsity"] == pytest.approx(0.0, abs=1e-6)
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vmoba_reference(q, k, v, **kw), dense, atol=1e-5, rtol=1e-5)


def test_dense_fallback_scope() -> None:
    # Under the official rule a threshold row only routes nothing when its own chunk wins a tie at 0 by
    # index, so hand-made selections show the scope: sample 0 routes nothing, sample 1 routes one chunk.
    own = torch.tensor([0, 0, 1, 1])
    sel = torch.nn.functional.one_hot(own, 2).bool().expand(2, 1, 4, 2).clone()
    sel[1, 0, 3, 0] = True
    per_sample = apply_dense_fallback(sel, own, "sample")
    assert bool(per_sample[0].all()) and torch.equal(per_sample[1], sel[1])  # batch == single
    assert torch.equal(apply_dense_fallback(sel, own, "batch"), sel)  # official: the packed batch routed
    assert bool(apply_dense_fallback(sel[:1], own, "batch").all())


def test_more_threshold_means_more_chunks() -> None:
    q, k, _ = _qkv(48, seed=6)
    ids = _ids_3d()
    gates = chunk_gates(q, k, chunk_starts(ids))
    for tt in ("query_head", "head_global"):
        counts = [float(select_chunks(gates, ids, threshold=t, threshold_type=tt).sum()) for t in (0.1, 0.3, 0.6, 0.9)]
        assert counts == sorted(counts) and counts[0] < counts[-1]


def test_selection_hand_examples() -> None:
    # query_head, one query in chunk 0 with gates [0.5, 1, 0, 0.75] (already min-max normal):
    # sum 2.25, own share 0.5/2.25 = 0.222; others by gate: c1 (1.0), c3 (0.75), c2 (0);
    # tau 0.1 is reached by the own chunk alone, and the best other chunk still comes along (official).
    g = torch.tensor([0.5, 1.0, 0.0, 0.75]).view(1, 1, 1, 4) * 4 - 1  # min-max is affine-invariant
    own = torch.tensor([0])
    rows = {tau: select_chunks(g, own, threshold=tau)[0, 0, 0].nonzero().flatten().tolist() for tau in (0.1, 0.25, 0.8)}
    assert rows == {0.1: [0, 1], 0.25: [0, 1], 0.8: [0, 1, 3]}
    assert select_chunks(g, own, mode="topk", topk=2)[0, 0, 0].nonzero().flatten().tolist() == [0, 1]
    # head_global: queries 0, 1 in chunks 0, 1; gates [[1, 0], [0.5, 0.25]]; sum 1.75, own
    # share 1.25/1.75; tau 0.8 -> remain 0.0857: only the best non-own pair (query 1, chunk 0).
    g = torch.tensor([[1.0, 0.0], [0.5, 0.25]]).view(1, 1, 2, 2)
    sel = select_chunks(g, torch.tensor([0, 1]), threshold=0.8, threshold_type="head_global")
    assert sel[0, 0].tolist() == [[True, False], [True, True]]
    sel = select_chunks(g, torch.tensor([0, 1]), mode="topk", topk=1, threshold_type="head_global")
    assert sel[0, 0].tolist() == [[True, False], [False, True]]
    # degenerate: all gates equal -> range <= 1e-6 divides by 1, all shares 0, tau never reached: all, no nan
    sel = select_chunks(torch.zeros(1, 1, 3, 3), torch.tensor([0, 1, 2]), threshold=0.5)
    assert sel.sum(-1).tolist() == [[[3, 3, 3]]]


def test_vmoba_errors() -> None:
    q, k, v = _qkv(48)
    ids = _ids_3d()
    with pytest.raises(ValueError, match="exactly one of chunk_ids"):
        vmoba_attention(q, k, v)
    with pytest.raises(ValueError, match="exactly one of chunk_ids"):
        vmoba_attention(q, k, v, chunk_ids=ids, chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        vmoba_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match=r"one chunk id per token \(S=48\)"):
        vmoba_attention(q, k, v, chunk_ids=ids[:10])
    with pytest.raises(ValueError, match="permute the tokens into chunk order"):
        vmoba_attention(q, k, v, chunk_ids=ids.flip(0))
    with pytest.raises(ValueError, match="mode must be one of"):
        vmoba_attention(q, k, v, chunk_size=4, mode="dense")
    with pytest.raises(ValueError, match="'overall' and 'block' variants are not implemented"):
        vmoba_attention(q, k, v, chunk_size=4, threshold_type="overall")
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        vmoba_attention(q, k, v, chunk_size=4, threshold=-0.1)
    with pytest.raises(ValueError, match="topk must be an int >= 1"):
        vmoba_attention(q, k, v, chunk_size=4, mode="topk", topk=0)
    with pytest.raises(ValueError, match="self-attention"):
        vmoba_attention(q, k[:, :, :40], v[:, :, :40], chunk_size=4)
    with pytest.raises(ValueError, match="4-D tensor"):
        vmoba_attention(q[0], k[0], v[0], chunk_size=4)
    with pytest.raises(ValueError, match="one dtype"):
        vmoba_reference(q, k.double(), v, chunk_size=4)


# ----------------------------------------------------------------------------- presets


def test_presets_match_reference_table() -> None:
    assert WAN21_1_3B_480P.latent_grid == (20, 30, 52) and wan_latent_grid(77, 448, 832) == (20, 28, 52)
    assert WAN21_1_3B_480P.chunk_counts() == {"temporal": (10, 3120), "spatial": (130, 240), "spatiotemporal": (325, 96)}
    assert (WAN21_1_3B_480P.mode, WAN21_1_3B_480P.threshold, WAN21_1_3B_480P.threshold_type) == ("threshold", 0.25, "query_head")
    assert (WAN21_1_3B_480P.temporal_topk, WAN21_1_3B_480P.spatial_topk, WAN21_1_3B_480P.st_topk) == (3, 20, 15)
    assert {k: n for k, (n, _) in WAN21_1_3B_448P_TOPK.chunk_counts().items()} == {
        "temporal": 10, "spatial": 28, "spatiotemporal": 140}
    assert WAN21_1_3B_448P_TOPK.mode == "topk"
    assert WAN21_14B_720P.latent_grid == (21, 45, 80) and WAN21_14B_720P.seq_len == 75600
    assert WAN21_14B_720P.chunk_counts() == {"temporal": (7, 10800), "spatial": (90, 840), "spatiotemporal": (350, 216)}
    assert "[recon]" in WAN21_14B_720P.source
    assert set(PRESETS) == {p.name for p in (WAN21_1_3B_480P, WAN21_1_3B_448P_TOPK, WAN21_14B_720P, TINY_WAN)}
    assert TINY_WAN.latent_grid == (4, 8, 8) and TINY_WAN.mode == "topk"


def test_preset_layers_and_errors() -> None:
    p = WAN21_1_3B_480P
    assert [(x.kind, x.chunk, x.topk) for x in map(p.for_layer, range(3))] == [
        ("temporal", 2, 3), ("spatial", (3, 4), 20), ("spatiotemporal", (4, 6, 4), 15)]
    assert p.attention_kwargs(4) == {"mode": "threshold", "threshold": 0.25, "topk": 20, "threshold_type": "query_head"}
    warm = p.replace(first_full_layer=1)
    assert warm.for_layer(0) is None and warm.attention_kwargs(0) is None and warm.for_layer(1).kind == "temporal"
    assert get_preset("wan2.1-14b-720p") is WAN21_14B_720P
    with pytest.raises(ValueError, match="known presets"):
        get_preset("wan-9b")
    with pytest.raises(ValueError, match="not divisible by the chunk height c_h=4"):
        p.replace(spatial_chunk=(4, 4))
    with pytest.raises(ValueError, match="topk must be in \\[1, 10\\]"):
        p.replace(temporal_topk=11)
    with pytest.raises(ValueError, match="frames = 4n \\+ 1"):
        wan_latent_grid(80, 480, 832)
    with pytest.raises(ValueError, match="mode"):
        VMoBAPreset("x", (4, 4, 4), 1, 1, (2, 2), 1, (2, 2, 2), 1, mode="fast")


@pytest.mark.parametrize("mode_kw", [dict(mode="topk", topk=2), dict(mode="threshold", threshold=0.4)])
@pytest.mark.parametrize("threshold_type", ["query_head", "head_global"])
def test_selection_same_in_any_head_grouping(monkeypatch: pytest.MonkeyPatch, threshold_type: str,
                                             mode_kw: dict) -> None:
    """Heads are selected in memory-bounded groups; the grouping must not change the result."""
    import mmeff.video.vmoba_core as core

    g = torch.Generator().manual_seed(3)
    seq, n_chunks, heads = 24, 6, 5
    gates = torch.randn(2, heads, seq, n_chunks, generator=g)
    query_chunk = torch.arange(seq) // 4
    whole = core.select_chunks(gates, query_chunk, threshold_type=threshold_type, **mode_kw)
    for per_group in (1, 2):  # one head at a time, then pairs (5 heads: an uneven last group)
        monkeypatch.setattr(core, "_GROUP_ELEMENTS", per_group * seq * n_chunks)
        grouped = core.select_chunks(gates, query_chunk, threshold_type=threshold_type, **mode_kw)
        assert torch.equal(grouped, whole)
    assert whole.sum(-1).min() >= 1  # own chunk always in

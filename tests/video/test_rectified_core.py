"""Rectified SpaAttn core: gilbert layout, selection/rectification against a loop-based twin."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmeff.core.errors import ConfigError
from mmeff.video import layout as L
from mmeff.video import rectified_presets as P
from mmeff.video.rectified_core import (
    dense_reference,
    rectified_sparse_attention,
    top_k_blocks,
)

# ----------------------------------------------------------------------------- layout


def _check_curve(T: int, H: int, W: int) -> None:
    order = L.gilbert_order(T, H, W).numpy()
    n = T * H * W
    assert order.dtype == np.int64
    assert np.array_equal(np.sort(order), np.arange(n)), (T, H, W)
    coords = np.stack([order // (H * W), (order // W) % H, order % W], axis=1)
    assert tuple(coords[0]) == (0, 0, 0)
    if n > 1:
        step = np.abs(np.diff(coords, axis=0)).max(axis=1)
        assert (step == 1).all(), f"non-neighbour step in {(T, H, W)} at {np.nonzero(step != 1)[0][:5]}"


def test_gilbert_is_a_curve_for_all_small_sizes() -> None:
    for T, H, W in itertools.product(range(1, 7), repeat=3):
        _check_curve(T, H, W)
    for size in [(1, 1, 1), (1, 1, 9), (9, 1, 1), (1, 7, 1), (3, 5, 7), (2, 33, 3), (13, 17, 19)]:
        _check_curve(*size)


def test_gilbert_video_grid_fast_and_face_steps_only() -> None:
    L._gilbert_np.cache_clear()
    L._curve.cache_clear()
    t0 = time.perf_counter()
    order = L.gilbert_order(21, 30, 52)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, elapsed
    _check_curve(21, 30, 52)
    o = order.numpy()
    coords = np.stack([o // (30 * 52), (o // 52) % 30, o % 52], axis=1)
    assert (np.abs(np.diff(coords, axis=0)).sum(axis=1) == 1).all()  # even major side: face steps only
    # cached copies are independent
    again = L.gilbert_order(21, 30, 52)
    again[0] = -1
    assert L.gilbert_order(21, 30, 52)[0] == 0


def test_gilbert_blocks_are_compact() -> None:
    T, H, W, blk = 8, 16, 16, 64
    o = L.gilbert_order(T, H, W).numpy()
    coords = np.stack([o // (H * W), (o // W) % H, o % W], axis=1).reshape(-1, blk, 3)
    extent = (coords.max(1) - coords.min(1) + 1).prod(1)  # bounding-box volume per block
    assert extent.mean() <= 2.5 * blk


def test_inverse_permutation() -> None:
    order = L.gilbert_order(3, 4, 5)
    inv = L.inverse_permutation(order)
    x = torch.randn(60, 2)
    assert torch.equal(x[order][inv], x)
    assert torch.equal(inv[order], torch.arange(60))


def test_block_neighbours_matches_brute_force() -> None:
    T, H, W, blk = 3, 4, 5, 7
    order = L.gilbert_order(T, H, W)
    adj = L.block_neighbours(order, T, H, W, blk)
    n_blk = -(-T * H * W // blk)
    assert adj.shape == (n_blk, n_blk) and adj.dtype == torch.bool
    assert torch.equal(adj, adj.T) and bool(adj.diagonal().all())
    pos = L.inverse_permutation(order)
    expect = torch.eye(n_blk, dtype=torch.bool)
    for t, h, w in itertools.product(range(T), range(H), range(W)):
        for dt, dh, dw in itertools.product((-1, 0, 1), repeat=3):
            t2, h2, w2 = t + dt, h + dh, w + dw
            if 0 <= t2 < T and 0 <= h2 < H and 0 <= w2 < W:
                a = int(pos[(t * H + h) * W + w]) // blk
                b = int(pos[(t2 * H + h2) * W + w2]) // blk
                expect[a, b] = True
    assert torch.equal(adj, expect)
    assert torch.equal(L.gilbert_block_neighbours(T, H, W, blk), adj)
    with pytest.raises(ValueError):
        L.block_neighbours(torch.zeros(60, dtype=torch.long), T, H, W, blk)


# ----------------------------------------------------------------------------- attention

BLK, D = 8, 16


def _structured(b: int, h: int, n_visual: int, text_len: int, seed: int, text_position: str = "last"):
    """Per-block offsets plus noise, so pooled terms matter and GAPR eligibility is mixed."""
    g = torch.Generator().manual_seed(seed)
    n_v = -(-n_visual // BLK)
    blk_id = torch.arange(n_visual) // BLK
    out = []
    for _ in range(3):
        centre = torch.randn(b, h, n_v, D, generator=g)
        vis = centre[:, :, blk_id] + 0.5 * torch.randn(b, h, n_visual, D, generator=g)
        txt = torch.randn(b, h, text_len, D, generator=g)
        out.append(torch.cat([vis, txt] if text_position == "last" else [txt, vis], dim=2))
    return out


def _dense(q, k, v, key_ok=None):
    mask = None if key_ok is None else key_ok[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize(
    "n_visual,text_len,text_position,valid",
    [(48, 0, "last", None), (44, 0, "last", None), (48, 6, "last", None), (44, 6, "first", None),
     (48, 5, "first", [3, 5]), (44, 10, "last", [10, 0])],
)
def test_drop0_is_dense(n_visual, text_len, text_position, valid) -> None:
    q, k, v = _structured(2, 2, n_visual, text_len, 0, text_position)
    tv = None if valid is None else torch.tensor(valid)
    key_ok = None
    if tv is not None:
        S = n_visual + text_len
        t0 = n_visual if text_position == "last" else 0
        t_idx = torch.arange(S) - t0
        is_txt = (t_idx >= 0) & (t_idx < text_len)
        key_ok = (~is_txt)[None] | (t_idx[None] < tv[:, None])
    for ipar, gapr in [(True, True), (False, False), (True, False)]:
        out = rectified_sparse_attention(
            q, k, v, n_visual=n_visual, text_len=text_len, text_valid_len=tv, block=BLK, drop=0.0,
            text_position=text_position, ipar=ipar, gapr=gapr,
        )
        torch.testing.assert_close(out, _dense(q, k, v, key_ok), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "n_visual,text_len,text_position,drop,ipar,gapr",
    [
        (48, 0, "last", 0.5, True, True),
        (44, 0, "last", 0.8, True, True),
        (48, 6, "last", 0.8, True, True),
        (44, 6, "first", 0.5, True, True),
        (44, 6, "last", 0.8, True, False),
        (48, 6, "first", 0.8, False, True),
        (48, 6, "last", 0.5, False, False),
    ],
)
def test_matches_dense_reference(n_visual, text_len, text_position, drop, ipar, gapr) -> None:
    q, k, v = _structured(1, 2, n_visual, text_len, 1, text_position)
    tv = torch.tensor([text_len - 2]) if text_len else None
    kw = {"n_visual": n_visual, "text_len": text_len, "text_valid_len": tv, "block": BLK, "drop": drop, "tau": 0.3,
              "text_position": text_position, "ipar": ipar, "gapr": gapr}
    out, stats = rectified_sparse_attention(q, k, v, return_stats=True, **kw)
    ref, mask = dense_reference(q, k, v, return_mask=True, **kw)
    assert torch.equal(stats.block_mask, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    n_v = mask.shape[-1]
    assert bool((mask.sum(-1) >= top_k_blocks(drop, n_v)).all())
    assert stats.kept_fraction.shape == (2,)
    if gapr:  # the structured inputs exercise both GAPR branches
        rect = stats.rectified_mask
        dropped = ~mask
        assert 0 < int(rect.sum()) < int(dropped.sum())


def test_ipar_only_scales_plain_sparse() -> None:
    q, k, v = _structured(1, 2, 48, 6, 2)
    kw = {"n_visual": 48, "text_len": 6, "block": BLK, "drop": 0.8}
    plain = rectified_sparse_attention(q, k, v, ipar=False, gapr=False, **kw)
    out, st = rectified_sparse_attention(q, k, v, ipar=True, gapr=False, return_stats=True, **kw)
    assert not bool(st.rectified_mask.any())
    R = st.row_scale
    assert bool((R < 1 - 1e-4).any()) and bool((R > 0).all())
    rows = torch.arange(48) // BLK
    torch.testing.assert_close(out[:, :, :48], R[:, :, rows, None] * plain[:, :, :48], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[:, :, 48:], plain[:, :, 48:])
    # With GAPR on but no eligible block (zero-mean key blocks => zero gain), the ineligible dropped
    # mass folds back into R = 1: the output is plain block-sparse attention.
    k0 = k.clone()
    kv = k0[:, :, :48].reshape(1, 2, 6, BLK, D)
    k0[:, :, :48] = (kv - kv.mean(3, keepdim=True)).reshape(1, 2, 48, D)
    plain0 = rectified_sparse_attention(q, k0, v, ipar=False, gapr=False, **kw)
    out0, st0 = rectified_sparse_attention(q, k0, v, return_stats=True, **kw)
    assert not bool(st0.rectified_mask.any())
    assert torch.equal(st0.row_scale, torch.ones_like(st0.row_scale))
    torch.testing.assert_close(out0, plain0, atol=1e-6, rtol=1e-6)


def test_gapr_brings_output_closer_to_dense() -> None:
    g = torch.Generator().manual_seed(0)
    H, n = 2, 256
    pos = torch.arange(n, dtype=torch.float32)

    def smooth(amp: float):
        freq = torch.rand(H, 1, D, generator=g) * 0.05
        phase = torch.rand(H, 1, D, generator=g) * 6.28
        return (amp * torch.sin(pos[None, :, None] * freq + phase) + 0.05 * torch.randn(H, n, D, generator=g))[None]

    q, k, v = smooth(2.0), smooth(2.0), smooth(1.0)
    dense = _dense(q, k, v)
    kw = {"n_visual": n, "text_len": 0, "block": 16, "drop": 0.8, "tau": 0.0}
    plain = rectified_sparse_attention(q, k, v, ipar=False, gapr=False, **kw)
    rect, st = rectified_sparse_attention(q, k, v, return_stats=True, **kw)
    err_plain = float((plain - dense).norm() / dense.norm())
    err_rect = float((rect - dense).norm() / dense.norm())
    assert float(st.rectified_fraction.mean()) > 0.1
    assert err_rect < 0.6 * err_plain, (err_rect, err_plain)


def test_first_frame_neighbours_and_text_always_on() -> None:
    T, H, W = 3, 4, 4  # 48 visual tokens, 6 blocks of 8
    n_visual, text_len = T * H * W, 6
    nb = L.gilbert_block_neighbours(T, H, W, BLK)
    q, k, v = _structured(1, 2, n_visual, text_len, 3)
    v[:, :, n_visual:] += 50.0  # text values stand out: dropping text would be visible
    tv = torch.tensor([4])
    F_ = P.first_frame_blocks(P.get_preset("wan2.1-t2v"), 6, T)
    assert F_ == 2
    out, st = rectified_sparse_attention(
        q, k, v, n_visual=n_visual, text_len=text_len, text_valid_len=tv, block=BLK, drop=0.9, tau=0.0,
        neighbours=nb, first_frame_blocks=F_, ipar=False, gapr=False, return_stats=True,
    )
    m = st.block_mask
    assert bool(m[..., :F_, :F_].all())
    assert bool((m | ~nb).all())  # neighbours included
    # Independent check of the visual rows: selected blocks plus the 4 valid text keys, nothing else.
    scale = D ** -0.5
    for h in range(2):
        for i in range(6):
            cols = [p for j in range(6) if m[0, h, i, j] for p in range(j * BLK, (j + 1) * BLK)]
            cols += list(range(n_visual, n_visual + 4))
            rows = slice(i * BLK, (i + 1) * BLK)
            att = torch.softmax(q[0, h, rows] @ k[0, h, cols].T * scale, dim=-1)
            torch.testing.assert_close(out[0, h, rows], att @ v[0, h, cols], atol=1e-4, rtol=1e-5)


def test_bad_inputs_raise() -> None:
    q, k, v = _structured(1, 2, 48, 6, 4)
    ok = {"n_visual": 48, "text_len": 6, "block": BLK}
    rsa = rectified_sparse_attention
    with pytest.raises(ValueError, match="n_visual \\+ text_len"):
        rsa(q, k, v, n_visual=48, text_len=4, block=BLK)
    with pytest.raises(ValueError, match="one shape"):
        rsa(q, k[:, :, :50], v[:, :, :50], **ok)
    with pytest.raises(ValueError, match=r"\[B, H, S, D\]"):
        rsa(q[0], k[0], v[0], **ok)
    with pytest.raises(ValueError, match="text_position"):
        rsa(q, k, v, text_position="middle", **ok)
    with pytest.raises(ValueError, match="drop"):
        rsa(q, k, v, drop=1.0, **ok)
    with pytest.raises(ValueError, match="neighbours"):
        rsa(q, k, v, neighbours=torch.ones(5, 5, dtype=torch.bool), **ok)
    with pytest.raises(ValueError, match="first_frame_blocks"):
        rsa(q, k, v, first_frame_blocks=7, **ok)
    with pytest.raises(ValueError, match="text_valid_len"):
        rsa(q, k, v, text_valid_len=7, **ok)
    with pytest.raises(ValueError, match="text_valid_len"):
        rsa(q, k, v, text_valid_len=torch.tensor([1.0]), **ok)


def test_presets() -> None:
    assert P.get_preset("hunyuan").drop == 0.8 and P.get_preset("hunyuan").text_len == 256
    wan = P.get_preset("wan2.1-t2v")
    assert (wan.drop, wan.tau, wan.dense_layers, wan.warmup_steps) == (0.75, 0.3, (0, 1), 5)
    assert P.is_dense(wan, 1, 10) and P.is_dense(wan, 7, 4) and not P.is_dense(wan, 7, 5)
    flux = P.get_preset("flux")
    assert flux.native_text_position == "first" and flux.text_position == "last"
    assert P.is_dense(flux, 40, 0) and not P.is_dense(flux, 36, 0)
    w22 = P.get_preset("wan2.2-t2v")
    assert P.is_dense(w22, 41, 10, layers_per_expert=40) and not P.is_dense(w22, 42, 10, layers_per_expert=40)
    for preset in P.PRESETS.values():
        assert 0 < preset.drop < 1 and preset.block == 128
    with pytest.raises(ConfigError):
        wan.replace(drop=1.5)
    with pytest.raises(KeyError):
        P.get_preset("sora")

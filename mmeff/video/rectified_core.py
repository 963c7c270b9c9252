"""Rectified SpaAttn on already-permuted tokens: pooled selection, IPAR, GAPR, block-sparse attention.

The sequence is ``[visual | text]`` (``text_position="last"``) or ``[text | visual]``
(``"first"``); the visual tokens are already in a locality-preserving order (see
``mmeff.video.layout.gilbert_order``) and are cut into blocks of ``block`` tokens (the last
block may be ragged). Per (batch, head) the method does, for visual query blocks ``i`` and visual
key blocks ``j`` (reference: ``/work/shared/reference/diffusion-methods.md`` §3):

1. pooled ``q̄_i``, ``k̄_j``, ``v̄_j`` (block means); text keys stay unpooled ("isolated");
2. pooled logits ``q̄_i·k̄_j·scale`` and ``q̄_i·k_t·scale``, softmax over the whole row;
3. IPAR: a pooled column stands for ``b_j`` keys, so ``p̃_ij ∝ b_j·P_ij`` and all text mass is
   one column ``p̃_i,txt ∝ Σ_t P_it`` (normalised together). Without text this is the plain
   softmax over visual blocks. ``b_j`` is the true token count of block ``j``, so a ragged last
   block is not diluted by padding (the shipped code pads with zeros);
4. selection ``M``: the smallest prefix of the descending row of ``p̃`` (text column included)
   whose cumulative mass exceeds ``tau``, at least ``top_k`` visual blocks (``floor="visual"``,
   mmeff's default: the ``top_k`` largest visual blocks are added, ``top_k = floor((1-drop)·n_v)``
   computed robustly, so ``drop=0`` is dense) or at least ``top_k`` entries of the joint row
   (``floor="joint"``, the official rule: ``max(prefix length, top_k)`` entries of the descending
   row, text column included, with the official ``top_k = int((1 - drop) * n_v)``: when text ranks
   in the top ``top_k`` one visual block fewer is kept, and ``drop=0`` with text is not dense),
   ∪ ``neighbours`` ∪ first-frame blocks dense among themselves; all valid text keys always on;
5. GAPR eligibility ``A_ij = |q̄_i·k̄_j| > |Δq_i·k̄_j| + |q̄_i·Δk_j|`` (``Δ`` = mean absolute
   deviation of the block around its mean);
6. rectified blocks ``D_ij = ¬M_ij ∧ A_ij``; ``R_i = 1 - Σ_{j∈D} p̃_ij`` (kept, text and
   dropped-but-ineligible mass: the classic renormalisation of the shipped code) and
   ``O^nc_i = Σ_{j∈D} p̃_ij·v̄_j``;
7. ``O_i = R_i·O^sparse_i + O^nc_i`` for visual rows, with ``O^sparse`` the block-sparse attention
   over ``M`` and the text keys (one fused kernel call with the epilogue ``row_scale=R``,
   ``row_add=O^nc``);
8. text query rows: dense attention over all valid keys.

Ablation switches (mmeff's definitions; the reference only specifies the full method):

* ``ipar=True, gapr=True``: the method as above.
* ``ipar=True, gapr=False`` ("IPAR only"): no pooled recovery; ``R_i = Σ_{j∈M} p̃_ij + p̃_i,txt``,
  the estimated kept mass, so ``O = R·O^sparse``.
* ``ipar=False, gapr=True``: ``O = O^sparse + O^nc`` (no reallocation of the sparse part).
* ``ipar=False, gapr=False``: plain block-sparse attention over the same selection.

``p̃`` (and therefore the selection) is the same in all four, so ablations differ only in
the rectification. ``dense_reference`` is an independent, loop-based twin for tests.

Deliberate differences from the official code (the floor with text and its rounding, our own
Hilbert curve, the ragged last block, batch / text layouts) and the option that restores the
official rule: ``docs/video-sparse-attention-variants.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmeff.kernels.block_sparse_attn import (
    block_mean,
    block_sparse_attention,
    block_stats,
    mask_to_indices,
)

__all__ = [
    "FLOOR_RULES",
    "RectifiedPlan",
    "RectifiedStats",
    "dense_reference",
    "plan_rectified",
    "rectified_sparse_attention",
    "top_k_blocks",
]

TextPosition = Literal["last", "first"]
FloorRule = Literal["visual", "joint"]
FLOOR_RULES = ("visual", "joint")


@dataclass(frozen=True)
class RectifiedStats:
    """What one call selected and rectified (visual query blocks × visual key blocks).

    ``block_mask``: bool ``[B, H, n_v, n_v]``, the selected set ``M`` (text keys are always on
    in addition). ``rectified_mask``: bool ``[B, H, n_v, n_v]``, dropped blocks recovered by
    GAPR. ``row_scale``: float32 ``[B, H, n_v]``, ``R`` (ones when ``ipar`` is off).
    ``text_mass``: float32 ``[B, H, n_v]``, ``p̃`` of the text column. ``kept_fraction`` and
    ``rectified_fraction``: float32 ``[H]``, mean over batch and query blocks of the fraction of
    visual key blocks kept / rectified. ``r_mean``: mean of ``R``.
    """

    block_mask: Tensor
    rectified_mask: Tensor
    row_scale: Tensor
    text_mass: Tensor
    kept_fraction: Tensor
    rectified_fraction: Tensor
    r_mean: float


@dataclass(frozen=True)
class RectifiedPlan:
    """Selection and rectification terms for the visual query blocks (all float32 / bool)."""

    p_visual: Tensor  # [B, H, n_v, n_v] p̃ of visual key blocks
    p_text: Tensor  # [B, H, n_v] p̃ of the text column
    block_mask: Tensor  # [B, H, n_v, n_v] M
    eligible: Tensor  # [B, H, n_v, n_v] A (GAPR-eligible), before excluding M
    rectified: Tensor  # [B, H, n_v, n_v] D = ¬M ∧ A when gapr, else all False
    row_scale: Tensor | None  # [B, H, n_v] R, None when ipar is off
    row_add: Tensor | None  # [B, H, n_v, D] O^nc, None when gapr is off


# ----------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Layout:
    batch: int
    heads: int
    seq: int
    dim: int
    n_visual: int
    text_len: int
    n_v: int
    vis: slice
    txt: slice
    scale: float


def _check(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    n_visual: int,
    text_len: int,
    text_valid_len: int | Tensor | None,
    block: int,
    drop: float,
    tau: float,
    neighbours: Tensor | None,
    first_frame_blocks: int,
    text_position: str,
    scale: float | None,
    floor: str = "visual",
) -> _Layout:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"{name} must be [B, H, S, D] (heads before sequence), got {shape}; "
                "use .transpose(1, 2) on a [B, S, H, D] tensor"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            "rectified_sparse_attention is self-attention over one joint sequence: q, k, v must "
            f"have one shape [B, H, S, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("q, k, v must share one dtype and one device")
    for name, val in (("n_visual", n_visual), ("text_len", text_len), ("block", block),
                      ("first_frame_blocks", first_frame_blocks)):
        if not isinstance(val, int) or isinstance(val, bool):
            raise ValueError(f"{name} must be an int, got {val!r}")  # noqa: TRY004
    batch, heads, seq, dim = q.shape
    if n_visual < 1 or text_len < 0:
        raise ValueError(f"need n_visual >= 1 and text_len >= 0, got {n_visual} and {text_len}")
    if n_visual + text_len != seq:
        raise ValueError(
            f"n_visual + text_len = {n_visual} + {text_len} = {n_visual + text_len} must equal the "
            f"sequence length S = {seq} of q/k/v [B, H, S, D]"
        )
    if block <= 0:
        raise ValueError(f"block must be a positive int, got {block}")
    if not (0.0 <= float(drop) < 1.0):
        raise ValueError(f"drop (fraction of visual key blocks removed) must be in [0, 1), got {drop}")
    if not (0.0 <= float(tau) <= 1.0):
        raise ValueError(f"tau (cumulative pooled mass to keep) must be in [0, 1], got {tau}")
    if floor not in FLOOR_RULES:
        raise ValueError(
            f"floor must be one of {FLOOR_RULES} ('visual': top-k over visual blocks, drop=0 is dense; "
            f"'joint': the official max(prefix, top_k) over the joint row with text), got {floor!r}"
        )
    if text_position not in ("last", "first"):
        raise ValueError(f"text_position must be 'last' or 'first', got {text_position!r}")
    n_v = (n_visual + block - 1) // block
    if neighbours is not None and (
        not isinstance(neighbours, Tensor) or neighbours.dtype != torch.bool or neighbours.shape != (n_v, n_v)
    ):
        got = (neighbours.dtype, tuple(neighbours.shape)) if isinstance(neighbours, Tensor) else neighbours
        raise ValueError(
            f"neighbours must be a bool tensor [n_v, n_v] = [{n_v}, {n_v}] (ceil(n_visual / block)); "
            f"got {got}. Build it with mmeff.video.layout.block_neighbours(order, T, H, W, block)"
        )
    if not 0 <= first_frame_blocks <= n_v:
        raise ValueError(f"first_frame_blocks must be in [0, n_v={n_v}], got {first_frame_blocks}")
    if text_valid_len is not None:
        if text_len == 0:
            raise ValueError("text_valid_len given but text_len is 0")
        if isinstance(text_valid_len, Tensor):
            if (text_valid_len.shape != (batch,) or text_valid_len.is_floating_point()
                    or text_valid_len.dtype == torch.bool):
                raise ValueError(
                    f"text_valid_len must be an int or an integer tensor [B={batch}], got "
                    f"{text_valid_len.dtype} {tuple(text_valid_len.shape)}"
                )
        elif not isinstance(text_valid_len, int) or isinstance(text_valid_len, bool):
            raise ValueError(f"text_valid_len must be an int or an integer tensor [B], got {text_valid_len!r}")
        elif not 0 <= text_valid_len <= text_len:
            raise ValueError(f"text_valid_len must be in [0, text_len={text_len}], got {text_valid_len}")
    if text_position == "last":
        vis, txt = slice(0, n_visual), slice(n_visual, seq)
    else:
        vis, txt = slice(text_len, seq), slice(0, text_len)
    if scale is None:
        scale = 1.0 / math.sqrt(dim)
    return _Layout(batch, heads, seq, dim, n_visual, text_len, n_v, vis, txt, float(scale))


def _valid_text(text_valid_len: int | Tensor | None, text_len: int, batch: int, device) -> Tensor:
    """Valid text tokens per batch item, int64 [B]."""
    if text_valid_len is None:
        return torch.full((batch,), text_len, dtype=torch.int64, device=device)
    if isinstance(text_valid_len, Tensor):
        return text_valid_len.to(device=device, dtype=torch.int64).clamp(0, text_len)
    return torch.full((batch,), int(text_valid_len), dtype=torch.int64, device=device)


def top_k_blocks(drop: float, n_v: int, floor: str = "visual") -> int:
    """The floor on kept blocks: ``floor((1 - drop) * n_v)`` robust to float rounding (``"visual"``),
    or the official ``int((1 - drop) * n_v)`` (``"joint"``: 179 of 900 blocks at drop 0.8, where
    ``1 - 0.8 = 0.19999999999999996``)."""
    if floor == "joint":
        return min(n_v, max(0, int((1 - float(drop)) * n_v)))
    return min(n_v, max(0, math.floor((1.0 - float(drop)) * n_v + 1e-6)))


# ----------------------------------------------------------------------------- planning


def plan_rectified(
    q_vis: Tensor,
    k_vis: Tensor,
    v_vis: Tensor,
    k_txt: Tensor | None,
    text_valid: Tensor | None,
    *,
    block: int,
    drop: float,
    tau: float,
    scale: float,
    neighbours: Tensor | None = None,
    first_frame_blocks: int = 0,
    ipar: bool = True,
    gapr: bool = True,
    floor: str = "visual",
) -> RectifiedPlan:
    """Steps 1-6 on split tensors: visual ``[B, H, n_visual, D]``, text keys ``[B, H, T, D]``.

    ``text_valid`` is int64 ``[B]`` (valid text keys per batch item) or None with no text.
    Everything here is batched torch (float32), sync-free, and runs on the tensors' device.
    """
    _batch, _heads, n_visual, _ = q_vis.shape
    dev = q_vis.device
    n_v = (n_visual + block - 1) // block
    counts = torch.full((n_v,), float(block), device=dev)
    counts[-1] = float(n_visual - (n_v - 1) * block)

    # block means and mean |x - mean| per block, one fused pass each on the GPU
    q_bar, dq = block_stats(q_vis, block)  # [B, H, n_v, D] float32
    k_bar, dk = block_stats(k_vis, block)
    s_vis = torch.matmul(q_bar, k_bar.transpose(-1, -2))  # unscaled q̄·k̄
    # IPAR: column j stands for counts[j] keys -> add log(counts) to its logit.
    logit_vis = s_vis * scale + counts.log()
    if k_txt is not None and k_txt.shape[-2] > 0:
        logit_txt = torch.matmul(q_bar, k_txt.to(torch.float32).transpose(-1, -2)) * scale
        t_ok = torch.arange(k_txt.shape[-2], device=dev)[None, :] < text_valid[:, None]  # [B, T]
        logit_txt = logit_txt.masked_fill(~t_ok[:, None, None, :], float("-inf"))
        lse = torch.logaddexp(logit_vis.logsumexp(-1), logit_txt.logsumexp(-1))  # [B, H, n_v]
        p_vis = torch.exp(logit_vis - lse[..., None])
        p_txt = torch.exp(logit_txt - lse[..., None]).sum(-1)
    else:
        p_vis = torch.softmax(logit_vis, dim=-1)
        p_txt = torch.zeros(p_vis.shape[:-1], device=dev, dtype=p_vis.dtype)

    # Step 4: tau prefix over the whole row (text column included), then the top_k floor.
    has_text = k_txt is not None and k_txt.shape[-2] > 0
    row = torch.cat([p_vis, p_txt[..., None]], dim=-1) if has_text else p_vis
    vals, cols = torch.sort(row, dim=-1, descending=True)
    # mass strictly before each sorted entry: entry r is kept iff it is <= tau
    before = torch.cat([torch.zeros_like(vals[..., :1]), torch.cumsum(vals, dim=-1)[..., :-1]], dim=-1)
    in_prefix = before <= tau
    top_k = top_k_blocks(drop, n_v, floor)
    if floor == "joint":  # official: max(prefix length, top_k) entries of the joint row
        in_prefix = in_prefix | (torch.arange(row.shape[-1], device=dev) < top_k)
    sel = torch.zeros_like(in_prefix).scatter_(-1, cols, in_prefix)[..., :n_v]
    if floor == "visual" and top_k > 0:
        top = torch.topk(p_vis, top_k, dim=-1).indices
        sel = sel.scatter(-1, top, True)
    if neighbours is not None:
        sel = sel | neighbours.to(device=dev)
    if first_frame_blocks > 0:
        f = first_frame_blocks
        sel[..., :f, :f] = True

    # Step 5: GAPR eligibility on unscaled pooled products.
    err = torch.matmul(dq, k_bar.transpose(-1, -2)).abs() + torch.matmul(q_bar, dk.transpose(-1, -2)).abs()
    eligible = s_vis.abs() > err

    # Step 6: rectification terms.
    rectified = (~sel) & eligible if gapr else torch.zeros_like(sel)
    row_scale = None
    if ipar:
        lost = rectified if gapr else ~sel
        row_scale = 1.0 - (p_vis * lost).sum(-1)
    row_add = None
    if gapr:
        v_bar = block_mean(v_vis, block)
        row_add = torch.matmul(p_vis * rectified, v_bar)
    return RectifiedPlan(p_vis, p_txt, sel, eligible, rectified, row_scale, row_add)


# ----------------------------------------------------------------------------- forward


def _merge(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> Tensor:
    """Combine two softmax-normalised partial attentions over disjoint key sets (float32)."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).nan_to_num(0.0)[..., None]
    w2 = torch.exp(lse2 - lse).nan_to_num(0.0)[..., None]
    return w1 * o1.to(torch.float32) + w2 * o2.to(torch.float32)


def _text_rows(q_t: Tensor, k: Tensor, v: Tensor, lay: _Layout, valid: Tensor | None) -> Tensor:
    """Dense attention of the text queries over every valid key of the joint sequence."""
    mask = None
    if valid is not None:
        pos = torch.arange(lay.seq, device=q_t.device)
        t_idx = pos - lay.txt.start
        is_txt = (pos >= lay.txt.start) & (pos < lay.txt.stop)
        ok = (~is_txt)[None, :] | (t_idx[None, :] < valid[:, None])  # [B, S]
        mask = ok[:, None, None, :]
    return F.scaled_dot_product_attention(q_t, k, v, attn_mask=mask, scale=lay.scale)


def rectified_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    n_visual: int,
    text_len: int,
    text_valid_len: int | Tensor | None = None,
    block: int = 128,
    drop: float = 0.8,
    tau: float = 0.3,
    neighbours: Tensor | None = None,
    first_frame_blocks: int = 0,
    text_position: TextPosition = "last",
    ipar: bool = True,
    gapr: bool = True,
    scale: float | None = None,
    return_stats: bool = False,
    floor: FloorRule = "visual",
) -> Tensor | tuple[Tensor, RectifiedStats]:
    """Rectified block-sparse attention; ``q, k, v`` are ``[B, H, S]`` + ``[D]``, ``S = n_visual + text_len``.

    Visual tokens must already be permuted (gilbert order). ``text_valid_len`` (int or int
    tensor ``[B]``) marks the text tokens after it as padding: they are never attended.
    ``neighbours`` is the bool ``[n_v, n_v]`` block adjacency (``layout.block_neighbours``),
    ``first_frame_blocks`` the ``F`` whose ``[:F, :F]`` visual blocks are forced on (Wan).
    Returns the output in the input layout and dtype (and ``RectifiedStats`` with
    ``return_stats``). See the module docstring for the algorithm and the ablation switches.
    """
    lay = _check(
        q, k, v, n_visual=n_visual, text_len=text_len, text_valid_len=text_valid_len, block=block,
        drop=drop, tau=tau, neighbours=neighbours, first_frame_blocks=first_frame_blocks,
        text_position=text_position, scale=scale, floor=floor,
    )
    dev = q.device
    has_text = text_len > 0
    valid = _valid_text(text_valid_len, text_len, lay.batch, dev) if has_text else None
    q_v, k_v, v_v = q[:, :, lay.vis], k[:, :, lay.vis], v[:, :, lay.vis]
    k_t, v_t = (k[:, :, lay.txt], v[:, :, lay.txt]) if has_text else (None, None)

    plan = plan_rectified(
        q_v, k_v, v_v, k_t, valid, block=block, drop=drop, tau=tau, scale=lay.scale,
        neighbours=neighbours, first_frame_blocks=first_frame_blocks, ipar=ipar, gapr=gapr, floor=floor,
    )
    n_v = lay.n_v
    sync_free = q.is_cuda
    if not has_text:
        idx, cnt = mask_to_indices(plan.block_mask, max_k=n_v if sync_free else None)
        out_v, _ = block_sparse_attention(
            q_v, k_v, v_v, idx, cnt, block_m=block, block_n=block, scale=lay.scale,
            row_scale=plan.row_scale, row_add=plan.row_add,
        )
    else:
        n_tb = (text_len + block - 1) // block
        t_on = (torch.arange(n_tb, device=dev)[None, :] * block) < valid[:, None]  # [B, n_tb]
        t_on = t_on[:, None, None, :].expand(lay.batch, lay.heads, n_v, n_tb)
        if n_visual % block == 0:
            # One fused call: keys [visual | text]; padding text keys sit at the end (kv_len).
            if text_position == "last":
                k_all, v_all = k, v
            else:
                k_all, v_all = torch.cat([k_v, k_t], dim=2), torch.cat([v_v, v_t], dim=2)
            mask = torch.cat([plan.block_mask, t_on], dim=-1)
            idx, cnt = mask_to_indices(mask, max_k=n_v + n_tb if sync_free else None)
            kv_len = None if text_valid_len is None else n_visual + valid
            out_v, _ = block_sparse_attention(
                q_v, k_all, v_all, idx, cnt, block_m=block, block_n=block, scale=lay.scale,
                kv_len=kv_len, row_scale=plan.row_scale, row_add=plan.row_add,
            )
        else:
            # Ragged last visual block: visual and text keys in two calls, merged by LSE.
            idx, cnt = mask_to_indices(plan.block_mask, max_k=n_v if sync_free else None)
            o1, lse1 = block_sparse_attention(
                q_v, k_v, v_v, idx, cnt, block_m=block, block_n=block, scale=lay.scale,
            )
            idx_t, cnt_t = mask_to_indices(t_on, max_k=n_tb if sync_free else None)
            o2, lse2 = block_sparse_attention(
                q_v, k_t, v_t, idx_t, cnt_t, block_m=block, block_n=block, scale=lay.scale,
                kv_len=None if text_valid_len is None else valid,
            )
            out = _merge(o1, lse1, o2, lse2)
            rows = torch.arange(n_visual, device=dev) // block
            if plan.row_scale is not None:
                out = out * plan.row_scale[:, :, rows, None]
            if plan.row_add is not None:
                out = out + plan.row_add[:, :, rows]
            out_v = out.to(q.dtype)

    out = torch.empty_like(q)
    out[:, :, lay.vis] = out_v
    if has_text:
        out[:, :, lay.txt] = _text_rows(q[:, :, lay.txt], k, v, lay, None if text_valid_len is None else valid)
    if not return_stats:
        return out
    return out, _stats(plan, n_v)


def _stats(plan: RectifiedPlan, n_v: int) -> RectifiedStats:
    m = plan.block_mask
    r = plan.row_scale if plan.row_scale is not None else torch.ones(m.shape[:-1], device=m.device)
    return RectifiedStats(
        block_mask=m,
        rectified_mask=plan.rectified,
        row_scale=r,
        text_mass=plan.p_text,
        kept_fraction=m.to(torch.float32).mean(dim=(0, 2, 3)),
        rectified_fraction=plan.rectified.to(torch.float32).mean(dim=(0, 2, 3)),
        r_mean=float(r.mean()),
    )


# ----------------------------------------------------------------------------- reference twin


def dense_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    n_visual: int,
    text_len: int,
    text_valid_len: int | Tensor | None = None,
    block: int = 128,
    drop: float = 0.8,
    tau: float = 0.3,
    neighbours: Tensor | None = None,
    first_frame_blocks: int = 0,
    text_position: TextPosition = "last",
    ipar: bool = True,
    gapr: bool = True,
    scale: float | None = None,
    return_mask: bool = False,
    floor: FloorRule = "visual",
) -> Tensor | tuple[Tensor, Tensor]:
    """Obviously-correct twin of ``rectified_sparse_attention`` (loops; tiny inputs only).

    Pooling, the pooled softmax, the selection and GAPR are written out per (batch, head,
    block) with Python loops; the attention is a full float64 softmax with the selected token
    mask materialised. ``return_mask`` also returns the selected visual block mask
    ``[B, H, n_v, n_v]``.
    """
    lay = _check(
        q, k, v, n_visual=n_visual, text_len=text_len, text_valid_len=text_valid_len, block=block,
        drop=drop, tau=tau, neighbours=neighbours, first_frame_blocks=first_frame_blocks,
        text_position=text_position, scale=scale, floor=floor,
    )
    B, H, S, D = q.shape
    n_v = lay.n_v
    f64 = torch.float64
    qd, kd, vd = q.to(f64), k.to(f64), v.to(f64)
    vis_pos = list(range(S))[lay.vis]
    txt_pos = list(range(S))[lay.txt]
    valid = _valid_text(text_valid_len, text_len, B, "cpu").tolist() if text_len else [0] * B
    blocks = [vis_pos[j * block:(j + 1) * block] for j in range(n_v)]
    top_k = top_k_blocks(drop, n_v, floor)
    out = torch.zeros(B, H, S, D, dtype=f64, device=q.device)
    full_mask = torch.zeros(B, H, n_v, n_v, dtype=torch.bool)
    for b in range(B):
        txt_ok = txt_pos[: valid[b]]
        key_ok = vis_pos + txt_ok
        for h in range(H):
            qs, ks, vs = qd[b, h], kd[b, h], vd[b, h]
            qm = [qs[idx].mean(0) for idx in blocks]
            km = [ks[idx].mean(0) for idx in blocks]
            vm = [vs[idx].mean(0) for idx in blocks]
            qdev = [(qs[idx] - qm[j]).abs().mean(0) for j, idx in enumerate(blocks)]
            kdev = [(ks[idx] - km[j]).abs().mean(0) for j, idx in enumerate(blocks)]
            for i in range(n_v):
                # pooled softmax over [visual blocks | each valid text key], then IPAR weights
                logits = [float(qm[i] @ km[j]) * lay.scale for j in range(n_v)]
                logits += [float(qm[i] @ ks[t]) * lay.scale for t in txt_ok]
                mx = max(logits)
                e = [math.exp(x - mx) for x in logits]
                z = sum(e)
                P = [x / z for x in e]
                denom = sum(len(blocks[j]) * P[j] for j in range(n_v)) + sum(P[n_v:])
                pv = [len(blocks[j]) * P[j] / denom for j in range(n_v)]
                pt = sum(P[n_v:]) / denom
                # selection: tau prefix of the descending row (text column included) + top_k floor
                entries = sorted([(pv[j], j) for j in range(n_v)] + ([(pt, -1)] if txt_pos else []), reverse=True)
                keep = set()
                acc = 0.0
                for rank, (val, j) in enumerate(entries):
                    if acc > tau and not (floor == "joint" and rank < top_k):
                        break
                    if j >= 0:
                        keep.add(j)
                    acc += val
                if floor == "visual":
                    keep |= {j for _, j in sorted([(pv[j], j) for j in range(n_v)], reverse=True)[:top_k]}
                if neighbours is not None:
                    keep |= {j for j in range(n_v) if bool(neighbours[i, j])}
                if i < first_frame_blocks:
                    keep |= set(range(first_frame_blocks))
                for j in keep:
                    full_mask[b, h, i, j] = True
                # GAPR and rectification terms
                rect = []
                for j in range(n_v):
                    gain = abs(float(qm[i] @ km[j]))
                    err = abs(float(qdev[i] @ km[j])) + abs(float(qm[i] @ kdev[j]))
                    if gapr and j not in keep and gain > err:
                        rect.append(j)
                if ipar and gapr:
                    R = 1.0 - sum(pv[j] for j in rect)
                elif ipar:
                    R = sum(pv[j] for j in keep) + pt
                else:
                    R = 1.0
                onc = torch.zeros(D, dtype=f64, device=q.device)
                for j in rect:
                    onc = onc + pv[j] * vm[j]
                # block-sparse attention for this query block, full softmax with a token mask
                cols = [p for j in sorted(keep) for p in blocks[j]] + txt_ok
                rows = blocks[i]
                att = torch.softmax((qs[rows] @ ks[cols].T) * lay.scale, dim=-1)
                out[b, h, rows] = R * (att @ vs[cols]) + onc
            for t in txt_pos:
                att = torch.softmax((qs[t] @ ks[key_ok].T) * lay.scale, dim=-1)
                out[b, h, t] = att @ vs[key_ok]
    result = out.to(q.dtype)
    return (result, full_mask) if return_mask else result

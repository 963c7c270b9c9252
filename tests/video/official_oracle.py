"""Plain float64 re-implementations of the *official* VMoBA and Rectified SpaAttn ops (test oracles).

Written from ``/work/shared/reference/diffusion-methods.md`` §3-4 and a reading of the official
code (KwaiVGI/VMoBA ``src/vmoba.py`` @ 4da72ff; BienLuky/Rectified-SpaAttn
``rectified_spaattn/rectified_{hunyuan,wan21}_attn.py`` and ``gapr_mask.py`` @ 4b0aa10), in our own
words. They keep the official data layout where it changes results and drop what does not
(FlashAttention kernels become a float64 masked softmax; the split self/routed branches merged
by log-sum-exp become one softmax over their union, which is the same number):

- VMoBA packs the batch into one varlen sequence: gates are ``[chunk, head, token]`` over *all*
  chunks of the batch, entries of another sample's chunks are invalid (gate ``-inf``, normalised
  value 0, still present in the sort), ``head_global`` competes over the packed batch, and the
  dense fallback needs the whole call to route nothing. The official sorts are not stable;
  here they are (ties keep index order), which is the official behaviour on CPU.
- Rectified SpaAttn: text last, visual length a multiple of the block (both required by the
  official code), pooled softmax with isolated text keys, IPAR, the joint ``max(prefix, top_k)``
  floor with ``top_k = int((1 - drop) * n_v)``, GAPR, ``R`` and the pooled recovery over the
  rectified set, block-sparse attention. The official HunyuanVideo path assumes batch 1; each
  sample is run alone here with its own valid text length.

Nothing here imports mmeff: the oracle must not share code with what it checks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

F64 = torch.float64
OFFICIAL_EPS = 1e-6


# ============================================================================= VMoBA


def _packed_chunks(batch: int, seq: int, chunk_size: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Chunk ``(start, end)`` in packed token positions and each chunk's sample (ragged last chunk)."""
    spans, owner = [], []
    for b in range(batch):
        for start in range(0, seq, chunk_size):
            spans.append((b * seq + start, b * seq + min(start + chunk_size, seq)))
            owner.append(b)
    return spans, owner


def _minmax(gate: Tensor, valid: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Official normalisation: (g - min) / (max - min) over valid entries; range <= eps -> 1; invalid -> 0."""
    hi = gate.masked_fill(~valid, -math.inf).amax(dim=dims, keepdim=True)
    lo = gate.masked_fill(~valid, math.inf).amin(dim=dims, keepdim=True)
    span = hi - lo
    span = torch.where(span <= OFFICIAL_EPS, torch.ones_like(span), span)
    return torch.where(valid, (gate - lo) / span, torch.zeros_like(gate))


def _cumulative_cut(values: Tensor, total: Tensor, remain: Tensor) -> Tensor:
    """Rows of ``values`` (last dim ranked, descending, stable): keep the ranked entries up to and
    including the first whose cumulative share of ``total`` reaches ``remain`` (all if none)."""
    ranked, order = torch.sort(values, dim=-1, descending=True, stable=True)
    share = ranked.cumsum(-1) / (total.unsqueeze(-1) + OFFICIAL_EPS)
    reached = share >= remain.unsqueeze(-1)
    n = values.shape[-1]
    first = torch.where(reached.any(-1), reached.to(torch.int64).argmax(-1), torch.full_like(remain, n - 1,
                                                                                             dtype=torch.int64))
    keep_ranked = torch.arange(n).expand_as(ranked) <= first.unsqueeze(-1)
    return torch.zeros_like(keep_ranked).scatter(-1, order, keep_ranked)


def official_vmoba_selection(
    q: Tensor, k: Tensor, *, chunk_size: int, mode: str, topk: int, threshold: float, threshold_type: str,
) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """Routed chunks of the official code: bool ``[C, H, N]`` (own chunks removed), the own-chunk
    mask ``[C, N]`` and the chunk spans, for ``q, k`` ``[B, H, S, D]`` packed to ``N = B * S`` tokens."""
    batch, heads, seq, dim = q.shape
    n_tok = batch * seq
    qp = q.to(F64).permute(0, 2, 1, 3).reshape(n_tok, heads, dim)
    kp = k.to(F64).permute(0, 2, 1, 3).reshape(n_tok, heads, dim)
    spans, owner = _packed_chunks(batch, seq, chunk_size)
    n_chunks = len(spans)
    mean_keys = torch.stack([kp[s:e].mean(0) for s, e in spans])  # [C, H, D]
    gate = torch.einsum("chd,thd->cht", mean_keys, qp)  # unscaled
    token = torch.arange(n_tok)
    own = torch.stack([(token >= s) & (token < e) for s, e in spans])  # [C, N]
    token_sample = token // seq
    valid = (torch.tensor(owner)[:, None] == token_sample[None, :])[:, None, :].expand(n_chunks, heads, n_tok)
    own3 = own[:, None, :].expand(n_chunks, heads, n_tok)

    if mode == "topk":
        k_eff = min(topk, n_chunks)
        boosted = (gate + own3.to(F64) * 1e9).masked_fill(~valid, -math.inf)
        if threshold_type == "query_head":
            pick = torch.zeros_like(valid).scatter(0, boosted.topk(k_eff, dim=0).indices, True) & valid
        else:  # head_global: k * N entries per head over all (chunk, token) pairs
            flat = boosted.permute(1, 0, 2).reshape(heads, -1)
            chosen = torch.zeros(flat.shape, dtype=torch.bool).scatter(1, flat.topk(k_eff * n_tok, dim=1).indices, True)
            pick = chosen.view(heads, n_chunks, n_tok).permute(1, 0, 2)
    elif threshold_type == "query_head":
        norm = _minmax(gate, valid, (0,))
        total = norm.sum(0)
        remain = (threshold - (norm * own3).sum(0) / (total + OFFICIAL_EPS)).clamp_min(0.0)
        competitors = norm.masked_fill(own3, 0.0).permute(1, 2, 0)  # [H, N, C]: rank over chunks
        pick = _cumulative_cut(competitors, total, remain).permute(2, 0, 1) | own3
        pick = pick & valid
    else:  # head_global threshold
        norm = _minmax(gate, valid, (0, 2))
        total = norm.sum((0, 2))
        remain = (threshold - (norm * own3).sum((0, 2)) / (total + OFFICIAL_EPS)).clamp_min(0.0)
        competitors = norm.masked_fill(own3 | ~valid, 0.0).permute(1, 0, 2).reshape(heads, -1)  # chunk-major
        pick = _cumulative_cut(competitors, total, remain).view(heads, n_chunks, n_tok).permute(1, 0, 2)
        pick = (pick | own3) & valid
    return pick & ~own3, own, spans


def official_vmoba(
    q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int, mode: str = "threshold", topk: int = 3,
    threshold: float = 0.25, threshold_type: str = "query_head", scale: float | None = None,
) -> Tensor:
    """Official VMoBA output ``[B, H, S, D]`` (float64) for equal-length samples in chunk order."""
    batch, heads, seq, dim = q.shape
    routed, own, spans = official_vmoba_selection(
        q, k, chunk_size=chunk_size, mode=mode, topk=topk, threshold=threshold, threshold_type=threshold_type)
    n_tok = batch * seq
    token_sample = torch.arange(n_tok) // seq
    if not bool(routed.any()):  # official fallback: plain dense attention per sample
        allowed = (token_sample[:, None] == token_sample[None, :]).expand(heads, n_tok, n_tok)
    else:
        chunk_of_key = torch.zeros(n_tok, dtype=torch.int64)
        for c, (s, e) in enumerate(spans):
            chunk_of_key[s:e] = c
        chosen = routed | own[:, None, :]  # [C, H, N]
        allowed = chosen.permute(1, 2, 0)[:, :, chunk_of_key]  # [H, N(query), N(key)]
    qp, kp, vp = (t.to(F64).permute(1, 0, 2, 3).reshape(heads, n_tok, dim) for t in (q, k, v))
    sc = 1.0 / math.sqrt(dim) if scale is None else scale
    logits = (qp @ kp.transpose(-1, -2) * sc).masked_fill(~allowed, -math.inf)
    out = torch.softmax(logits, dim=-1) @ vp  # [H, N, D]
    return out.view(heads, batch, seq, dim).permute(1, 0, 2, 3)


# ============================================================================= Rectified SpaAttn


def official_rectified(
    q: Tensor, k: Tensor, v: Tensor, *, n_visual: int, block: int, drop: float, tau: float,
    text_valid: list[int] | None = None, neighbours: Tensor | None = None, first_frame_blocks: int = 0,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Official Rectified SpaAttn on ``[visual (already in curve order) | text]``, ``[B, H, S, D]``.

    With text (HunyuanVideo / FLUX / CogVideoX code): IPAR weights and the joint floor; without
    (Wan code): plain pooled softmax over visual blocks, ``first_frame_blocks`` dense. Returns the
    float64 output and the selected visual block mask ``[B, H, n_v, n_v]``.
    """
    batch, heads, seq, dim = q.shape
    assert n_visual % block == 0, "the official code needs visual tokens in whole blocks"
    n_v = n_visual // block
    n_text = seq - n_visual
    top_k = int((1 - drop) * n_v)  # the official truncation
    sc = dim ** -0.5 if scale is None else scale
    out = torch.zeros(batch, heads, seq, dim, dtype=F64)
    masks = torch.zeros(batch, heads, n_v, n_v, dtype=torch.bool)
    for b in range(batch):
        n_valid = (text_valid[b] if text_valid is not None else n_text) if n_text else 0
        keys_ok = torch.arange(seq) < n_visual + n_valid
        for h in range(heads):
            qs, ks, vs = (t[b, h].to(F64) for t in (q, k, v))
            qb = qs[:n_visual].view(n_v, block, dim)
            kb = ks[:n_visual].view(n_v, block, dim)
            q_pool, k_pool, v_pool = qb.mean(1), kb.mean(1), vs[:n_visual].view(n_v, block, dim).mean(1)
            raw_vis = q_pool @ k_pool.T  # unscaled pooled products (GAPR uses these)
            if n_text:
                k_text = ks[n_visual:n_visual + n_valid]
                probs = torch.softmax(torch.cat([raw_vis, q_pool @ k_text.T], dim=1) * sc, dim=1)
                vis_mass = probs[:, :n_v] * block  # a pooled column stands for `block` keys
                text_mass = probs[:, n_v:].sum(1, keepdim=True)
                denom = vis_mass.sum(1, keepdim=True) + text_mass
                p_row = torch.cat([vis_mass / denom, text_mass / denom], dim=1)  # [n_v, n_v + 1]
            else:
                p_row = torch.softmax(raw_vis * sc, dim=1)  # [n_v, n_v]
            ranked, order = torch.sort(p_row, dim=1, descending=True, stable=True)
            count = (ranked.cumsum(1) <= tau).sum(1) + 1
            count = torch.maximum(count, torch.full_like(count, top_k))
            take = torch.arange(p_row.shape[1])[None, :] < count[:, None]
            keep = torch.zeros_like(take).scatter(1, order, take)[:, :n_v]  # the text column is always on
            if neighbours is not None:
                keep = keep | neighbours
            if first_frame_blocks:
                keep[:first_frame_blocks, :first_frame_blocks] = True
            masks[b, h] = keep
            # GAPR: pooled recovery where the gain beats the pooling error
            dq = (qb - q_pool[:, None]).abs().mean(1)
            dk = (kb - k_pool[:, None]).abs().mean(1)
            worth = raw_vis.abs() > (dq @ k_pool.T).abs() + (q_pool @ dk.T).abs()
            counted = keep | ~worth  # kept, or dropped but not worth recovering: folded into R
            if n_text:
                counted = torch.cat([counted, torch.ones(n_v, 1, dtype=torch.bool)], dim=1)
                v_cols = torch.cat([v_pool, torch.zeros(1, dim, dtype=F64)])  # text column never recovered
            else:
                v_cols = v_pool
            r = (p_row * counted).sum(1)  # [n_v]
            recovered = (p_row * ~counted) @ v_cols  # [n_v, D]
            # block-sparse attention over the kept visual blocks and the valid text keys
            key_blocks = torch.cat([keep.repeat_interleave(block, dim=1),
                                    torch.ones(n_v, n_text, dtype=torch.bool)], dim=1) & keys_ok[None, :]
            allowed = key_blocks.repeat_interleave(block, dim=0)  # [n_visual, S]
            logits = (qs[:n_visual] @ ks.T * sc).masked_fill(~allowed, -math.inf)
            sparse = torch.softmax(logits, dim=1) @ vs
            out[b, h, :n_visual] = r.repeat_interleave(block)[:, None] * sparse + recovered.repeat_interleave(block, 0)
            if n_text:  # text queries: dense over every valid key
                logits = (qs[n_visual:] @ ks.T * sc).masked_fill(~keys_ok[None, :], -math.inf)
                out[b, h, n_visual:] = torch.softmax(logits, dim=1) @ vs
    return out, masks

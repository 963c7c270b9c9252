"""VMoBA core: chunk gating, threshold / top-k chunk selection and self + routed attention.

Tokens are expected **already in chunk order** (``x[..., perm, :]`` with ``perm`` from
``mmeff.video.vmoba_partition.partition_order``), as ``q, k, v`` of shape ``[B, H, S, D]``.

Algorithm (VMoBA, reference §4):

1. **Chunk keys**: ``k̄_c`` = float32 mean of the keys of chunk ``c``.
2. **Gates**: ``g[b, h, s, c] = q_s · k̄_c`` in float32, *unscaled* (no ``1/sqrt(d)``).
3. **Selection** (always containing the query's own chunk), the official rules:

   - ``mode="topk"``: ``+inf`` on the own chunk, then the ``topk`` largest gates per
     (head, query) (``threshold_type="query_head"``) or the ``topk * S`` largest gates jointly
     over all (query, chunk) pairs of a head (``"head_global"``).
   - ``mode="threshold"``, ``"query_head"``: min-max normalise each (head, query) row over
     chunks, ``ĝ = (g - min) / (max - min)`` (a range ``<= 1e-6`` divides by 1);
     ``T = Σĝ + 1e-6``; ``remain = max(τ - ĝ_self / T, 0)``; rank the chunks by ``ĝ``
     descending with the own chunk competing at 0 and keep the ranked entries up to and
     including the first whose cumulative share reaches ``remain`` (all when none does); add
     the own chunk. The first-ranked entry, the best other chunk, is therefore always kept.
   - ``mode="threshold"``, ``"head_global"``: the same, but normalisation, ``T``, the self
     share (summed over all queries' own chunks) and the ranking run jointly over all
     (query, chunk) pairs of a head, so some queries get many chunks and others only their own.

   ``τ >= 1`` keeps every chunk (the ``1e-6`` in ``T``; exactly at 1, float32 rounding may
   still leave out a chunk at the minimum, as in the official code).
4. **Dense fallback** (official): when no query of any head routes to a chunk other than its
   own (``topk = 1``, for example), the call is plain dense attention. ``budget_scope`` says
   over what this is decided, and over what ``head_global`` competes: ``"sample"`` (default,
   mmeff: each sample alone, so a batch gives the same outputs as its samples one by one) or
   ``"batch"`` (official: the varlen call packs the batch, so ``head_global`` normalises,
   ranks and budgets jointly over all samples and the fallback needs an empty batch).
5. **Attention** = softmax over the keys of the union of selected chunks, computed as in the
   paper by two parts merged through their log-sum-exps in float32: the own-chunk branch
   (block-diagonal attention inside each chunk) and the routed branch (the selected chunks
   other than the own one). ``split_self=False`` runs one call over the union instead.

Where mmeff differs from the official code on purpose, see ``docs/video-sparse-attention-variants.md``.

``vmoba_reference`` is the obviously-correct twin: an independent loop implementation of the
same selection, a dense boolean ``[B, H, S, S]`` key mask and a float64 masked softmax.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor

from mmeff.kernels._common import check_qkv
from mmeff.kernels.chunk_routed_attn import (
    chunk_routed_attention,
    key_chunk_index,
    use_triton,
)
from mmeff.kernels.chunk_routed_attn.key_major import chunk_routed_attention_key_major
from mmeff.kernels.chunk_routing import (
    route_chunks,
    route_threshold_rows,
    route_topk_rows,
    triton_routes,
)
from mmeff.kernels.chunk_routing.naive import EPS, minmax_normalise, ranked_prefix

from .vmoba_partition import chunk_starts

__all__ = [
    "BUDGET_SCOPES",
    "MODES",
    "THRESHOLD_TYPES",
    "apply_dense_fallback",
    "chunk_gates",
    "chunk_mean_keys",
    "merge_attention_parts",
    "select_chunks",
    "vmoba_attention",
    "vmoba_reference",
]

MODES = ("threshold", "topk")
THRESHOLD_TYPES = ("query_head", "head_global")
BUDGET_SCOPES = ("sample", "batch")


# ----------------------------------------------------------------------------- validation


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """The shared kernel checks (4-D, float, one dtype/device), plus VMoBA's own: self-attention
    (q, k, v of one shape, tokens in chunk order) with at least one token."""
    check_qkv(q, k, v)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            "VMoBA is self-attention: q, k and v must have the same shape [B, H, S, D] in chunk order, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] == 0:
        raise ValueError("q, k, v have no tokens (S == 0)")


def _check_selection_args(mode: str, threshold: float, topk: int, threshold_type: str,
                          budget_scope: str = "sample") -> None:
    if budget_scope not in BUDGET_SCOPES:
        raise ValueError(
            f"budget_scope must be one of {BUDGET_SCOPES} ('sample': each sample alone, batch == single; "
            f"'batch': the official packed batch), got {budget_scope!r}"
        )
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if threshold_type not in THRESHOLD_TYPES:
        extra = " (VMoBA's 'overall' and 'block' variants are not implemented)" if threshold_type in (
            "overall", "block") else ""
        raise ValueError(f"threshold_type must be one of {THRESHOLD_TYPES}, got {threshold_type!r}{extra}")
    if mode == "threshold":
        if isinstance(threshold, bool) or not isinstance(threshold, Real) or not math.isfinite(threshold) or threshold < 0:
            raise ValueError(
                f"threshold must be a finite number >= 0 (fraction of normalised cumulative gate "
                f"similarity, e.g. 0.25; > 1 selects every chunk), got {threshold!r}"
            )
    elif isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an int >= 1 (chunks per query, own chunk included), got {topk!r}")


def _chunk_layout(seq: int, chunk_ids: Tensor | None, chunk_size: int | None, device: torch.device) -> Tensor:
    """``chunk_start [n_chunks + 1]`` (int32, on ``device``) from exactly one of the two specs."""
    if (chunk_ids is None) == (chunk_size is None):
        raise ValueError(
            "pass exactly one of chunk_ids (a [S] tensor from partition_order) or chunk_size "
            "(an int: contiguous runs of that many tokens, the last one may be shorter)"
        )
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int (tokens per chunk), got {chunk_size!r}")
        bounds = list(range(0, seq, chunk_size)) + [seq]
        return torch.tensor(bounds, dtype=torch.int32, device=device)
    if not isinstance(chunk_ids, Tensor) or chunk_ids.dim() != 1 or chunk_ids.numel() != seq:
        got = tuple(chunk_ids.shape) if isinstance(chunk_ids, Tensor) else type(chunk_ids).__name__
        raise ValueError(f"chunk_ids must be a 1-D tensor with one chunk id per token (S={seq}), got {got}")
    return chunk_starts(chunk_ids.to(device))


# ----------------------------------------------------------------------------- gating


def chunk_mean_keys(k: Tensor, chunk_start: Tensor) -> Tensor:
    """Float32 mean key of every chunk: ``[B, H, n_chunks, D]`` (zeros for an empty chunk)."""
    n_chunks = chunk_start.numel() - 1
    kc = key_chunk_index(chunk_start, k.shape[2])
    sums = torch.zeros(*k.shape[:2], n_chunks, k.shape[3], dtype=torch.float32, device=k.device)
    sums.index_add_(2, kc, k.float())
    counts = (chunk_start[1:] - chunk_start[:-1]).clamp_min(1).to(torch.float32)
    return sums / counts[:, None]


def chunk_gates(q: Tensor, k: Tensor, chunk_start: Tensor) -> Tensor:
    """Unscaled float32 gate scores ``q_s · k̄_c``: ``[B, H, S, n_chunks]``."""
    return torch.matmul(q.float(), chunk_mean_keys(k, chunk_start).transpose(-1, -2))


# ----------------------------------------------------------------------------- selection


def select_chunks(
    gates: Tensor,
    query_chunk: Tensor,
    *,
    mode: str = "threshold",
    threshold: float = 0.25,
    topk: int = 3,
    threshold_type: str = "query_head",
    budget_scope: str = "sample",
) -> Tensor:
    """VMoBA chunk selection: bool ``[B, H, S, n_chunks]``, own chunk always included.

    ``gates`` is ``[B, H, S, n_chunks]`` (``chunk_gates``); ``query_chunk[s]`` is the chunk that
    holds query ``s``. ``budget_scope="batch"`` lets ``head_global`` compete over the whole
    batch (official); per-row rules do not depend on it. The dense fallback is not applied
    here (``apply_dense_fallback``). Heads are processed in groups of at most
    ``_GROUP_ELEMENTS`` gate entries, which bounds the temporaries (sorts, float64 copies)
    without a kernel launch per head.
    """
    _check_selection_args(mode, threshold, topk, threshold_type, budget_scope)
    bsz, heads, seq, n_chunks = gates.shape
    self_oh = F.one_hot(query_chunk.long(), n_chunks).bool()  # [S, C]
    out = torch.empty(gates.shape, dtype=torch.bool, device=gates.device)
    joint = budget_scope == "batch" and threshold_type == "head_global"
    samples = [slice(0, bsz)] if joint else [slice(b, b + 1) for b in range(bsz)]
    per_head = max(1, seq * n_chunks * (bsz if joint else 1))
    group = max(1, _GROUP_ELEMENTS // per_head)
    for sb in samples:
        for h0 in range(0, heads, group):
            g = gates[sb, h0:h0 + group].float().transpose(0, 1)  # [G, N, S, C]: N samples compete jointly
            sel = _select_group(g, self_oh, mode, threshold, topk, threshold_type)
            out[sb, h0:h0 + group] = sel.transpose(0, 1)
    return out


_GROUP_ELEMENTS = 1 << 27  # gate entries per selection group (512 MiB of float32)


def _select_group(g: Tensor, self_oh: Tensor, mode: str, threshold: float, topk: int, threshold_type: str) -> Tensor:
    """Selection for a group of heads ``g`` ``[G, N, S, C]`` whose ``N`` samples compete jointly."""
    n_heads, n_samples, seq, n_chunks = g.shape
    if threshold_type == "query_head":  # per-row rules, shared with the fused Triton router
        if mode == "topk":
            idx = route_topk_rows(g, self_oh, topk).long()
            return torch.zeros(g.shape, dtype=torch.bool, device=g.device).scatter_(-1, idx, True)
        return route_threshold_rows(g, self_oh, threshold)
    # head_global: one joint competition over all (sample, chunk, query) entries of a head, flattened in
    # the official packed order (chunk-major, then query) so that ties break as there
    own = self_oh.expand(n_samples, seq, n_chunks)
    if mode == "topk":
        boosted = g.masked_fill(own, float("inf")).transpose(-1, -2).reshape(n_heads, -1)
        budget = min(topk * n_samples * seq, boosted.shape[1])
        take = torch.zeros(boosted.shape, dtype=torch.bool, device=g.device)
        take.scatter_(-1, boosted.topk(budget, dim=-1).indices, True)
    else:  # in float64
        gn = minmax_normalise(g.double(), (1, 2, 3))
        total = gn.sum((1, 2, 3)) + EPS
        remain = (threshold - (gn * own).sum((1, 2, 3)) / total).clamp_min(0)
        competitors = gn.masked_fill(own, 0.0).transpose(-1, -2).reshape(n_heads, -1)
        take = ranked_prefix(competitors, total, remain)
    sel = take.view(n_heads, n_samples, n_chunks, seq).transpose(-1, -2)
    return sel | own


def apply_dense_fallback(sel: Tensor, query_chunk: Tensor, budget_scope: str = "sample") -> Tensor:
    """Official VMoBA's fallback: where nothing is routed beyond the own chunks, attend densely.

    ``sel`` is the bool selection ``[B, H, S, n_chunks]``. Every sample (``budget_scope="sample"``)
    or the whole batch (``"batch"``) whose selection has no chunk other than the queries' own,
    over all heads and queries, gets every chunk selected, which is dense attention. No host sync.
    """
    own = F.one_hot(query_chunk.long(), sel.shape[-1]).bool()
    routed = (sel & ~own).flatten(1).any(-1)  # [B]
    if budget_scope == "batch":
        routed = routed.any().expand_as(routed)
    return sel | ~routed[:, None, None, None]


# ----------------------------------------------------------------------------- attention


def merge_attention_parts(parts: list[tuple[Tensor, Tensor]], out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Merge partial softmax attentions ``[(out_i, lse_i), ...]`` over disjoint key sets.

    Float32 (float64 for float64 parts): ``lse = log Σ exp(lse_i)``,
    ``out = Σ exp(lse_i - lse) · out_i``. Parts with ``lse = -inf`` contribute nothing; a row
    with no key in any part gets ``out = 0`` and ``lse = -inf``.
    """
    if not parts:
        raise ValueError("merge_attention_parts needs at least one (out, lse) pair")
    acc = torch.float64 if parts[0][0].dtype == torch.float64 else torch.float32
    lses = torch.stack([lse.to(acc) for _, lse in parts])  # [P, B, H, S]
    lse = torch.logsumexp(lses, dim=0)
    lse_safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    out = torch.zeros(parts[0][0].shape, dtype=acc, device=parts[0][0].device)
    for (o, _), part_lse in zip(parts, lses):
        w = torch.exp(part_lse - lse_safe)  # 0 for an empty part (lse_i = -inf)
        out = out + w.unsqueeze(-1) * o.to(acc)
    return out.to(out_dtype or parts[0][0].dtype), lse.to(torch.float32)


def _stats(sel: Tensor, chunk_start: Tensor, seq: int) -> dict:
    lengths = (chunk_start[1:] - chunk_start[:-1]).to(torch.float32)
    keys = sel.to(torch.float32) @ lengths  # attended keys per (b, h, query)
    density = float(keys.mean() / seq)
    return {
        "n_chunks": int(chunk_start.numel() - 1),
        "mean_selected_chunks": float(sel.sum(-1).to(torch.float32).mean()),
        "density": density,
        "sparsity": 1.0 - density,
    }


def _stats_from_indices(idx: Tensor, chunk_start: Tensor, seq: int) -> dict:
    lengths = (chunk_start[1:] - chunk_start[:-1]).to(torch.float32)
    used = idx >= 0
    keys = torch.where(used, lengths[idx.clamp_min(0).long()], torch.zeros((), device=idx.device)).sum(-1)
    density = float(keys.mean() / seq)
    return {
        "n_chunks": int(chunk_start.numel() - 1),
        "mean_selected_chunks": float(used.sum(-1).to(torch.float32).mean()),
        "density": density,
        "sparsity": 1.0 - density,
    }


KERNEL_LAYOUTS = ("auto", "query_major", "key_major")


def vmoba_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    chunk_ids: Tensor | None = None,
    chunk_size: int | None = None,
    mode: str = "threshold",
    threshold: float = 0.25,
    topk: int = 3,
    threshold_type: str = "query_head",
    budget_scope: str = "sample",
    scale: float | None = None,
    return_stats: bool = False,
    split_self: bool = True,
    layout: str = "auto",
) -> Tensor | tuple[Tensor, dict]:
    """VMoBA attention on tokens in chunk order; ``q, k, v`` are ``[B, H, S, D]``.

    Chunks come from ``chunk_ids`` (``[S]``, non-decreasing and gap-free, e.g. from
    ``partition_order``) or ``chunk_size`` (contiguous runs; the last may be shorter).
    Returns ``out`` (``[B, H, S, D]``, dtype of ``q``), or ``(out, stats)`` with
    ``return_stats=True``: ``n_chunks``, ``mean_selected_chunks`` (per query and head, own
    chunk included), ``density`` (mean fraction of keys attended) and ``sparsity = 1 - density``.

    Where the Triton kernels run (CUDA, or ``MMEFF_FORCE_TRITON=1``) and the selection is per
    (head, query) (``threshold_type="query_head"``), routing runs fused (``route_chunks``:
    no ``[B, H, S, n_chunks]`` gates, no sort). ``layout`` picks the attention kernel there:
    ``"key_major"`` (top-k only: tiles of queries that chose one chunk, so only needed keys
    are read), ``"query_major"`` (query tiles over the union of their rows' chunks) or
    ``"auto"`` (key-major for top-k, query-major for threshold). Every path computes the same
    softmax over the same keys; ``split_self`` only matters for the query-major and torch paths.

    ``budget_scope`` (``"sample"`` or the official ``"batch"``) is the scope of the
    ``head_global`` competition and of the dense fallback (see the module docstring).
    """
    _check_qkv(q, k, v)
    _check_selection_args(mode, threshold, topk, threshold_type, budget_scope)
    if layout not in KERNEL_LAYOUTS:
        raise ValueError(f"layout must be one of {KERNEL_LAYOUTS}, got {layout!r}")
    if layout == "key_major" and mode != "topk":
        raise ValueError("layout='key_major' needs mode='topk' (threshold routing selects too many chunks per query)")
    seq = q.shape[2]
    chunk_start = _chunk_layout(seq, chunk_ids, chunk_size, q.device)
    n_chunks = chunk_start.numel() - 1
    query_chunk = key_chunk_index(chunk_start, seq)

    if mode == "topk" and min(topk, n_chunks) == 1:  # only own chunks are routed anywhere: dense fallback
        sel = torch.ones(*q.shape[:3], n_chunks, dtype=torch.bool, device=q.device)
        out, _ = chunk_routed_attention(q, k, v, chunk_start, sel, scale=scale)
        return (out, _stats(sel, chunk_start, seq)) if return_stats else out
    fused = threshold_type == "query_head" and use_triton(q) and triton_routes(q, n_chunks)
    if fused:
        routes = route_chunks(
            q, chunk_mean_keys(k, chunk_start), query_chunk, mode=mode, topk=topk, threshold=threshold
        )
        if mode == "topk" and layout != "query_major":
            out, _ = chunk_routed_attention_key_major(q, k, v, chunk_start, routes, scale=scale)
            return (out, _stats_from_indices(routes, chunk_start, seq)) if return_stats else out
        if mode == "topk":
            mask = torch.zeros(*q.shape[:3], n_chunks, dtype=torch.bool, device=q.device)
            routes = mask.scatter_(-1, routes.long(), True)
        sel = routes
    else:
        gates = chunk_gates(q, k, chunk_start)
        sel = select_chunks(gates, query_chunk, mode=mode, threshold=threshold, topk=topk,
                            threshold_type=threshold_type, budget_scope=budget_scope)
        del gates
    if mode == "threshold":  # top-k with min(topk, n_chunks) >= 2 always routes something
        sel = apply_dense_fallback(sel, query_chunk, budget_scope)

    if split_self:
        own = F.one_hot(query_chunk, n_chunks).bool().expand_as(sel).contiguous()
        o_self, lse_self = chunk_routed_attention(q, k, v, chunk_start, own, scale=scale)
        o_routed, lse_routed = chunk_routed_attention(q, k, v, chunk_start, sel & ~own, scale=scale)
        out, _ = merge_attention_parts([(o_self, lse_self), (o_routed, lse_routed)])
    else:
        out, _ = chunk_routed_attention(q, k, v, chunk_start, sel, scale=scale)
    if return_stats:
        return out, _stats(sel, chunk_start, seq)
    return out


# ----------------------------------------------------------------------------- reference twin


_EPS = 1e-6  # the official guard, written out again for the loop twin


def _reference_ranked_take(entries: list, remain: float, total: float) -> list:
    """``entries`` = ``(value, key)`` in index order; the official cumulative-share prefix of
    the ranking by value (descending, ties in index order): up to and including the first
    entry whose cumulative share reaches ``remain``, at least one entry."""
    ranked = sorted(entries, key=lambda e: -e[0])  # Python's sort is stable: ties keep index order
    taken, cum = [], 0.0
    for value, key in ranked:
        taken.append(key)
        cum += value
        if cum / total >= remain:
            break
    return taken


def _reference_norm(values: list) -> list:
    lo, hi = min(values), max(values)
    denom = hi - lo if hi - lo > _EPS else 1.0
    return [(x - lo) / denom for x in values]


def _reference_selection(
    gates: list, bounds: list[int], mode: str, threshold: float, topk: int, threshold_type: str,
    budget_scope: str = "sample",
) -> list:
    """Selection by explicit Python loops (float64): nested lists ``[B][H][S]`` of chunk sets
    (the dense fallback is not applied here)."""
    n_chunks = len(bounds) - 1
    own = [c for c in range(n_chunks) for _ in range(bounds[c], bounds[c + 1])]
    bsz, heads, seq = len(gates), len(gates[0]), len(own)
    result = [[[{own[s]} for s in range(seq)] for _ in range(heads)] for _ in range(bsz)]
    for h in range(heads):
        if threshold_type == "query_head":
            for b in range(bsz):
                for s in range(seq):
                    row = gates[b][h][s]
                    if mode == "topk":
                        others = sorted((c for c in range(n_chunks) if c != own[s]), key=lambda c: -row[c])
                        result[b][h][s].update(others[: min(topk, n_chunks) - 1])
                        continue
                    norm = _reference_norm(row)
                    total = sum(norm) + _EPS
                    remain = max(threshold - norm[own[s]] / total, 0.0)
                    entries = [(0.0 if c == own[s] else norm[c], c) for c in range(n_chunks)]
                    result[b][h][s].update(_reference_ranked_take(entries, remain, total))
            continue
        # head_global: all (sample, chunk, query) entries of the head compete together, listed
        # chunk-major as in the official packed layout; one group per sample or one for the batch
        groups = [list(range(bsz))] if budget_scope == "batch" else [[b] for b in range(bsz)]
        for members in groups:
            keys = [(b, s, c) for b in members for c in range(n_chunks) for s in range(seq)]
            if mode == "topk":
                boosted = [(float("inf") if c == own[s] else gates[b][h][s][c], (b, s, c)) for b, s, c in keys]
                budget = min(topk * len(members) * seq, len(keys))
                chosen = [key for _, key in sorted(boosted, key=lambda e: -e[0])[:budget]]
            else:
                norm = _reference_norm([gates[b][h][s][c] for b, s, c in keys])
                total = sum(norm) + _EPS
                own_mass = sum(x for x, (b, s, c) in zip(norm, keys) if c == own[s])
                remain = max(threshold - own_mass / total, 0.0)
                entries = [(0.0 if c == own[s] else x, (b, s, c)) for x, (b, s, c) in zip(norm, keys)]
                chosen = _reference_ranked_take(entries, remain, total)
            for b, s, c in chosen:
                result[b][h][s].add(c)
    return result


def vmoba_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    chunk_ids: Tensor | None = None,
    chunk_size: int | None = None,
    mode: str = "threshold",
    threshold: float = 0.25,
    topk: int = 3,
    threshold_type: str = "query_head",
    budget_scope: str = "sample",
    scale: float | None = None,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, dict]:
    """Slow, obviously-correct VMoBA (tests and tiny inputs only): same contract as
    ``vmoba_attention``. Selection by Python loops, a dense ``[B, H, S, S]`` key mask, float64
    masked softmax. Stats also carry ``selected`` (the bool ``[B, H, S, n_chunks]`` selection,
    after the dense fallback)."""
    _check_qkv(q, k, v)
    _check_selection_args(mode, threshold, topk, threshold_type, budget_scope)
    bsz, heads, seq, dim = q.shape
    bounds = _chunk_layout(seq, chunk_ids, chunk_size, q.device).tolist()
    n_chunks = len(bounds) - 1

    kbar = torch.stack([k[:, :, bounds[c] : bounds[c + 1]].float().mean(dim=2) for c in range(n_chunks)], dim=2)
    gates = torch.einsum("bhsd,bhcd->bhsc", q.float(), kbar)  # unscaled, float32
    chosen = _reference_selection(gates.double().tolist(), bounds, mode, threshold, topk, threshold_type,
                                  budget_scope)
    # dense fallback: a sample (or, with budget_scope="batch", the batch) routing nothing beyond own chunks
    routed = [any(len(chosen[b][h][s]) > 1 for h in range(heads) for s in range(seq)) for b in range(bsz)]
    if budget_scope == "batch":
        routed = [any(routed)] * bsz
    for b in range(bsz):
        if not routed[b]:
            chosen[b] = [[set(range(n_chunks)) for _ in range(seq)] for _ in range(heads)]

    selected = torch.zeros(bsz, heads, seq, n_chunks, dtype=torch.bool)
    key_mask = torch.zeros(bsz, heads, seq, seq, dtype=torch.bool)
    for b in range(bsz):
        for h in range(heads):
            for s in range(seq):
                for c in chosen[b][h][s]:
                    selected[b, h, s, c] = True
                    key_mask[b, h, s, bounds[c] : bounds[c + 1]] = True
    key_mask = key_mask.to(q.device)
    sc = 1.0 / math.sqrt(dim) if scale is None else scale
    logits = (q.double() @ k.double().transpose(-1, -2)) * sc
    probs = torch.softmax(logits.masked_fill(~key_mask, float("-inf")), dim=-1)
    out = (probs @ v.double()).to(q.dtype)
    if return_stats:
        stats = _stats(selected, torch.tensor(bounds), seq)
        stats["selected"] = selected
        return out, stats
    return out

"""Which sequence positions survive pruning, and how masks and tensors follow.

Samples in a batch may keep different numbers of tokens. The pruned batch is padded back to the
longest kept length with *filler* slots placed on the left (like left padding): fillers are never
attended to as keys and only attend to themselves (so no row is fully masked and no NaN appears).
"""
from __future__ import annotations

import dataclasses

import torch

from ..core.errors import IncompatibleFeatureError


@dataclasses.dataclass
class KeepPlan:
    """Kept positions of a batch after pruning.

    index:  [B, L'] original positions of the kept slots (fillers point at position 0)
    filler: [B, L'] True for filler slots
    length: original sequence length L
    dropped: [B] number of visual tokens dropped per sample
    fillers_present: whether any filler slot exists, known on the host (None: read ``filler`` once)
    """

    index: torch.Tensor
    filler: torch.Tensor
    length: int
    dropped: torch.Tensor
    fillers_present: bool | None = None

    @property
    def new_length(self) -> int:
        return int(self.index.shape[1])

    @property
    def has_fillers(self) -> bool:
        """Host-side flag: asked by every layer at every decode step, so it must never sync with the GPU."""
        if self.fillers_present is None:
            self.fillers_present = bool(self.filler.any())
        return self.fillers_present

    @property
    def is_identity(self) -> bool:
        return self.new_length == self.length and not self.has_fillers


def build_plan(keep_positions: list[torch.Tensor], length: int, dropped: list[int]) -> KeepPlan:
    """Stack per-sample sorted kept positions into a left-filled [B, L'] plan."""
    device = keep_positions[0].device
    new_len = max(int(k.numel()) for k in keep_positions)
    bsz = len(keep_positions)
    index = torch.zeros(bsz, new_len, dtype=torch.long, device=device)
    filler = torch.ones(bsz, new_len, dtype=torch.bool, device=device)
    for b, keep in enumerate(keep_positions):
        n = int(keep.numel())
        index[b, new_len - n:] = keep
        filler[b, new_len - n:] = False
    any_filler = any(int(k.numel()) < new_len for k in keep_positions)
    return KeepPlan(index, filler, length, torch.tensor(dropped, dtype=torch.long, device=device), any_filler)


def extend_plan(plan: KeepPlan, length: int) -> KeepPlan:
    """The prompt's plan over a forward of ``length >= plan.length`` tokens: every token after the prompt is kept.

    This is how a forward that continues a pruned prompt (``use_cache=False`` steps, assisted-decoding drafts)
    reuses the prompt's decision instead of making a new one.
    """
    if length == plan.length:
        return plan
    if length < plan.length:
        raise IncompatibleFeatureError(
            f"mmeff: a forward of {length} tokens cannot continue a pruned prompt of {plan.length} tokens; "
            "start again from the full prompt"
        )
    bsz = plan.index.shape[0]
    tail = torch.arange(plan.length, length, device=plan.index.device).expand(bsz, -1)
    return KeepPlan(torch.cat([plan.index, tail], 1), torch.cat([plan.filler, plan.filler.new_zeros(bsz, tail.shape[1])], 1),
                    length, plan.dropped, plan.fillers_present)


def gather_seq(x: torch.Tensor, plan: KeepPlan, dim: int = 1) -> torch.Tensor:
    """Gather a per-token tensor along its sequence dim (batch must be dim 0 or broadcastable)."""
    if x.shape[0] != plan.index.shape[0]:
        x = x.expand(plan.index.shape[0], *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[dim] = plan.index.shape
    idx = plan.index.view(shape).expand(*[x.shape[i] if i not in (0, dim) else shape[i] for i in range(x.dim())])
    return torch.gather(x, dim, idx)


def gather_positions(pos: torch.Tensor, plan: KeepPlan) -> torch.Tensor:
    """Gather position ids shaped [B, L] or [A, B, L] (M-RoPE axes first)."""
    if pos.dim() == 2:
        return gather_seq(pos, plan, dim=1)
    expanded = pos.expand(pos.shape[0], plan.index.shape[0], pos.shape[-1])
    idx = plan.index.unsqueeze(0).expand(pos.shape[0], -1, -1)
    return torch.gather(expanded, 2, idx)


def _blocked(mask: torch.Tensor) -> float | bool:
    return False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min


def _allowed(mask: torch.Tensor) -> float | bool:
    return True if mask.dtype == torch.bool else 0.0


def empty_mask(bsz: int, q: int, kv: int, *, causal_offset: int | torch.Tensor, as_bool: bool, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """A [B, 1, q, kv] mask where query i sees keys <= causal_offset + i (bool or additive float)."""
    rows = torch.arange(q, device=device).view(q, 1) + causal_offset
    cols = torch.arange(kv, device=device).view(1, kv)
    ok = (cols <= rows).view(1, 1, q, kv).expand(bsz, 1, q, kv)
    if as_bool:
        return ok.clone()
    out = torch.zeros(bsz, 1, q, kv, dtype=dtype, device=device)
    return out.masked_fill(~ok, torch.finfo(dtype).min)


def slot_columns(plan: KeepPlan, kv_slots: int, width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Original mask column of each of the ``kv_slots`` cache slots of a pruned layer, and which slots have none.

    Slot ``j < L'`` holds kept prompt token ``index[j]``; later slots hold the tokens after the prompt in order
    (column ``L + j - L'``). A static cache has more slots than tokens: those columns lie past the mask's
    ``width``; they are clamped (for the gather) and returned as ``beyond`` (to be blocked). Shapes are static.
    """
    bsz = plan.index.shape[0]
    tail = torch.arange(plan.length, plan.length + kv_slots - plan.new_length, device=plan.index.device)
    cols = torch.cat([plan.index, tail.expand(bsz, -1)], dim=1)
    if plan.length + kv_slots - plan.new_length <= width:
        return cols, None
    beyond = cols >= width
    return cols.clamp_max(width - 1), beyond


def _slot_fillers(plan: KeepPlan, kv_slots: int) -> torch.Tensor:
    bsz = plan.index.shape[0]
    return torch.cat([plan.filler, plan.filler.new_zeros(bsz, kv_slots - plan.new_length)], dim=1)


def _gather_columns(mask: torch.Tensor, plan: KeepPlan, kv_slots: int) -> torch.Tensor:
    """Columns of a 4-D mask ``[B, h, q, W]`` mapped onto a pruned layer's ``kv_slots`` cache slots."""
    bsz = plan.index.shape[0]
    cols, beyond = slot_columns(plan, kv_slots, mask.shape[-1])
    idx = cols.view(bsz, 1, 1, kv_slots).expand(bsz, mask.shape[1], mask.shape[2], kv_slots)
    out = torch.gather(mask, 3, idx)
    if beyond is not None:
        out = out.masked_fill(beyond[:, None, None, :], _blocked(out))
    return out


def prefill_mask(mask: torch.Tensor | None, plan: KeepPlan, *, as_bool: bool, dtype: torch.dtype,
                 kv_slots: int | None = None) -> torch.Tensor | None:
    """The 4-D mask for the pruned prefill sequence: rows and columns gathered, fillers isolated.

    ``kv_slots`` is the key length the layer's attention sees (``L'`` for a dynamic cache or no cache,
    ``max_cache_len`` for a static cache).
    """
    if mask is None and not plan.has_fillers:
        return None  # pure causal stays pure causal: kept order is the original order
    bsz, new_len = plan.index.shape
    kv_slots = new_len if kv_slots is None else kv_slots
    if mask is None:
        mask = empty_mask(bsz, new_len, kv_slots, causal_offset=0, as_bool=as_bool, dtype=dtype,
                          device=plan.index.device)
    else:
        mask = mask.expand(bsz, *mask.shape[1:])
        heads = mask.shape[1]
        rows = plan.index.view(bsz, 1, new_len, 1).expand(bsz, heads, new_len, mask.shape[-1])
        mask = _gather_columns(torch.gather(mask, 2, rows), plan, kv_slots)
    return _isolate_fillers(mask, plan.filler, _slot_fillers(plan, kv_slots), plan.has_fillers)


def _isolate_fillers(mask: torch.Tensor, filler_rows: torch.Tensor | None, filler_cols: torch.Tensor,
                     present: bool) -> torch.Tensor:
    """Block filler key columns; filler query rows see only themselves (``present``: a host flag, no sync)."""
    if not present:
        return mask
    mask = mask.clone()
    blocked, allowed = _blocked(mask), _allowed(mask)
    mask.masked_fill_(filler_cols[:, None, None, :], blocked)
    if filler_rows is not None:
        q, kv = mask.shape[-2], mask.shape[-1]
        eye = torch.eye(q, kv, dtype=torch.bool, device=mask.device)
        diag = filler_rows[:, None, :, None] & eye[None, None]
        mask.masked_fill_(diag, allowed)
    return mask


def decode_column_map(plan: KeepPlan, kv_full: int) -> torch.Tensor:
    """Original kv column of every slot of a pruned layer's cache: kept prefix, then all later tokens."""
    bsz = plan.index.shape[0]
    tail = torch.arange(plan.length, kv_full, device=plan.index.device).expand(bsz, -1)
    return torch.cat([plan.index, tail], dim=1)


def decode_mask(mask: torch.Tensor | None, plan: KeepPlan, *, q_len: int, kv_slots: int,
                causal_offset: int | torch.Tensor, as_bool: bool, dtype: torch.dtype,
                static_slots: bool = False) -> torch.Tensor | None:
    """Mask for ``q_len`` new tokens attending to a pruned layer's ``kv_slots`` cache slots (new ones included).

    ``causal_offset`` is the number of slots filled before this forward (a 0-d tensor for a static cache, so
    nothing is read on the host); ``static_slots`` says the cache has a fixed number of slots, so the mask
    is as wide as the cache rather than as the sequence.
    """
    bsz = plan.index.shape[0]
    if mask is None:
        if not plan.has_fillers and q_len == 1:
            return None
        mask = empty_mask(bsz, q_len, kv_slots, causal_offset=causal_offset, as_bool=as_bool, dtype=dtype,
                          device=plan.index.device)
    else:
        kv_full = plan.length + kv_slots - plan.new_length
        if not static_slots and mask.shape[-1] != kv_full:
            raise IncompatibleFeatureError(
                f"mmeff: decode mask has {mask.shape[-1]} columns, expected {kv_full}; "
                "the cache was not produced under this pruning handle (call generate() again from the prompt)"
            )
        mask = _gather_columns(mask.expand(bsz, *mask.shape[1:]), plan, kv_slots)
    return _isolate_fillers(mask, None, _slot_fillers(plan, kv_slots), plan.has_fillers)


def remap_2d_mask(mask2d: torch.Tensor, plan: KeepPlan) -> torch.Tensor:
    """A [B, L + t] padding mask mapped onto the pruned sequence [B, L' + t] (fillers are 0)."""
    cols = decode_column_map(plan, mask2d.shape[1])
    out = torch.gather(mask2d, 1, cols)
    n_tail = cols.shape[1] - plan.new_length
    filler = torch.cat([plan.filler, plan.filler.new_zeros(plan.filler.shape[0], n_tail)], dim=1)
    return out.masked_fill(filler, 0)


# ---------------------------------------------------------------------------------------------- chains of cuts
@dataclasses.dataclass
class Cut:
    """One in-LLM cut of a chain: from LLM layer ``layer`` on, the sequence is ``plan``.

    plan:  kept slots in the coordinates of the LLM's *input* sequence (masks, RoPE tables and positions are
           gathered from the LLM-level tensors with it, at every layer of the stage and at decode)
    local: the same slots as indices into the *previous* stage's sequence (the hidden states entering
           ``layer`` are gathered with it); for the first cut without a pre-LLM stage it is ``plan`` itself
    """

    layer: int
    plan: KeepPlan
    local: KeepPlan
    replace: list[tuple[int, torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)
    # (sample, slots, hidden values): merged tokens whose hidden state entering ``layer`` is replaced

    def extended(self, llm_length: int, prev_length: int) -> "Cut":
        """This cut over a forward longer than the prompt (continuation tokens are kept at every stage)."""
        plan = extend_plan(self.plan, llm_length)
        local = plan if self.local is self.plan else extend_plan(self.local, prev_length)
        return Cut(self.layer, plan, local, self.replace)


def compose(prev: KeepPlan | None, local: KeepPlan) -> KeepPlan:
    """The plan of a stage whose slots are ``local`` indices into the previous stage ``prev`` (None: identity).

    Fillers point at position 0 (as in :func:`build_plan`); dropped counts add up.
    """
    if prev is None:
        return local
    index = torch.gather(prev.index, 1, local.index).masked_fill(local.filler, 0)
    return KeepPlan(index, local.filler, prev.length, prev.dropped + local.dropped, local.fillers_present)

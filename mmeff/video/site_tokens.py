"""Move the video tokens of one attention call into a method's order and back.

DiT attention is intercepted after RoPE, so permuting q, k and v together (and un-permuting the
output) is exact: no RoPE table needs to follow. Text tokens, when present, are placed last.
"""
from __future__ import annotations

import dataclasses

import torch

from ..hosts.dit_context import AttnContext


@dataclasses.dataclass
class Reordered:
    """q/k/v as ``[video tokens in method order, text]`` plus what is needed to restore the layout."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    n_video: int
    n_text: int
    inverse: torch.Tensor
    ctx: AttnContext

    def restore(self, out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Put an output in method order back into the model's own sequence layout."""
        result = torch.empty_like(like)
        s0, s1 = self.ctx.image
        result[:, :, s0:s1] = out[:, :, :self.n_video].index_select(2, self.inverse)
        if self.n_text:
            t0, t1 = self.ctx.text
            result[:, :, t0:t1] = out[:, :, self.n_video:]
        return result


def video_grid_ok(ctx: AttnContext) -> bool:
    """True when this call's image span is exactly the latent grid (else the method runs dense)."""
    t, h, w = ctx.grid
    s0, s1 = ctx.image
    return t * h * w == s1 - s0 == ctx.n_image


def reorder(ctx: AttnContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, order: torch.Tensor) -> Reordered:
    """Gather the video tokens in ``order`` (flat row-major grid indices), then append the text tokens."""
    order = order.to(q.device)
    s0, s1 = ctx.image
    parts = []
    for x in (q, k, v):
        video = x[:, :, s0:s1].index_select(2, order)
        if ctx.text is not None and ctx.text[1] > ctx.text[0]:
            video = torch.cat([video, x[:, :, ctx.text[0]:ctx.text[1]]], dim=2)
        parts.append(video)
    n_text = 0 if ctx.text is None else ctx.text[1] - ctx.text[0]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return Reordered(*parts, n_video=s1 - s0, n_text=n_text, inverse=inverse, ctx=ctx)


def text_valid_lengths(ctx: AttnContext, attn_mask: torch.Tensor | None, batch: int) -> torch.Tensor | None | bool:
    """Read a key-padding mask as per-sample valid text lengths.

    Returns None when there is no mask, a [B] tensor when the mask only hides a tail of the text
    tokens (HunyuanVideo's ``[B, 1, 1, S]`` bool mask), and False when it is anything else (the
    caller then runs dense attention).
    """
    if attn_mask is None:
        return None
    if attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1 or ctx.text is None:
        return False
    keys = attn_mask[:, 0, 0] if attn_mask.dtype == torch.bool else attn_mask[:, 0, 0] > torch.finfo(attn_mask.dtype).min / 2
    keys = keys.expand(batch, -1)
    s0, s1 = ctx.image
    t0, t1 = ctx.text
    if not bool(keys[:, s0:s1].all()):
        return False
    text = keys[:, t0:t1].long()
    lengths = text.sum(1)
    prefix = torch.arange(t1 - t0, device=keys.device)[None] < lengths[:, None]
    if not torch.equal(text.bool(), prefix):
        return False
    return lengths

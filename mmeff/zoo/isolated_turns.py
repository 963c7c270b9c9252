"""Train on many questions per image without letting the turns see each other.

A zoo training sequence packs all questions about one scene behind one image. In an
ordinary multi-turn chat a later turn can read the earlier answers: the caption names the
shapes, a colour question says "the red circle", so "Is there a circle?" is answerable from
the text alone. The first retrained tiny-qwen2-vl learned exactly that shortcut (answer
"yes" only when the shape was mentioned before) and then said "no" to 93% of single-question
existence probes at evaluation time.

Here every turn is a *segment* that attends only to the shared prefix (BOS, ``<|user|>``,
the image) and to itself, and whose positions restart right after the prefix. Each segment
therefore computes exactly what the single-question chat used at inference computes, and
the image is encoded once for all of them. The segment layout comes from
:meth:`mmeff.zoo.train_vlm.Batcher.batch` as ``segment_ids`` (0 = prefix, k >= 1 = turn k,
-1 = padding).
"""
from __future__ import annotations

from typing import Any

import torch


def isolation_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``(batch, 1, L, L)`` mask, True where a query may attend to a key: causal,
    within its own segment or to the prefix. Padding queries attend to the first token only
    (so no row is empty) and no query attends to padding."""
    if segment_ids.ndim != 2:
        raise ValueError(f"segment_ids must be (batch, length), got shape {tuple(segment_ids.shape)}")
    n = segment_ids.shape[1]
    q = segment_ids[:, :, None]
    k = segment_ids[:, None, :]
    causal = torch.ones(n, n, dtype=torch.bool, device=segment_ids.device).tril()
    pad_rows = q < 0
    allowed = causal & ~pad_rows & (k >= 0) & ((k == 0) | (k == q))
    allowed[:, :, 0] |= pad_rows.squeeze(-1)
    return allowed[:, None]


def restart_positions(positions: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Rewrite ``positions`` (``(batch, L)`` or ``(axes, batch, L)``) so that every segment
    starts at the position the first segment starts at, as if it followed the prefix alone.

    Tokens after the image have equal positions on every M-RoPE axis, so the same shift
    applies to all axes."""
    squeeze = positions.ndim == 2
    pos = positions[None] if squeeze else positions.clone()
    out = pos.clone()
    for b in range(segment_ids.shape[0]):
        seg = segment_ids[b]
        first = int((seg == 1).nonzero()[0]) if bool((seg == 1).any()) else None
        if first is None:
            continue
        base = pos[:, b, first]
        for k in seg.unique().tolist():
            if k <= 0:
                continue
            idx = (seg == k).nonzero().squeeze(-1)
            offset = torch.arange(idx.numel(), device=pos.device)
            out[:, b, idx] = base[:, None] + offset[None]
    return out[0] if squeeze else out


def isolate_turns(model: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model inputs with ``segment_ids`` turned into a 4-D isolation mask and restarted
    position ids, for a LLaVA or Qwen2-VL zoo model."""
    inputs = dict(inputs)
    seg = inputs.pop("segment_ids")
    flat = inputs["attention_mask"]
    if "image_grid_thw" in inputs:  # Qwen2-VL: M-RoPE positions of the image, then text
        positions, _ = model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=flat,
        )
    else:
        positions = torch.arange(seg.shape[1], device=seg.device).expand(seg.shape[0], -1)
    inputs["position_ids"] = restart_positions(positions, seg)
    inputs["attention_mask"] = isolation_mask(seg)
    return inputs

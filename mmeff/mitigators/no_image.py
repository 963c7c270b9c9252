"""The no-image branch of a prompt: the same conversation with the image placeholders removed, run through
the language model alone (no ``pixel_values``, no grid: for Qwen the positions are then plain 1-D).

Image *placeholder* tokens are removed; a template's own markers around them (Qwen's ``<|vision_start|>``
and ``<|vision_end|>``) stay, so the text is exactly the prompt minus the image. Rows are re-padded on the
left, so every row's last real token is the last column.
"""
from __future__ import annotations

import torch


def strip_image_tokens(ids: torch.Tensor, mask: torch.Tensor | None, image_token_id: int,
                       pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(ids, mask)`` of each prompt row without its padding and image placeholders."""
    rows = []
    for b in range(ids.shape[0]):
        row = ids[b] if mask is None else ids[b][mask[b].bool()]
        rows.append(row[row != image_token_id])
    length = max(int(r.numel()) for r in rows)
    out = ids.new_full((ids.shape[0], length), pad_id)
    out_mask = torch.zeros(ids.shape[0], length, dtype=torch.long, device=ids.device)
    for b, r in enumerate(rows):
        out[b, length - r.numel():] = r
        out_mask[b, length - r.numel():] = 1
    return out, out_mask


@torch.no_grad()
def run_text_only(model: torch.nn.Module, language_model: torch.nn.Module, ids: torch.Tensor,
                  mask: torch.Tensor) -> None:
    """Run the language model on text-only ids (hooks on its layers observe it); the output is discarded."""
    embeds = model.get_input_embeddings()(ids)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)

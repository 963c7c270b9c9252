"""Vision-aware Head Divergence (VHR, ACL 2025) and its per-layer head selection, batched over samples.

For one layer: ``with_img`` and ``no_img`` are the per-head attention outputs (the ``o_proj`` input split
into heads) at the position that predicts the next token, ``[B, H, d]``.

- ``VHD_h = ||with_img_h - no_img_h||_2`` (Euclidean, as in the paper; ``squared=True`` for the third-party
  Qwen2.5-VL variant);
- outlier zeroing (Eq. 6): ``VHD_h = 0`` where both ``VHD_h > mean + std`` and ``TA_h > mean(TA) + std(TA)``
  with ``TA_h = ||no_img_h||^2`` (population std over the layer's heads);
- selection (Eq. 7): heads with ``VHD_h > median(VHD)`` (the median of an even count is the mean of the two
  middle values, as numpy's).
"""
from __future__ import annotations

import torch


def head_divergence(with_img: torch.Tensor, no_img: torch.Tensor, *, squared: bool = False) -> torch.Tensor:
    """[B, H] VHD of each head."""
    d = (with_img.float() - no_img.float()).pow(2).sum(-1)
    return d if squared else d.sqrt()


def zero_outliers(vhd: torch.Tensor, no_img: torch.Tensor) -> torch.Tensor:
    """VHD with the "negatively vision-sensitive" heads (high VHD *and* high text-only norm) set to 0."""
    ta = no_img.float().pow(2).sum(-1)
    hi_vhd = vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, unbiased=False, keepdim=True)
    hi_ta = ta > ta.mean(-1, keepdim=True) + ta.std(-1, unbiased=False, keepdim=True)
    return vhd.masked_fill(hi_vhd & hi_ta, 0.0)


def select_heads(with_img: torch.Tensor, no_img: torch.Tensor, *, outliers: bool = True,
                 squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[B, H]`` bool mask of the heads to reinforce, ``[B, H]`` VHD after outlier zeroing)."""
    vhd = head_divergence(with_img, no_img, squared=squared)
    if outliers:
        vhd = zero_outliers(vhd, no_img)
    median = vhd.quantile(0.5, dim=-1, keepdim=True)
    return vhd > median, vhd

"""Block-index layout for block-sparse attention.

Representation (shared by the naive and Triton paths)
-----------------------------------------------------
For every (batch b, head h, query block i) the attended key blocks are given by

* ``kv_block_count[b, h, i]`` (int32): how many key blocks row i attends, ``c``;
* ``kv_block_idx[b, h, i, :c]`` (int32): their indices in ``[0, n_kblk)``, unique.
  Entries from position ``c`` on are ignored; helpers here fill them with ``-1``.

``kv_block_idx`` has shape ``[B, H, n_qblk, max_k]``. ``max_k`` only needs to cover the longest
row. The kernel loops over exactly ``kv_block_count`` entries, so a row of length ``c`` costs
``c`` key blocks whatever ``max_k`` is. Helpers here emit indices in ascending order, but the
attention result does not depend on the order.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "check_block_indices",
    "full_block_indices",
    "indices_to_mask",
    "mask_to_indices",
    "num_blocks",
]


def num_blocks(length: int, block: int) -> int:
    """Number of blocks of size ``block`` that cover ``length`` tokens (the last may be ragged)."""
    if block <= 0:
        raise ValueError(f"block size must be positive, got {block}")
    return (int(length) + block - 1) // block


def mask_to_indices(block_mask: Tensor, max_k: int | None = None) -> tuple[Tensor, Tensor]:
    """Compact a boolean block mask ``[B, H, n_qblk, n_kblk]`` into ``(kv_block_idx, kv_block_count)``.

    Indices are ascending and padded with ``-1``. ``max_k=None`` uses the longest row, which reads
    one number back from the device (a sync); pass ``max_k`` (e.g. ``n_kblk``) to avoid that.
    """
    if block_mask.dim() != 4:
        raise ValueError(
            f"block_mask must be [B, H, n_qblk, n_kblk], got shape {tuple(block_mask.shape)}"
        )
    mask = block_mask.to(torch.bool)
    n_k = mask.shape[-1]
    count = mask.sum(dim=-1, dtype=torch.int32)
    if max_k is None:
        max_k = int(count.max().item()) if count.numel() > 0 else 0
    elif max_k < 0 or max_k > n_k:
        raise ValueError(f"max_k must be in [0, n_kblk={n_k}], got {max_k}")
    else:
        # Only validate when cheap to do so on CPU; on GPU trust the caller to avoid a sync.
        if not mask.is_cuda and count.numel() > 0 and int(count.max()) > max_k:
            raise ValueError(
                f"max_k={max_k} is smaller than the longest row ({int(count.max())} blocks); "
                "pass max_k=None or a larger value"
            )
    # A stable sort of "not kept" puts the kept columns first, in ascending column order.
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :max_k]
    pos = torch.arange(max_k, device=mask.device)
    valid = pos < count.unsqueeze(-1)
    idx = torch.where(valid, order, torch.full_like(order, -1)).to(torch.int32).contiguous()
    return idx, count


def indices_to_mask(kv_block_idx: Tensor, kv_block_count: Tensor, n_kblk: int) -> Tensor:
    """Expand ``(kv_block_idx, kv_block_count)`` back into a boolean mask ``[B, H, n_qblk, n_kblk]``."""
    check_block_indices(kv_block_idx, kv_block_count, n_kblk=n_kblk)
    max_k = kv_block_idx.shape[-1]
    pos = torch.arange(max_k, device=kv_block_idx.device)
    valid = pos < kv_block_count.unsqueeze(-1).to(torch.int64)
    # Invalid entries go to a spare column n_kblk that is dropped afterwards.
    cols = torch.where(valid, kv_block_idx.to(torch.int64), torch.full_like(kv_block_idx, n_kblk, dtype=torch.int64))
    out = torch.zeros(*kv_block_idx.shape[:-1], n_kblk + 1, dtype=torch.bool, device=kv_block_idx.device)
    out.scatter_(-1, cols, True)
    return out[..., :n_kblk]


def full_block_indices(
    batch: int, heads: int, n_qblk: int, n_kblk: int, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Indices that list every key block for every query block (dense attention)."""
    idx = torch.arange(n_kblk, device=device, dtype=torch.int32).expand(batch, heads, n_qblk, n_kblk)
    count = torch.full((batch, heads, n_qblk), n_kblk, device=device, dtype=torch.int32)
    return idx.contiguous(), count


def check_block_indices(
    kv_block_idx: Tensor,
    kv_block_count: Tensor,
    *,
    n_kblk: int | None = None,
    batch: int | None = None,
    heads: int | None = None,
    n_qblk: int | None = None,
    check_values: bool = True,
) -> None:
    """Raise ``ValueError`` if the index pair is malformed.

    Shapes and dtypes are always checked. With ``check_values`` the entries are checked too
    (counts in ``[0, max_k]``, listed indices in ``[0, n_kblk)`` and unique); that reads the
    tensors back, so the Triton path skips it.
    """
    if kv_block_idx.dim() != 4:
        raise ValueError(
            "kv_block_idx must be [B, H, n_qblk, max_k] (int32, padded with -1); "
            f"got shape {tuple(kv_block_idx.shape)}. Build it with mask_to_indices(block_mask)."
        )
    if kv_block_count.shape != kv_block_idx.shape[:-1]:
        raise ValueError(
            f"kv_block_count must be [B, H, n_qblk] = {tuple(kv_block_idx.shape[:-1])} to match "
            f"kv_block_idx, got {tuple(kv_block_count.shape)}"
        )
    for name, t in (("kv_block_idx", kv_block_idx), ("kv_block_count", kv_block_count)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an integer tensor (int32), got {t.dtype}")
    expected = {"B": batch, "H": heads, "n_qblk": n_qblk}
    for (name, want), got in zip(expected.items(), kv_block_idx.shape[:3]):
        if want is not None and want != got:
            raise ValueError(
                f"kv_block_idx has {name}={got} but the inputs need {name}={want}; "
                "indices must be [B, H, ceil(Sq / block_m), max_k]"
            )
    if not check_values:
        return
    max_k = kv_block_idx.shape[-1]
    if bool(((kv_block_count < 0) | (kv_block_count > max_k)).any()):
        raise ValueError(f"kv_block_count entries must lie in [0, max_k={max_k}]")
    if kv_block_idx.numel() == 0:
        return
    valid = torch.arange(max_k, device=kv_block_idx.device) < kv_block_count.unsqueeze(-1)
    listed = kv_block_idx.to(torch.int64)
    upper = n_kblk if n_kblk is not None else torch.iinfo(torch.int64).max
    if bool((valid & ((listed < 0) | (listed >= upper))).any()):
        raise ValueError(f"listed key-block indices must lie in [0, n_kblk={n_kblk})")
    # Uniqueness: sort the valid entries (invalid ones pushed to distinct sentinels) and compare neighbours.
    sentinel = -1 - torch.arange(max_k, device=listed.device)
    keyed = torch.where(valid, listed, sentinel).sort(dim=-1).values
    if max_k > 1 and bool((keyed[..., 1:] == keyed[..., :-1]).any()):
        raise ValueError("kv_block_idx lists a key block twice in one row; indices must be unique")

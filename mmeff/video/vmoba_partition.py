"""VMoBA token partitions: 1-D (temporal), 2-D (spatial) and 3-D (spatio-temporal) chunks.

A video DiT's latent grid is ``(T, H, W)`` after patchify, and its native token order is
t-major, then h, then w (token ``t*H*W + h*W + w``). VMoBA cuts that sequence into *chunks*
(MoBA's blocks); the chunk shape changes from layer to layer:

- **1-D** (``chunk = c_t``, an int): no permutation; one chunk is ``c_t`` whole frames, i.e. a
  contiguous run of ``c_t*H*W`` tokens. ``T`` need not be divisible by ``c_t``: the last chunk
  then holds the remaining frames (a ragged chunk, as in VMoBA's own 1-D layers).
- **2-D** (``chunk = (c_h, c_w)``): each chunk is one ``c_h x c_w`` spatial tile across *all*
  ``T`` frames (``T*c_h*c_w`` tokens). Needs ``H % c_h == 0`` and ``W % c_w == 0``.
- **3-D** (``chunk = (c_t, c_h, c_w)``): each chunk is a ``c_t x c_h x c_w`` cube. Needs all
  three divisibilities.

``partition_order`` returns ``perm`` with ``x_chunked = x[..., perm, :]`` (tokens of chunk 0
first, then chunk 1, ...), ``chunk_ids`` (the chunk of every position of the *permuted*
sequence; non-decreasing) and the number of chunks. ``inverse_permutation(perm)`` undoes it.
Chunks are numbered t-major, then h, then w over the chunk grid.

``layer_kind``/``layer_chunk`` implement FastVideo's layer schedule: with
``m = layer_idx - first_full_layer`` and ``L = temporal_layers + spatial_layers + st_layers``,
layer ``m`` is temporal if ``m % L < temporal_layers``, spatial if ``< temporal + spatial``,
spatio-temporal otherwise; layers before ``first_full_layer`` stay dense. With the default
one layer of each kind the pattern over depth is 1D, 2D, 3D, 1D, 2D, 3D, ...
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

__all__ = [
    "Chunk",
    "chunk_kind",
    "chunk_starts",
    "inverse_permutation",
    "layer_chunk",
    "layer_kind",
    "partition_order",
]

#: ``int`` (1-D: frames per chunk), ``(c_h, c_w)`` (2-D) or ``(c_t, c_h, c_w)`` (3-D).
Chunk = int | Sequence[int]

_KIND_BY_LEN = {1: "temporal", 2: "spatial", 3: "spatiotemporal"}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def _normalise_chunk(chunk: Chunk) -> tuple[int, ...]:
    if isinstance(chunk, int) and not isinstance(chunk, bool):
        sizes: tuple = (chunk,)
    elif isinstance(chunk, (tuple, list)) and len(chunk) in (1, 2, 3):
        sizes = tuple(chunk)
    else:
        raise ValueError(
            "chunk must be an int c_t (1-D: whole frames per chunk), a pair (c_h, c_w) (2-D spatial "
            f"tiles) or a triple (c_t, c_h, c_w) (3-D cubes), got {chunk!r}"
        )
    for i, s in enumerate(sizes):
        if isinstance(s, bool) or not isinstance(s, int) or s <= 0:
            raise ValueError(f"chunk sizes must be positive ints, got {chunk!r} (entry {i} is {s!r})")
    return sizes


def chunk_kind(chunk: Chunk) -> str:
    """``"temporal"``, ``"spatial"`` or ``"spatiotemporal"`` for a chunk spec."""
    return _KIND_BY_LEN[len(_normalise_chunk(chunk))]


def _check_divisible(axis: str, size: int, sym: str, c: int) -> None:
    if size % c != 0:
        raise ValueError(
            f"latent {axis} {size} is not divisible by the chunk {axis} {sym}={c}; pick {sym} from the "
            f"divisors of {size}: {_divisors(size)} (or pad/crop the latent grid to a multiple of {c})"
        )


@lru_cache(maxsize=64)
def _partition_cached(t: int, h: int, w: int, sizes: tuple[int, ...]) -> tuple[Tensor, Tensor, int]:
    n = t * h * w
    idx = torch.arange(n, dtype=torch.long)
    if len(sizes) == 1:
        (c_t,) = sizes
        per_chunk = c_t * h * w
        return idx, idx // per_chunk, -(-t // c_t)
    if len(sizes) == 2:
        c_h, c_w = sizes
        _check_divisible("height", h, "c_h", c_h)
        _check_divisible("width", w, "c_w", c_w)
        grid = idx.view(t, h // c_h, c_h, w // c_w, c_w)
        perm = grid.permute(1, 3, 0, 2, 4).reshape(-1)  # (nch, ncw, t, ch, cw)
        per_chunk = t * c_h * c_w
    else:
        c_t, c_h, c_w = sizes
        _check_divisible("frames", t, "c_t", c_t)
        _check_divisible("height", h, "c_h", c_h)
        _check_divisible("width", w, "c_w", c_w)
        grid = idx.view(t // c_t, c_t, h // c_h, c_h, w // c_w, c_w)
        perm = grid.permute(0, 2, 4, 1, 3, 5).reshape(-1)  # (nct, nch, ncw, ct, ch, cw)
        per_chunk = c_t * c_h * c_w
    return perm.contiguous(), idx // per_chunk, n // per_chunk


def partition_order(t: int, h: int, w: int, chunk: Chunk) -> tuple[Tensor, Tensor, int]:
    """Chunk order of a ``(T, H, W)`` latent grid: ``(perm, chunk_ids, n_chunks)``.

    ``perm`` and ``chunk_ids`` are int64 CPU tensors of length ``T*H*W`` (fresh copies of a
    per-shape cache, so callers may move or modify them). ``x[..., perm, :]`` puts tokens in
    chunk order and ``chunk_ids[i]`` is the chunk of permuted position ``i``.
    Raises ``ValueError`` naming valid chunk sizes when a 2-D/3-D size does not divide the grid.
    """
    t = _positive_int(t, "T (latent frames)")
    h = _positive_int(h, "H (latent height)")
    w = _positive_int(w, "W (latent width)")
    perm, ids, n_chunks = _partition_cached(t, h, w, _normalise_chunk(chunk))
    return perm.clone(), ids.clone(), n_chunks


def inverse_permutation(perm: Tensor) -> Tensor:
    """``inv`` with ``x_chunked[..., inv, :] == x`` when ``x_chunked = x[..., perm, :]``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


def chunk_starts(chunk_ids: Tensor) -> Tensor:
    """Chunk boundaries ``[n_chunks + 1]`` (int32) from non-decreasing, gap-free ``chunk_ids``.

    Chunk ``c`` holds positions ``[starts[c], starts[c+1])``. Raises ``ValueError`` when the ids
    are not ``0, 0, ..., 1, 1, ..., n-1`` (tokens must already be in chunk order).
    """
    if not isinstance(chunk_ids, Tensor) or chunk_ids.dim() != 1 or chunk_ids.numel() == 0:
        raise ValueError("chunk_ids must be a non-empty 1-D integer tensor (one chunk id per token)")
    if chunk_ids.is_floating_point() or chunk_ids.dtype == torch.bool:
        raise ValueError(f"chunk_ids must be an integer tensor, got {chunk_ids.dtype}")
    ids = chunk_ids.long()
    step = ids[1:] - ids[:-1]
    if int(ids[0]) != 0 or bool(((step != 0) & (step != 1)).any()):
        raise ValueError(
            "chunk_ids must be non-decreasing, start at 0 and have no gaps (0,0,..,1,1,..): permute the "
            "tokens into chunk order first (x[..., perm, :] with perm from partition_order)"
        )
    counts = torch.bincount(ids)
    starts = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=ids.device)
    starts[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return starts


def layer_kind(
    layer_idx: int,
    first_full_layer: int = 0,
    temporal_layers: int = 1,
    spatial_layers: int = 1,
    st_layers: int = 1,
) -> str:
    """``"full"`` (dense), ``"temporal"``, ``"spatial"`` or ``"spatiotemporal"`` for one layer."""
    for name, val in (("layer_idx", layer_idx), ("first_full_layer", first_full_layer)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    counts = (temporal_layers, spatial_layers, st_layers)
    for name, val in zip(("temporal_layers", "spatial_layers", "st_layers"), counts):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    period = sum(counts)
    if period == 0:
        raise ValueError("temporal_layers + spatial_layers + st_layers must be > 0 (at least one sparse kind)")
    if layer_idx < first_full_layer:
        return "full"
    m = (layer_idx - first_full_layer) % period
    if m < temporal_layers:
        return "temporal"
    if m < temporal_layers + spatial_layers:
        return "spatial"
    return "spatiotemporal"


def layer_chunk(
    layer_idx: int,
    first_full_layer: int,
    temporal_layers: int,
    spatial_layers: int,
    st_layers: int,
    chunks: tuple[Chunk, Chunk, Chunk],
) -> Chunk | None:
    """The chunk spec of layer ``layer_idx``: ``chunks[0|1|2]`` for temporal/spatial/3-D layers,
    ``None`` for the dense layers before ``first_full_layer``.

    ``chunks = (temporal_chunk, spatial_chunk, st_chunk)``, e.g. ``(2, (3, 4), (4, 6, 4))``.
    """
    if not isinstance(chunks, (tuple, list)) or len(chunks) != 3:
        raise ValueError(
            "chunks must be (temporal_chunk, spatial_chunk, st_chunk), e.g. (2, (3, 4), (4, 6, 4)); "
            f"got {chunks!r}"
        )
    for want, c in zip(("temporal", "spatial", "spatiotemporal"), chunks):
        if chunk_kind(c) != want:
            raise ValueError(f"chunks must be (int, (c_h, c_w), (c_t, c_h, c_w)); the {want} entry is {c!r}")
    kind = layer_kind(layer_idx, first_full_layer, temporal_layers, spatial_layers, st_layers)
    if kind == "full":
        return None
    return chunks[("temporal", "spatial", "spatiotemporal").index(kind)]

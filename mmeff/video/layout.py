"""Token orders for a video latent grid ``(T, H, W)`` and block adjacency in that order.

Tokens of a latent grid are numbered row-major, ``flat = (t * H + h) * W + w`` (the layout
diffusers' video transformers produce after patchifying). An *order* is a ``LongTensor``
``order`` of length ``T*H*W`` where ``order[i]`` is the flat index of the ``i``-th token in the
new sequence, so ``x_perm = x[..., order, :]`` and ``x = x_perm[..., inverse_permutation(order), :]``.

``gilbert_order`` is a generalized Hilbert curve: it visits every cell of an arbitrary
(not necessarily power-of-two) box exactly once and consecutive cells are always 26-neighbours
(they differ by at most 1 along every axis). It is mmeff's own construction:

* the box is described in a local frame ``(a, b, c)`` with sizes ``(la, lb, lc)``; the path
  starts at local ``(0, 0, 0)`` and ends at ``(la - 1, 0, 0)`` (requires ``la >= 2`` unless the
  box is a single cell);
* if ``a`` dominates (``2*la > 3*max(lb, lc)``) the box is cut in two along ``a`` and both halves
  are walked in the same orientation;
* otherwise the 2-D Hilbert "U" step is applied in the plane spanned by ``a`` and the longer of
  ``b``/``c`` (call it ``m``), keeping the third axis whole: up ``m`` through the near half of
  ``a``, across the far half of ``m`` along the whole of ``a``, and back down ``m`` through the
  far half of ``a``. The sub-boxes are walked in rotated/reflected local frames, so every
  join between sub-boxes is a face step;
* boxes the split rules cannot handle (``la`` in {2, 3} with both other sides <= 2, at most 12
  cells) are solved by a small depth-first search, face steps only when parity allows it.

Cuts are placed at even offsets, so a box whose major side is even (or whose sides are all odd)
is walked with face steps only; e.g. 21x30x52 and 31x45x80 have no diagonal step. Other sizes
get a few diagonal (edge or corner) steps inside small sub-boxes, where parity forces them.

Every sub-box has an aspect ratio bounded by a small constant, so runs of consecutive tokens
(e.g. blocks of 128) are compact 3-D patches. Results are cached per grid size.
"""

from __future__ import annotations

import functools
import hashlib
import itertools

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "block_neighbours",
    "gilbert_block_neighbours",
    "gilbert_order",
    "inverse_permutation",
    "raster_order",
]

# Axis-permutation/reflection matrices are applied as ``parent = origin + local @ M`` where row k of
# ``M`` is the parent-frame direction of local axis k.


@functools.cache
def _small_path(la: int, lb: int, lc: int) -> np.ndarray:
    """Hamiltonian path of a tiny box from (0,0,0) to (la-1,0,0), 26-adjacent, face steps first."""
    cells = [(x, y, z) for x in range(la) for y in range(lb) for z in range(lc)]
    n = len(cells)
    start, goal = (0, 0, 0), (la - 1, 0, 0)
    steps = sorted(
        (d for d in itertools.product((-1, 0, 1), repeat=3) if d != (0, 0, 0)),
        key=lambda d: sum(abs(x) for x in d),  # face steps, then edge, then corner diagonals
    )
    cell_set = set(cells)

    def search(moves: list[tuple[int, int, int]]) -> list[tuple[int, int, int]] | None:
        path = [start]
        seen = {start}

        def dfs() -> bool:
            if len(path) == n:
                return path[-1] == goal
            x, y, z = path[-1]
            for dx, dy, dz in moves:
                nxt = (x + dx, y + dy, z + dz)
                if nxt in cell_set and nxt not in seen and (nxt != goal or len(path) == n - 1):
                    path.append(nxt)
                    seen.add(nxt)
                    if dfs():
                        return True
                    path.pop()
                    seen.discard(nxt)
            return False

        return path if dfs() else None

    # Face steps only when parity allows it, else any of the 26 (face steps tried first).
    path = search([d for d in steps if sum(map(abs, d)) == 1]) or search(steps)
    if path is None:  # pragma: no cover - only reachable through a bug in the split rules
        raise RuntimeError(f"no curve for box {(la, lb, lc)}")
    out = np.asarray(path, dtype=np.int64)
    out.setflags(write=False)
    return out


def _place(child: np.ndarray, origin: tuple[int, int, int], rows: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    return child @ np.asarray(rows, dtype=np.int64) + np.asarray(origin, dtype=np.int64)


@functools.lru_cache(maxsize=4096)
def _curve(la: int, lb: int, lc: int) -> np.ndarray:
    """Curve of the local box (la, lb, lc): int64 [la*lb*lc, 3] local coordinates (read-only)."""
    n = la * lb * lc
    if n == 1:
        out = np.zeros((1, 3), dtype=np.int64)
    elif la < 2:
        raise ValueError(f"internal: major side must be >= 2 for a box of {n} cells, got {(la, lb, lc)}")
    elif lb == 1 and lc == 1:
        out = np.zeros((la, 3), dtype=np.int64)
        out[:, 0] = np.arange(la)
    else:
        lm = max(lb, lc)
        if 2 * la > 3 * lm and la >= 4:
            # Cut along the major axis; both halves keep the frame.
            a1 = la // 2
            if a1 % 2 and la > 4:
                a1 += 1  # even: keeps sub-boxes face-walkable (see module notes)
            parts = [
                _curve(a1, lb, lc),
                _place(_curve(la - a1, lb, lc), (a1, 0, 0), ((1, 0, 0), (0, 1, 0), (0, 0, 1))),
            ]
            out = np.concatenate(parts)
        elif lm >= 3:
            # Hilbert "U" in the plane (a, m), the third axis o kept whole.
            m_is_b = lb >= lc
            lo = lc if m_is_b else lb
            m1 = max(2, lm // 2)
            if m1 % 2 and m1 + 1 < lm:
                m1 += 1  # even: keeps sub-boxes face-walkable (see module notes)
            a1 = la // 2
            em = (0, 1, 0) if m_is_b else (0, 0, 1)  # unit vector of m in this frame
            eo = (0, 0, 1) if m_is_b else (0, 1, 0)
            ea = (1, 0, 0)
            neg = lambda v: tuple(-x for x in v)
            add = lambda *vs: tuple(sum(x) for x in zip(*vs))
            scale = lambda v, s: tuple(s * x for x in v)

            def sizes(major: int, minor: int) -> tuple[int, int, int]:
                return (major, minor, lo)

            # 1) near half of a, lower part of m: walk up m, from (0,0,0) to m = m1-1.
            p1 = _place(_curve(*sizes(m1, a1)), (0, 0, 0), (em, ea, eo))
            # 2) whole a, upper part of m: walk along a, from m = m1 to the far end of a.
            p2 = _place(_curve(*sizes(la, lm - m1)), scale(em, m1), (ea, em, eo))
            # 3) far half of a, lower part of m: walk down m, ending at (la-1, 0, 0).
            origin3 = add(scale(ea, la - 1), scale(em, m1 - 1))
            p3 = _place(_curve(*sizes(m1, la - a1)), origin3, (neg(em), neg(ea), eo))
            out = np.concatenate([p1, p2, p3])
        else:
            out = _small_path(la, lb, lc)
    out.setflags(write=False)
    return out


def _check_grid(T: int, H: int, W: int) -> None:
    for name, v in (("T", T), ("H", H), ("W", W)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"grid size {name} must be a positive int, got {v!r}")


@functools.lru_cache(maxsize=64)
def _gilbert_np(T: int, H: int, W: int) -> np.ndarray:
    _check_grid(T, H, W)
    sizes = {"w": W, "h": H, "t": T}
    # Major axis: w (the longest side of typical video latents), else the longest one.
    axes = ["w", "h", "t"]
    if W < 2:
        axes.sort(key=lambda a: -sizes[a])
    la, lb, lc = (sizes[a] for a in axes)
    local = _curve(la, lb, lc)
    coords = {a: local[:, i] for i, a in enumerate(axes)}
    flat = (coords["t"] * H + coords["h"]) * W + coords["w"]
    flat = np.ascontiguousarray(flat, dtype=np.int64)
    flat.setflags(write=False)
    return flat


def gilbert_order(T: int, H: int, W: int, device: torch.device | str | None = None) -> Tensor:
    """Generalized 3-D Hilbert order of a ``(T, H, W)`` grid as an int64 tensor of flat indices.

    ``order[i]`` is the row-major flat index ``(t*H + h)*W + w`` of the ``i``-th cell on the
    curve. The curve starts at cell ``(0, 0, 0)``, walks ``w`` as its major axis (the longest
    axis if ``W == 1``) and every step moves to one of the 26 neighbours. Cached per size; the
    returned tensor is a fresh copy.
    """
    return torch.from_numpy(_gilbert_np(int(T), int(H), int(W)).copy()).to(device)


def raster_order(T: int, H: int, W: int, device: torch.device | str | None = None) -> Tensor:
    """The identity order (row-major ``t, h, w``), for comparisons."""
    _check_grid(T, H, W)
    return torch.arange(T * H * W, device=device)


def inverse_permutation(order: Tensor) -> Tensor:
    """``inv`` with ``inv[order[i]] = i``, so ``x_perm[..., inv, :]`` restores the original order."""
    if order.dim() != 1:
        raise ValueError(f"order must be a 1-D permutation, got shape {tuple(order.shape)}")
    order = order.to(torch.int64)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return inv


# The 13 "positive" offsets of the 26-neighbourhood (the other 13 are their negatives).
_HALF_OFFSETS = [
    d for d in itertools.product((-1, 0, 1), repeat=3) if d > (0, 0, 0)
]


def _neighbours_np(order: np.ndarray, T: int, H: int, W: int, block: int) -> np.ndarray:
    n = T * H * W
    if order.shape != (n,):
        raise ValueError(f"order must have T*H*W = {n} entries, got shape {order.shape}")
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    if not np.array_equal(np.sort(order), np.arange(n)):
        raise ValueError("order must be a permutation of range(T*H*W)")
    blk = (pos // block).reshape(T, H, W)  # block id of every grid cell
    n_blk = (n + block - 1) // block
    adj = np.zeros((n_blk, n_blk), dtype=bool)
    np.fill_diagonal(adj, True)
    for dt, dh, dw in _HALF_OFFSETS:
        src = blk[max(0, -dt): T - max(0, dt), max(0, -dh): H - max(0, dh), max(0, -dw): W - max(0, dw)]
        dst = blk[max(0, dt): T + min(0, dt), max(0, dh): H + min(0, dh), max(0, dw): W + min(0, dw)]
        s, d = src.ravel(), dst.ravel()
        diff = s != d
        adj[s[diff], d[diff]] = True
    adj |= adj.T
    return adj


_NEIGHBOUR_CACHE: dict[tuple, np.ndarray] = {}
_NEIGHBOUR_CACHE_MAX = 32


def block_neighbours(
    order: Tensor | None,
    T: int,
    H: int,
    W: int,
    block: int,
    device: torch.device | str | None = None,
) -> Tensor:
    """Physical adjacency of token blocks: bool ``[n_blk, n_blk]``, symmetric, true diagonal.

    Tokens are taken in ``order`` (``None`` = ``gilbert_order(T, H, W)``) and cut into blocks of
    ``block`` consecutive tokens (the last block may be ragged). Block ``i`` is adjacent to
    ``j`` when some token of ``i`` has one of its 26 grid neighbours in ``j``. Cached per
    ``(T, H, W, block)`` and the order's contents; returns a fresh tensor.
    """
    _check_grid(T, H, W)
    if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if order is None:
        order_np = _gilbert_np(int(T), int(H), int(W))
        key = (int(T), int(H), int(W), block, "gilbert")
    else:
        order_np = np.ascontiguousarray(order.detach().to("cpu", torch.int64).numpy())
        key = (int(T), int(H), int(W), block, hashlib.sha1(order_np.tobytes()).hexdigest())
    adj = _NEIGHBOUR_CACHE.get(key)
    if adj is None:
        adj = _neighbours_np(order_np, int(T), int(H), int(W), block)
        if len(_NEIGHBOUR_CACHE) >= _NEIGHBOUR_CACHE_MAX:
            _NEIGHBOUR_CACHE.pop(next(iter(_NEIGHBOUR_CACHE)))
        _NEIGHBOUR_CACHE[key] = adj
    return torch.from_numpy(adj.copy()).to(device)


def gilbert_block_neighbours(
    T: int, H: int, W: int, block: int, device: torch.device | str | None = None
) -> Tensor:
    """``block_neighbours`` for the gilbert order (cached per ``(T, H, W, block)``)."""
    return block_neighbours(None, T, H, W, block, device=device)

"""Projector sensitivity of ZOO-Prune: ``S_i = mean_j ||J(x_i) u_j||`` over m shared random directions.

Two estimators of the same quantity, both chunked over (token, direction) pairs so that at most
``chunk`` rows go through the projector at once:

- ``"fd"``: central finite differences ``(M(x + h u) - M(x - h u)) / 2h`` (the official form);
- ``"jvp"``: the exact Jacobian-vector product, the h -> 0 limit of the above.

The JVP has two implementations that agree to rounding (tested against each other):

- generic, for any callable: ``torch.func.jvp`` on each chunk of pairs. It redoes the primal pass per
  pair, and at LLaVA-1.5-7B size it counts 1.5x the FLOPs of the finite differences
  (``benchmarks/zooprune_cost.py``);
- structured, when the projector says it is ``second(act(first(pre(x))))`` with an elementwise ``act``
  (:class:`mmeff.hosts.projector_probe.RowProjector`, all four hosts): the primal and ``act'`` are computed
  once per token, and per pair only the tangent goes through ``first`` and ``second``. Without ``pre``
  (LLaVA) ``first``'s tangent ``W1 u_j`` is the same for every token, so a pair costs one ``second`` matmul.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def draw_directions(generator: torch.Generator, m: int, dim: int, kind: str = "unit") -> torch.Tensor:
    """``[m, dim]`` Gaussian directions, scaled to unit norm for ``kind="unit"`` (the released code)."""
    u = torch.randn(m, dim, generator=generator, dtype=torch.float32)
    if kind == "unit":
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    elif kind != "gaussian":
        raise ValueError(f"direction kind must be 'unit' or 'gaussian', got {kind!r}")
    return u


@torch.no_grad()
def projector_sensitivity(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    directions: torch.Tensor,
    *,
    step: float = 0.01,
    estimator: str = "jvp",
    chunk: int = 4096,
) -> torch.Tensor:
    """``[N]`` mean output-change norm of ``fn`` at each row of ``x`` ([N, d]) along each direction ([m, d])."""
    if estimator not in ("fd", "jvp"):
        raise ValueError(f"estimator must be 'fd' or 'jvp', got {estimator!r}")
    n, m = x.shape[0], directions.shape[0]
    u_all = directions.to(device=x.device, dtype=x.dtype)
    total = torch.zeros(n, dtype=torch.float64, device=x.device)
    pairs = n * m
    chunk = max(1, int(chunk))
    if estimator == "jvp" and getattr(fn, "first", None) is not None:
        return _structured_jvp(fn, x, u_all, chunk)
    for start in range(0, pairs, chunk):
        idx = torch.arange(start, min(start + chunk, pairs), device=x.device)
        tok, dirn = idx // m, idx % m
        xs, us = x[tok], u_all[dirn]
        if estimator == "fd":
            delta = (fn(xs + step * us) - fn(xs - step * us)) / (2 * step)
        else:
            _, delta = torch.func.jvp(fn, (xs,), (us,))
        total.index_add_(0, tok, delta.double().norm(dim=-1))
    return (total / m).to(x.dtype)


def _structured_jvp(proj: Any, x: torch.Tensor, u_all: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean ``||J(x_i) u_j||`` for ``proj = second(act(first(pre(x))))``: primal once per token, tangents per pair."""
    n, m = x.shape[0], u_all.shape[0]
    inner = x if proj.pre is None else proj.pre(x)
    hidden = proj.first(inner)
    slope = torch.func.jvp(proj.act, (hidden,), (torch.ones_like(hidden),))[1]  # act'(h): act is elementwise
    shared = u_all @ proj.first.weight.T if proj.pre is None else None           # [m, d_h], token-independent
    total = torch.zeros(n, dtype=torch.float64, device=x.device)
    for start in range(0, n * m, chunk):
        idx = torch.arange(start, min(start + chunk, n * m), device=x.device)
        tok, dirn = idx // m, idx % m
        if shared is not None:
            first_t = shared[dirn]
        else:
            pre_t = torch.func.jvp(proj.pre, (x[tok],), (u_all[dirn],))[1]
            first_t = pre_t @ proj.first.weight.T
        out_t = (slope[tok] * first_t) @ proj.second.weight.T
        total.index_add_(0, tok, out_t.double().norm(dim=-1))
    return (total / m).to(x.dtype)

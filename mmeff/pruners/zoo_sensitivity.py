"""Projector sensitivity of ZOO-Prune: ``S_i = mean_j ||J(x_i) u_j||`` over m shared random directions.

Two estimators of the same quantity, both chunked over (token, direction) pairs so that at most
``chunk`` rows go through the projector at once:

- ``"fd"``: central finite differences ``(M(x + h u) - M(x - h u)) / 2h`` (the official form);
- ``"jvp"``: the exact Jacobian-vector product (``torch.func.jvp``), the h -> 0 limit of the above, in
  one projector pass per pair instead of two.
"""
from __future__ import annotations

from collections.abc import Callable

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

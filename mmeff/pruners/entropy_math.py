"""Matrix entropy of a token's per-head query matrix (EntropyPrune), fast dual-Gram and direct forms."""
from __future__ import annotations

import math
from typing import Literal

import torch

Normalization = Literal["code", "trace"]


def _pool_head_dim(r: torch.Tensor, dim_scale: int) -> torch.Tensor:
    """Average-pool the head dimension down to ``dim_scale`` when it is a multiple of it (no-op otherwise)."""
    d = r.shape[-1]
    if d > dim_scale and d % dim_scale == 0:
        return r.reshape(*r.shape[:-1], dim_scale, d // dim_scale).mean(-1)
    return r


def _entropy_from_eigs(lam: torch.Tensor, n_heads: int, normalization: Normalization) -> torch.Tensor:
    lam = lam.clamp_min(1e-10)
    if normalization == "trace":
        lam = lam / lam.sum(-1, keepdim=True)
    return -(lam * lam.log()).sum(-1) / math.log(n_heads)


def token_matrix_entropy(r: torch.Tensor, normalization: Normalization = "code", dim_scale: int = 128) -> torch.Tensor:
    """Entropy per token from ``r`` [n, H, d] via the H x H dual Gram matrix (the 64x-cheaper form).

    Steps (EntropyPrune): centre each token's H x d matrix over the head axis, G = R R^T / H in float64,
    eigenvalues clamped at 1e-10, S = -sum(l log l) / log H. ``normalization="trace"`` divides the
    eigenvalues by their sum first (standard von Neumann entropy); ``"code"`` follows the released code.
    """
    n_heads = r.shape[1]
    r = _pool_head_dim(r.to(torch.float64), dim_scale)
    r = r - r.mean(dim=1, keepdim=True)
    gram = r @ r.transpose(1, 2) / n_heads
    return _entropy_from_eigs(torch.linalg.eigvalsh(gram), n_heads, normalization)


def token_matrix_entropy_direct(r: torch.Tensor, normalization: Normalization = "code", dim_scale: int = 128) -> torch.Tensor:
    """Slow twin: the same entropy from the d x d covariance R^T R / H (same non-zero spectrum)."""
    n_heads = r.shape[1]
    r = _pool_head_dim(r.to(torch.float64), dim_scale)
    r = r - r.mean(dim=1, keepdim=True)
    cov = r.transpose(1, 2) @ r / n_heads
    lam = torch.linalg.eigvalsh(cov)
    # The d x d form has (d - H) extra zero eigenvalues; drop the smallest ones so both see H values.
    lam = lam[..., -min(n_heads, lam.shape[-1]):]
    return _entropy_from_eigs(lam, n_heads, normalization)


def representation_entropy(x: torch.Tensor) -> float:
    """Normalised matrix entropy of a token set ``x`` [N, D] (for the Entropy-Collapse-Layer search).

    Uses the trace-normalised spectrum of the Gram matrix (N x N or D x D, whichever is smaller),
    divided by log(rank bound) so values lie in [0, 1].
    """
    x = x.to(torch.float64)
    x = x - x.mean(0, keepdim=True)
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    lam = torch.linalg.eigvalsh(gram).clamp_min(0)
    total = lam.sum()
    if total <= 0:
        return 0.0
    p = (lam / total).clamp_min(1e-12)
    return float(-(p * p.log()).sum() / math.log(min(x.shape)))

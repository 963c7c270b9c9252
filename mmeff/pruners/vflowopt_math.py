"""VFlowOpt's importance map (arXiv 2508.05211): context relevance from global tokens, plus patch entropy.

Importance of a token j of one image (or crop) = c_j + alpha_v * softmax(e)_j, where
- c is the head-averaged attention that the *global* tokens pay to j at one ViT layer. Global tokens are
  those receiving more than ``t`` times the mean received attention (sink / register-like tokens), plus any
  token the tower declares global by construction (CLIP's CLS);
- e is the Shannon entropy (bits) of the 256-level grey histogram of the token's pixels, computed on the
  *unnormalised* 8-bit pixels (the released code takes it on normalised pixels cast to uint8, which wraps
  around; we undo the processor's normalisation first).

Attention rows are computed in chunks from q and k (never an n x n map in memory at once).
"""
from __future__ import annotations

import torch

ROW_CHUNK = 256


def _attention_rows(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-averaged softmax attention of the query ``rows`` [r] over all keys: [r, n] (float32)."""
    logits = torch.einsum("hrd,hnd->hrn", q[:, rows].float(), k.float()) * scale
    return logits.softmax(-1).mean(0)


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean over queries of the head-averaged attention each token receives: [n] (rows in chunks)."""
    n = q.shape[1]
    total = torch.zeros(n, dtype=torch.float32, device=q.device)
    for start in range(0, n, ROW_CHUNK):
        rows = torch.arange(start, min(n, start + ROW_CHUNK), device=q.device)
        total += _attention_rows(q, k, rows, scale).sum(0)
    return total / n


def global_tokens(received: torch.Tensor, t: float, forced: tuple[int, ...] = ()) -> torch.Tensor:
    """Indices of the global tokens: received > t * mean(received), plus ``forced`` ones.

    When no token passes (a large ``t`` on a tower without CLS) the most-attended token is used, so the map
    stays defined (the released code would average an empty set and produce NaN).
    """
    chosen = received > t * received.mean()
    if forced:
        chosen[list(forced)] = True
    if not bool(chosen.any()):
        chosen[received.argmax()] = True
    return torch.nonzero(chosen).flatten()


def context_relevance(q: torch.Tensor, k: torch.Tensor, scale: float, t: float,
                      forced: tuple[int, ...] = ()) -> torch.Tensor:
    """c = mean over global tokens G of their head-averaged attention rows: [n], for one attention block.

    q, k: [H, n, d] post-RoPE queries / keys of the block (KV heads already repeated).
    """
    glob = global_tokens(received_attention(q, k, scale), t, forced)
    total = torch.zeros(q.shape[1], dtype=torch.float32, device=q.device)
    for start in range(0, glob.numel(), ROW_CHUNK):
        total += _attention_rows(q, k, glob[start:start + ROW_CHUNK], scale).sum(0)
    return total / glob.numel()


def grey_levels(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], channel_dim: int) -> torch.Tensor:
    """Undo the processor's normalisation and return integer grey levels 0..255 (channel mean of 8-bit values)."""
    shape = [1] * pixels.dim()
    shape[channel_dim] = -1
    m = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(shape)
    s = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(shape)
    eight_bit = (pixels.float() * s + m).mul(255.0).round().clamp(0, 255)
    return eight_bit.mean(channel_dim).round().long()


def histogram_entropy(levels: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of each row's 256-bin histogram: levels [T, P] ints in 0..255 -> [T]."""
    hist = torch.zeros(levels.shape[0], 256, dtype=torch.float32, device=levels.device)
    hist.scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float32))
    prob = hist / hist.sum(1, keepdim=True)
    return -(prob * torch.log2(prob.clamp_min(1e-30))).sum(1)


def combine(relevance: torch.Tensor, entropy: torch.Tensor, alpha_v: float) -> torch.Tensor:
    """Importance = c + alpha_v * softmax(e) over the tokens of one image or crop."""
    if alpha_v == 0.0:
        return relevance.float()
    return relevance.float() + alpha_v * entropy.float().softmax(-1)

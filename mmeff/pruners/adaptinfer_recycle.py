"""SparseVLM-style token recycling for AdaptInfer (off by default, as in the released code).

Of the tokens a cut drops, the best ``recycle_ratio`` by score are clustered with scikit-learn's k-means into
n/10 + 1 groups (n = how many are recycled); each group survives as one token: its mean hidden state, placed in
the slot (and RoPE position) of the group's best-scored member. SparseVLM inserts the merged tokens after the kept
visual tokens with re-indexed positions; mmeff keeps one plan with original positions, hence the member's slot.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .adaptinfer import AdaptInfer
    from .base import ScoreView


def recycle_select(cfg: "AdaptInfer", view: "ScoreView", keep_per_image: list[int]) -> torch.Tensor:
    from sklearn.cluster import KMeans

    scores = cfg.score(view).float()
    hidden = view.hidden_states().detach()
    kept, merged_slots, merged_values = [], [], []
    for (start, end), k in zip(view.spans, keep_per_image):
        n = end - start
        if k >= n:
            kept.append(torch.arange(start, end, device=scores.device))
            continue
        order = torch.argsort(scores[start:end], descending=True, stable=True) + start
        kept.append(order[:k])
        dropped = order[k:]
        n_rec = int(math.floor(dropped.numel() * cfg.recycle_ratio))
        if n_rec == 0:
            continue
        rec = dropped[:n_rec]                              # best-scored first
        n_clusters = min(n_rec, n_rec // 10 + 1)
        feats = hidden[rec.to(hidden.device)].float().cpu().numpy()
        labels = KMeans(n_clusters=n_clusters, n_init=3, random_state=cfg.seed).fit(feats).labels_
        labels = torch.as_tensor(labels, device=rec.device)
        for c in range(n_clusters):
            members = rec[labels == c]
            if members.numel() == 0:
                continue
            merged_slots.append(members[0])               # the group's best-scored member keeps its slot
            merged_values.append(hidden[members.to(hidden.device)].mean(0))
            kept.append(members[:1])
    out = torch.sort(torch.cat(kept)).values if kept else torch.zeros(0, dtype=torch.long)
    if merged_slots:
        view.replace_hidden(torch.stack(merged_slots), torch.stack(merged_values))
    return out

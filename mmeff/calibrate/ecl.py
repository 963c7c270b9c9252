"""Entropy Collapse Layer (ECL) search for EntropyPrune [recon of the paper's offline analysis].

For every LLM layer l we take the visual-token hidden states entering it, X_l [N, D], and compute
the trace-normalised matrix entropy of their Gram matrix, averaged over samples. The ECL is the
layer whose input shows the largest entropy drop, K = argmax_{l>=1} (H_{l-1} - H_l); EntropyPrune
prunes right before it, scoring with the queries of layer K-1.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm import tqdm

from ..pruners.entropy_math import representation_entropy
from . import record


@torch.no_grad()
def layer_entropies(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                    progress: bool = True) -> list[float]:
    """Mean matrix entropy of the visual tokens entering each LLM layer (index 0 = embeddings)."""
    image_id = int(model.config.image_token_id)
    n_layers = len(model.model.language_model.layers)
    sums = [0.0] * n_layers
    count = 0
    for batch in tqdm(list(batches), desc="ECL calibration", disable=not progress):
        out = model(**batch, output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states
        visual = batch["input_ids"] == image_id
        for b in range(visual.shape[0]):
            if not bool(visual[b].any()):
                continue
            for layer in range(n_layers):
                sums[layer] += representation_entropy(hidden[layer][b, visual[b]])
            count += 1
    if count == 0:
        raise ValueError("ECL calibration needs samples with images")
    return [s / count for s in sums]


def find_ecl(entropies: list[float]) -> int:
    """K = the layer (>= 1) whose input has lost the most entropy relative to the previous layer."""
    if len(entropies) < 2:
        raise ValueError("need entropies for at least two layers")
    drops = [entropies[i - 1] - entropies[i] for i in range(1, len(entropies))]
    return 1 + max(range(len(drops)), key=lambda i: drops[i])


def calibrate_entropyprune(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                           out_path: str | Path | None = None, *, model_name: str = "",
                           progress: bool = True) -> dict[str, Any]:
    """Run the ECL search and (optionally) write the JSON that ``EntropyPrune(calibration=...)`` loads."""

    batches = list(batches)
    ent = layer_entropies(model, batches, progress=progress)
    result = {
        "method": "entropyprune", "model": model_name or type(model).__name__, "ecl": find_ecl(ent),
        "layer_entropy": ent, "samples": sum(int(b["input_ids"].shape[0]) for b in batches),
        "versions": record.versions(),
    }
    return record.save(result, out_path)

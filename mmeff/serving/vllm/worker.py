"""vLLM CPU worker that lets the model runner rebuild M-RoPE positions for mmeff-pruned Qwen models.

vLLM's runner recomputes M-RoPE positions after the encoder (``recompute_mrope_positions``) only when
``is_multimodal_pruning_enabled`` is set. vLLM sets it for ``video_pruning_rate > 0`` only, and never in
its CPU runner. This worker sets it on its own runner instance, and only when the loaded model is an
mmeff pruning model. Choose it with ``--worker-cls mmeff.serving.vllm.worker.MmeffCPUWorker``.
"""
from __future__ import annotations

from typing import Any

from vllm.v1.worker.cpu_worker import CPUWorker


def enable_position_rebuild(runner: Any) -> bool:
    """Turn on the runner's position rebuild for an mmeff-pruned M-RoPE model; True when it did."""
    model = runner.get_model()
    if getattr(model, "mmeff_pruner", None) is None or not hasattr(model, "recompute_mrope_positions"):
        return False
    runner.is_multimodal_pruning_enabled = True
    model.mmeff_position_rebuild = True
    return True


class MmeffCPUWorker(CPUWorker):
    """vLLM's CPU worker, plus :func:`enable_position_rebuild` after the model is loaded."""

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        enable_position_rebuild(self.model_runner)

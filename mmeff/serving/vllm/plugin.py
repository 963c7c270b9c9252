"""vLLM general plugin: registers mmeff's pruning architectures in every vLLM process.

Declared in pyproject.toml under the entry-point group ``vllm.general_plugins``; vLLM calls
:func:`register` in its front end and in each engine/worker process. The model classes are registered
by import path, so nothing heavy is imported until a model is actually built.

Pruners of your own (classes registered with ``mmeff.core.registry.register_method``) reach every vLLM
process through ``MMEFF_VLLM_IMPORTS``: a comma-separated list of modules imported by :func:`register`.
"""
from __future__ import annotations

import importlib
import os

IMPORTS_ENV = "MMEFF_VLLM_IMPORTS"

ARCHITECTURES = {
    "MmeffLlavaForConditionalGeneration": "mmeff.serving.vllm.llava:MmeffLlavaForConditionalGeneration",
    "MmeffQwen2VLForConditionalGeneration": "mmeff.serving.vllm.qwen2_vl:MmeffQwen2VLForConditionalGeneration",
}


def register() -> None:
    """Make the ``Mmeff*`` architectures known to vLLM's ModelRegistry (idempotent); import user pruners."""
    from vllm import ModelRegistry

    for module in filter(None, (m.strip() for m in os.environ.get(IMPORTS_ENV, "").split(","))):
        importlib.import_module(module)

    for arch, path in ARCHITECTURES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, path)

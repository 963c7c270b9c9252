"""The vLLM plugin's spec checks import and run where vLLM is not installed (the main test environment)."""
from __future__ import annotations

import importlib.util

import pytest

from mmeff.core.errors import ConfigError


def test_spec_checks_need_no_vllm():
    from mmeff.serving.vllm import kept_per_image, parse_serving_spec

    assert kept_per_image(parse_serving_spec("random:budget=64,positions=reindex", "llava"), 576, 12) == 64
    with pytest.raises(ConfigError, match="prunes inside the LLM"):
        parse_serving_spec("fastv:budget=64", "llava")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="only meaningful without vLLM")
def test_model_modules_say_they_need_vllm():
    with pytest.raises(ModuleNotFoundError, match="vllm"):
        importlib.import_module("mmeff.serving.vllm.llava")

"""Shared fixtures for the shipped zoo models: one torch thread, offline loading."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module's model calls on one thread (much faster on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_offline(loader: Callable[[str], Any], name: str) -> Any:
    """Load a zoo model with the hub forced offline (the env var is only read at import time)."""
    import huggingface_hub.constants as hc

    old = hc.HF_HUB_OFFLINE
    hc.HF_HUB_OFFLINE = True
    try:
        return loader(name)
    finally:
        hc.HF_HUB_OFFLINE = old

"""``mmeff.apply``: join method configs with the host adapter of a model or pipeline."""
from __future__ import annotations

from typing import Any

from .core.config import MethodConfig
from .core.errors import AlreadyAppliedError, ConfigError
from .core.handle import Handle, active_handle, attach
from .core.registry import find_host, parse_method


def apply(obj: Any, *methods: "MethodConfig | str") -> Handle:
    """Apply methods to an unmodified model/pipeline; returns a :class:`Handle` that undoes them.

    ``methods`` are configs (``EntropyPrune(budget=64)``) or spec strings (``"entropyprune:budget=64"``).
    Nothing is changed if any check fails.
    """
    if not methods:
        raise ConfigError("mmeff.apply needs at least one method, e.g. mmeff.apply(model, 'fastv:budget=64')")
    configs = [parse_method(m) for m in methods]
    if active_handle(obj) is not None:
        raise AlreadyAppliedError(
            f"mmeff methods are already applied to this {type(obj).__name__} "
            f"({active_handle(obj)!r}); call handle.remove() first, or pass all methods to one mmeff.apply call"
        )
    adapter_cls = find_host(obj)
    adapter = adapter_cls(obj)
    handle = adapter.apply(configs)
    attach(obj, handle)
    return handle

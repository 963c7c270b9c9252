"""Per-instance, removable hooks: every change mmeff makes is recorded with its undo."""
from __future__ import annotations

from typing import Any, Callable

import torch


class HookSet:
    """Collects torch hook handles and undo callbacks; ``remove()`` undoes them in reverse order."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def pre_hook(self, module: torch.nn.Module, fn: Callable[..., Any], *, with_kwargs: bool = True) -> None:
        handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
        self._undo.append(handle.remove)

    def post_hook(self, module: torch.nn.Module, fn: Callable[..., Any], *, with_kwargs: bool = False) -> None:
        handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
        self._undo.append(handle.remove)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set an attribute on one instance, remembering how to restore it."""
        missing = object()
        old = obj.__dict__.get(name, missing) if hasattr(obj, "__dict__") else getattr(obj, name, missing)

        def undo() -> None:
            if old is missing:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass
            else:
                setattr(obj, name, old)

        setattr(obj, name, value)
        self._undo.append(undo)

    def on_remove(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def remove(self) -> None:
        errors = []
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:  # keep undoing the rest; report at the end
                errors.append(exc)
        if errors:
            raise RuntimeError(f"mmeff: {len(errors)} undo step(s) failed: {errors[0]!r}") from errors[0]

    def __len__(self) -> int:
        return len(self._undo)

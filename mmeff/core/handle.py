"""The Handle returned by ``mmeff.apply``: undo everything, report what was done."""
from __future__ import annotations

from typing import Any, Callable

from .config import MethodConfig
from .hooks import HookSet

_HANDLE_ATTR = "_mmeff_handle"


class Handle:
    """Owns every hook mmeff installed on one object.

    ``remove()`` restores the object exactly; the handle is also a context manager.
    ``report()`` returns a dict with what each method did (tokens per layer, heads, sparsity, time).
    """

    def __init__(self, target: Any, methods: list[MethodConfig], hooks: HookSet,
                 reporter: Callable[[], dict[str, Any]]) -> None:
        self.target = target
        self.methods = list(methods)
        self._hooks = hooks
        self._reporter = reporter
        self.active = True

    def remove(self) -> None:
        """Undo every change; safe to call more than once."""
        if not self.active:
            return
        self.active = False
        try:
            self._hooks.remove()
        finally:
            if getattr(self.target, _HANDLE_ATTR, None) is self:
                try:
                    delattr(self.target, _HANDLE_ATTR)
                except AttributeError:
                    pass

    def report(self) -> dict[str, Any]:
        rep = self._reporter()
        rep.setdefault("methods", [m.to_dict() for m in self.methods])
        return rep

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = ", ".join(m.spec() for m in self.methods)
        return f"<mmeff.Handle {names} on {type(self.target).__name__} active={self.active}>"


def active_handle(obj: Any) -> Handle | None:
    h = getattr(obj, _HANDLE_ATTR, None)
    return h if isinstance(h, Handle) and h.active else None


def attach(obj: Any, handle: Handle) -> None:
    """Mark ``obj`` as carrying an active handle (so a second ``apply`` fails clearly)."""
    setattr(obj, _HANDLE_ATTR, handle)

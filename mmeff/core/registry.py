"""Registries: method name -> config class, and host adapters found by what they accept."""
from __future__ import annotations

from typing import Any, Callable, Protocol

from .config import MethodConfig
from .errors import ConfigError, UnknownMethodError, UnsupportedModelError

_METHODS: dict[str, type[MethodConfig]] = {}
_HOSTS: list[type["HostAdapter"]] = []


class HostAdapter(Protocol):
    """What a host adapter provides (see :mod:`mmeff.hosts`)."""

    family: str

    @classmethod
    def matches(cls, obj: Any) -> bool: ...

    def apply(self, methods: list[MethodConfig]) -> Any: ...


def register_method(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: make a config reachable by its ``name`` in spec strings."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty `name`")
    _METHODS[cls.name.lower()] = cls
    return cls


def register_host(cls: type) -> type:
    """Class decorator: add a host adapter; adapters are tried in registration order."""
    _HOSTS.append(cls)
    return cls


def method_names() -> list[str]:
    _ensure_builtin()
    return sorted(_METHODS)


def get_method(name: str) -> type[MethodConfig]:
    _ensure_builtin()
    try:
        return _METHODS[name.lower()]
    except KeyError:
        raise UnknownMethodError(
            f"unknown mmeff method {name!r}; registered methods: {', '.join(sorted(_METHODS))}"
        ) from None


def parse_method(spec: "str | MethodConfig") -> MethodConfig:
    """Turn ``"entropyprune:budget=64,layer=2"`` (or a config) into a config instance."""
    if isinstance(spec, MethodConfig):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(f"a method must be a MethodConfig or a spec string, got {type(spec).__name__}")
    name, _, rest = spec.strip().partition(":")
    values: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise ConfigError(f"in {spec!r}: option {item!r} must look like key=value")
        values[key.strip()] = val.strip()
    return get_method(name).from_strings(values)


def find_host(obj: Any) -> type:
    """The adapter class for ``obj`` or an UnsupportedModelError listing what is supported."""
    _ensure_builtin()
    for host in _HOSTS:
        if host.matches(obj):
            return host
    supported = ", ".join(h.family for h in _HOSTS)
    raise UnsupportedModelError(
        f"mmeff has no adapter for {type(obj).__name__}; supported hosts: {supported}. "
        "Pass the model object itself (e.g. LlavaForConditionalGeneration, a diffusers pipeline or its transformer)."
    )


_loaded = False


def _ensure_builtin() -> None:
    """Import the built-in methods and hosts once so their decorators run."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    for mod in ("mmeff.pruners", "mmeff.mitigators", "mmeff.guidance", "mmeff.video", "mmeff.hosts"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:  # optional families may be absent in minimal installs
            if exc.name is None or not exc.name.startswith("mmeff"):
                raise


HookFn = Callable[..., Any]

"""Method configs: small frozen dataclasses that say *what* to change, validated on creation."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Union

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every mmeff method.

    Subclasses are frozen dataclasses; ``name`` is the registry key used in spec strings
    (``"entropyprune:budget=64"``) and ``kind`` tells host adapters which handler applies it.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for invalid values. Override in subclasses."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **dataclasses.asdict(self)}

    def spec(self) -> str:
        """The spec-string spelling of this config (only non-default fields)."""
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if v != default:
                if isinstance(v, (tuple, list)):
                    v = ";".join(str(x) for x in v)
                parts.append(f"{f.name}={v}")
        return self.name + (":" + ",".join(parts) if parts else "")

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> "MethodConfig":
        """Build from string values (spec strings, CLI, lmms-eval model args), coercing by field type."""
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in fields:
                raise ConfigError(
                    f"{cls.name}: unknown option {key!r}; valid options are {sorted(fields)}"
                )
            kwargs[key] = coerce(raw, hints[key], f"{cls.name}.{key}")
        return cls(**kwargs)


def require(cond: bool, message: str) -> None:
    """Raise ConfigError(message) unless cond holds."""
    if not cond:
        raise ConfigError(message)


def coerce(raw: str, tp: Any, where: str) -> Any:
    """Convert a string to the annotated type (int, float, bool, str, Optional, tuple[int, ...])."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw.strip().lower() in ("none", "null", ""):
            return None
        for a in args:
            try:
                return coerce(raw, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: cannot read {raw!r} as {tp}")
    if origin in (tuple, list):
        args = typing.get_args(tp)
        item = args[0] if args else str
        items = [s for s in raw.replace("|", ";").split(";") if s.strip() != ""]
        vals = [coerce(s.strip(), item, where) for s in items]
        return tuple(vals) if origin is tuple else vals
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        if raw not in choices:
            raise ConfigError(f"{where}: {raw!r} is not one of {choices}")
        return raw
    try:
        if tp is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
        if tp is str or tp is Any:
            return raw
    except ValueError as exc:
        raise ConfigError(f"{where}: cannot read {raw!r} as {getattr(tp, '__name__', tp)}") from exc
    raise ConfigError(f"{where}: options of type {tp} cannot be given as a string")

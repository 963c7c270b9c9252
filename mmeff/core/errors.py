"""mmeff exceptions: every user-facing failure names what to do about it."""
from __future__ import annotations


class MmeffError(Exception):
    """Base class for all mmeff errors."""


class ConfigError(MmeffError, ValueError):
    """A method config has an invalid value (the message says which and the allowed range)."""


class UnsupportedModelError(MmeffError, TypeError):
    """No host adapter knows this model or pipeline."""


class BudgetError(MmeffError, ValueError):
    """A token budget cannot be met for the visual tokens actually present."""


class MissingImageError(MmeffError, ValueError):
    """A method that needs visual tokens ran on a batch without an image."""


class AlreadyAppliedError(MmeffError, RuntimeError):
    """mmeff methods are already applied to this object."""


class UnknownMethodError(MmeffError, KeyError):
    """A method name in a spec string is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class IncompatibleFeatureError(MmeffError, RuntimeError):
    """A library feature in use conflicts with an applied method (the message names both and the way out)."""

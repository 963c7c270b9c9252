"""Model-agnostic plumbing: configs, registries, handles, hooks, timing (no model knowledge)."""
from .config import MethodConfig, require
from .errors import (AlreadyAppliedError, BudgetError, ConfigError, IncompatibleFeatureError, MissingImageError,
                     MmeffError, UnknownMethodError, UnsupportedModelError)
from .handle import Handle, active_handle
from .hooks import HookSet
from .registry import find_host, get_method, method_names, parse_method, register_host, register_method
from .timing import MethodTimer

__all__ = [
    "MethodConfig", "require", "MmeffError", "ConfigError", "UnsupportedModelError", "BudgetError",
    "MissingImageError", "AlreadyAppliedError", "UnknownMethodError", "IncompatibleFeatureError", "Handle",
    "active_handle", "HookSet",
    "find_host", "get_method", "method_names", "parse_method", "register_host", "register_method", "MethodTimer",
]

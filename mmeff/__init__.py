"""mmeff: make multimodal models cheaper and more faithful without retraining them.

``mmeff.apply(model_or_pipe, *methods)`` plugs published methods into unmodified Hugging Face
``transformers`` VLMs and ``diffusers`` pipelines and returns a handle that undoes them.
"""
from .api import apply
from .core import (AlreadyAppliedError, BudgetError, ConfigError, Handle, IncompatibleFeatureError, MissingImageError,
                   MmeffError, UnknownMethodError, UnsupportedModelError, get_method, method_names, parse_method)

__version__ = "0.1.0"

__all__ = [
    "apply", "Handle", "MmeffError", "ConfigError", "UnsupportedModelError", "BudgetError",
    "MissingImageError", "AlreadyAppliedError", "UnknownMethodError", "IncompatibleFeatureError", "get_method",
    "method_names", "parse_method", "__version__",
]

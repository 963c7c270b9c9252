"""Host adapters: one per model family; they know where things are, never which method runs."""
from . import dit, llava, qwen_vl  # noqa: F401  (registration)
from . import steering_hooks
from .vlm_base import VLMAdapter

steering_hooks.register()

__all__ = ["VLMAdapter"]

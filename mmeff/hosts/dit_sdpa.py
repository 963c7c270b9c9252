"""Per-instance attention-processor wrappers that route the core attention op to mmeff.

Why this mechanism: the model's own processor keeps doing everything model-specific (projections, QK-norm,
RoPE, text/image concatenation, output projections); only the attention op itself is replaced. The wrapper is
a dynamic subclass of the processor's class whose ``__call__`` keeps the original signature (diffusers filters
forward kwargs by ``inspect.signature(processor.__call__)``), runs the original ``__call__`` inside a
``TorchFunctionMode`` and hands every ``F.scaled_dot_product_attention`` call ([B, H, S, D]) to a callback.

- Legacy processors (SD3, PixArt, CogVideoX) call F.sdpa themselves.
- Dispatcher processors (FLUX, Wan, HunyuanVideo) call ``dispatch_attention_fn``; the wrapper pins *its own*
  copy to the native backend so the op reaches F.sdpa whatever backend the user picked, and the callback's
  dense fallback (:func:`dense_attention`) calls the user's original backend (flash, sage, ...) again, so
  methods that only post-process the output (SoftPAG) keep the fast kernel.
- A wrapped processor that finishes without any attention op reaching mmeff raises, instead of silently doing
  nothing (diffusers' own layer-skip PAG has that failure mode under non-SDPA backends).

The original processor object is never modified; :meth:`undo` puts the exact object back.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..core.errors import UnsupportedModelError

SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

# callback(call_index, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, dense) -> out
SDPACallback = Callable[..., torch.Tensor]


class _Intercept(TorchFunctionMode):
    """Sends F.scaled_dot_product_attention to ``callback``; everything else runs unchanged."""

    def __init__(self, callback: SDPACallback, dense: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.callback = callback
        self.dense = dense
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        for name, value in zip(SDPA_ARGS, args):
            kwargs[name] = value
        call = self.calls
        self.calls += 1
        return self.callback(call, kwargs.pop("query"), kwargs.pop("key"), kwargs.pop("value"),
                             kwargs.get("attn_mask"), float(kwargs.get("dropout_p", 0.0) or 0.0),
                             bool(kwargs.get("is_causal", False)), kwargs.get("scale"),
                             bool(kwargs.get("enable_gqa", False)), self.dense)


def _sdpa_dense(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    extra = {"enable_gqa": True} if enable_gqa else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale, **extra)


def _dispatch_dense(backend: Any) -> Callable[..., torch.Tensor]:
    """Dense attention on a non-native diffusers backend, in mmeff's [B, H, S, D] layout."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    def dense(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
                                    dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                                    backend=backend)
        return out.transpose(1, 2)
    return dense


def uses_dispatcher(processor: Any) -> bool:
    return hasattr(type(processor), "_attention_backend") or "_attention_backend" in getattr(processor, "__dict__", {})


def dense_attention(processor: Any) -> Callable[..., torch.Tensor]:
    """The dense attention the unwrapped ``processor`` would run (its own backend, resolved at call time)."""
    if not uses_dispatcher(processor):
        return _sdpa_dense
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _AttentionBackendRegistry,
    )

    backend = getattr(processor, "_attention_backend", None)
    if backend is None:
        backend = _AttentionBackendRegistry.get_active_backend()[0]
    if AttentionBackendName(backend) == AttentionBackendName.NATIVE:
        return _sdpa_dense
    return _dispatch_dense(backend)


_CLASSES: dict[type, type] = {}


def _wrapped_class(base: type) -> type:
    """A subclass of ``base`` whose ``__call__`` (same signature) runs inside the interception mode."""
    cls = _CLASSES.get(base)
    if cls is not None:
        return cls

    @functools.wraps(base.__call__)
    def __call__(self, attn, *args, **kwargs):
        mode = _Intercept(self._mmeff_callback, dense_attention(self._mmeff_inner))
        with mode:
            out = base.__call__(self, attn, *args, **kwargs)
        if mode.calls == 0:
            raise UnsupportedModelError(
                f"mmeff: the attention processor {base.__name__} of {self._mmeff_site} did not call "
                "scaled_dot_product_attention (nor diffusers' native attention backend), so its attention op "
                "cannot be replaced; restore the model's default processor (e.g. transformer.set_attn_processor"
                "(...)) or disable xformers before applying"
            )
        return out

    cls = type(f"Mmeff{base.__name__}", (base,), {"__call__": __call__, "__module__": __name__})
    _CLASSES[base] = cls
    return cls


def wrap_processor(inner: Any, site_name: str, callback: SDPACallback) -> Any:
    """A wrapper of ``inner`` (its state copied, never shared mutably) that routes attention to ``callback``."""
    if getattr(inner, "_mmeff_inner", None) is not None:
        raise UnsupportedModelError(f"{site_name}: its processor is already wrapped by mmeff")
    if getattr(inner, "_parallel_config", None) is not None:
        raise UnsupportedModelError(f"{site_name}: context parallelism is active; mmeff's DiT adapter needs the "
                                    "whole sequence on one device (disable parallelism before applying)")
    cls = _wrapped_class(type(inner))
    wrapper = cls.__new__(cls)
    wrapper.__dict__.update(inner.__dict__)
    wrapper._mmeff_inner = inner
    wrapper._mmeff_site = site_name
    wrapper._mmeff_callback = callback
    if uses_dispatcher(inner):
        from diffusers.models.attention_dispatch import AttentionBackendName

        wrapper._attention_backend = AttentionBackendName.NATIVE  # the wrapper's copy only
    return wrapper


def swap(module: torch.nn.Module, wrapper: Any) -> Callable[[], None]:
    """Install ``wrapper`` on ``module``; returns the undo that puts the exact original object back."""
    original = module.processor
    module.set_processor(wrapper)

    def undo() -> None:
        module.set_processor(original)
    return undo

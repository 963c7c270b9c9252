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

The original processor object is never modified. What diffusers' own features do to a wrapper:

- ``set_attention_backend`` / ``reset_attention_backend`` after apply write the wrapper's
  ``_attention_backend``; that attribute is a property of the wrapper class which keeps the wrapper's own pin
  on the native backend and forwards the user's choice to the inner processor, so mmeff's dense fallback runs
  the newly chosen backend (the change is followed, not lost).
- Re-creating a processor from its class (``type(p)()``, as FLUX ``load_ip_adapter`` / ``unload_ip_adapter``
  do) builds a plain processor of the *inner* class: copies never carry mmeff's hooks. ``copy.deepcopy`` and
  pickling likewise yield the inner processor.
- Replacing a wrapper (``set_attn_processor``, ``fuse_qkv_projections`` ...) is detected by the DiT adapter
  at the next forward (:mod:`.dit_guard`); the undo of :func:`swap` only restores sites that still hold the
  wrapper, so a processor the user set later stays.
- After undo the wrapper is *retired*: if diffusers kept a reference (``original_attn_processors``, a saved
  ``attn_processors`` dict) and reinstalls it, it runs exactly as its inner processor.
"""
from __future__ import annotations

import copy
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


_CLASSES: dict[tuple[type, bool], type] = {}


def _backend_property() -> property:
    """The wrapper's ``_attention_backend``: reads give the wrapper's pin, writes go to the inner processor."""
    def get(self) -> Any:
        if self._mmeff_retired:
            return getattr(self._mmeff_inner, "_attention_backend", None)
        from diffusers.models.attention_dispatch import AttentionBackendName

        return AttentionBackendName.NATIVE

    def set_(self, value: Any) -> None:
        self._mmeff_inner._attention_backend = value

    return property(get, set_, doc="mmeff pins its own copy to the native backend; the user's backend is the "
                                   "inner processor's and is used by mmeff's dense fallback")


def _wrapped_class(base: type, dispatcher: bool) -> type:
    """A subclass of ``base`` whose ``__call__`` (same signature) runs inside the interception mode."""
    cls = _CLASSES.get((base, dispatcher))
    if cls is not None:
        return cls

    @functools.wraps(base.__call__)
    def __call__(self, attn, *args, **kwargs):
        if self._mmeff_retired:  # mmeff was removed but diffusers reinstalled a saved reference
            return self._mmeff_inner(attn, *args, **kwargs)
        mode = _Intercept(self._mmeff_callback, dense_attention(self._mmeff_inner))
        with mode:
            out = base.__call__(self, attn, *args, **kwargs)
        if mode.calls == 0:
            raise UnsupportedModelError(
                f"mmeff: the attention processor {base.__name__} of {self._mmeff_site} did not call "
                "scaled_dot_product_attention (nor diffusers' native attention backend), so its attention op "
                "cannot be replaced; install an SDPA processor first (e.g. transformer.set_attn_processor("
                "AttnProcessor2_0())) or disable xformers, then apply"
            )
        return out

    def __new__(klass, *args, **kwargs):
        """``type(wrapper)(...)`` (diffusers re-creating a processor) builds a plain ``base`` processor."""
        return base(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        """Copies and pickles of a wrapper are copies of the inner processor."""
        return self._mmeff_inner.__reduce_ex__(protocol)

    body: dict[str, Any] = {"__call__": __call__, "__new__": __new__, "__reduce_ex__": __reduce_ex__,
                            "__module__": __name__, "_mmeff_retired": False}
    if dispatcher:
        body["_attention_backend"] = _backend_property()
    cls = type(f"Mmeff{base.__name__}", (base,), body)
    _CLASSES[(base, dispatcher)] = cls
    return cls


def is_wrapper(processor: Any) -> bool:
    return getattr(type(processor), "_mmeff_retired", None) is not None and "_mmeff_inner" in getattr(
        processor, "__dict__", {})


def unwrap(processor: Any) -> Any:
    """The processor itself, or the inner processor of an mmeff wrapper."""
    return processor.__dict__["_mmeff_inner"] if is_wrapper(processor) else processor


def wrap_processor(inner: Any, site_name: str, callback: SDPACallback) -> Any:
    """A wrapper of ``inner`` (its state copied, never shared mutably) that routes attention to ``callback``."""
    if is_wrapper(inner):
        if not inner._mmeff_retired:
            raise UnsupportedModelError(f"{site_name}: its processor is already wrapped by mmeff")
        inner = unwrap(inner)  # a retired wrapper that diffusers reinstalled: wrap what it stands for
    if getattr(inner, "_parallel_config", None) is not None:
        raise UnsupportedModelError(f"{site_name}: context parallelism is active; mmeff's DiT adapter needs the "
                                    "whole sequence on one device (disable parallelism before applying)")
    cls = _wrapped_class(type(inner), uses_dispatcher(inner))
    wrapper = object.__new__(cls) if type(inner).__new__ is object.__new__ else type(inner).__new__(cls)
    # Containers (nn.Module processors' _modules/_parameters) are copied so nothing registered on one object
    # shows up on the other; attributes are written to __dict__ (nn.Module.__setattr__ would register the inner
    # processor as a submodule of itself).
    wrapper.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in inner.__dict__.items()})
    wrapper.__dict__.update(_mmeff_inner=inner, _mmeff_site=site_name, _mmeff_callback=callback)
    return wrapper


def swap(module: torch.nn.Module, wrapper: Any) -> Callable[[], None]:
    """Install ``wrapper`` on ``module``; the undo puts the original object back *if the wrapper is still there*.

    A processor the user installed after apply stays. The wrapper is retired either way (see the module doc).
    """
    original = unwrap(module.processor)  # a retired wrapper the user reinstalled goes back as what it stands for
    module.set_processor(wrapper)

    def undo() -> None:
        wrapper.__dict__["_mmeff_retired"] = True
        if module.processor is wrapper:
            module.set_processor(original)
    return undo

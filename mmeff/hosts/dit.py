"""DiT host adapter: diffusers SD3, FLUX, PixArt, Wan, HunyuanVideo and CogVideoX transformers/pipelines.

``mmeff.apply(pipe_or_transformer, *methods)`` lands here. The adapter
- finds the attention sites (:mod:`.dit_layout`) and, for the sites some method wants, swaps the module's
  processor *instance* for a wrapper that routes the attention op to mmeff (:mod:`.dit_sdpa`);
- hooks the transformer's forward (per instance): the pre-hook records the latent grid and the denoising
  step (:mod:`.dit_steps`) and, for guidance methods, appends the perturbed branch rows; the post-hook folds
  the guidance into the prediction (:mod:`.dit_branch`);
- dispatches each method by its ``kind`` through a handler registry (``register_dit_handler``), torchao
  style, so new DiT method families plug in without touching this file.
``Handle.remove()`` puts back the exact original processor objects (where mmeff's wrapper is still installed)
and removes every hook. Next to diffusers' own features the adapter is never silently off (:mod:`.dit_guard`,
docs/dit-host-and-diffusers-features.md): a wrapper replaced after apply, a call from another pipeline that
shares the transformer, or a batch-row-adding guidance next to a diffusers cache is refused at the next call.
"""
from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable
from typing import Any

import torch

from ..core.config import MethodConfig
from ..core.errors import (
    AlreadyAppliedError,
    ConfigError,
    IncompatibleFeatureError,
    MmeffError,
    UnsupportedModelError,
)
from ..core.handle import Handle
from ..core.hooks import HookSet
from ..core.registry import register_host
from . import dit_branch as br
from .dit_context import (
    AttentionRuntime,
    AttnContext,
    AttnSite,
    DiTInfo,
    FunctionRuntime,
    GuidanceRuntime,
)
from .dit_guard import (
    active_caches,
    calling_pipeline,
    pag_sites,
    replaced_sites,
    replacement_error_message,
    scrub_saved_processors,
)
from .dit_layout import FamilyLayout, find_sites, known_class, layout_for, spans
from .dit_sdpa import swap, wrap_processor
from .dit_steps import CallInfo, StepTracker

_MARK = "_mmeff_dit_applied"

# kind -> handler(adapter, method) -> runtime; the adapter keeps the runtimes and calls them.
Handler = Callable[["DiTAdapter", MethodConfig], Any]
_HANDLERS: dict[str, Handler] = {}


def register_dit_handler(kind: str) -> Callable[[Handler], Handler]:
    """Decorator: make methods of ``kind`` applicable to DiTs (``handler(adapter, config) -> runtime``)."""
    def deco(fn: Handler) -> Handler:
        _HANDLERS[kind] = fn
        return fn
    return deco


@register_dit_handler("dit_attention")
def _attention_handler(adapter: DiTAdapter, method: MethodConfig) -> AttentionRuntime:
    if hasattr(method, "make_runtime"):
        runtime = method.make_runtime(adapter.info)
    elif hasattr(method, "attention"):
        runtime = FunctionRuntime(method.attention, getattr(method, "targets", None))
    else:
        raise ConfigError(f"{method.name}: a dit_attention method needs make_runtime(info) or attention(ctx, q, k, v, "
                          "attn_mask, scale)")
    adapter.attention.append((method.name, runtime))
    return runtime


@register_dit_handler("dit_guidance")
def _guidance_handler(adapter: DiTAdapter, method: MethodConfig) -> GuidanceRuntime:
    if adapter.guidance is not None:
        raise ConfigError(f"apply one guidance method at a time to a DiT, got {adapter.guidance[0]} and {method.name}")
    runtime = method.make_runtime(adapter.info)
    adapter.guidance = (method.name, runtime)
    return runtime


class _Call:
    """State of the transformer call in flight."""

    def __init__(self, info: CallInfo, grid: tuple[int, int, int], branch: br.Branch | None) -> None:
        self.info = info
        self.grid = grid
        self.n_image = grid[0] * grid[1] * grid[2]
        self.branch = branch


@register_host
class DiTAdapter:
    """Adapter for diffusers DiT pipelines (anything with a supported ``.transformer``) and the transformers."""

    family = "dit"

    @classmethod
    def matches(cls, obj: Any) -> bool:
        if known_class(obj) is not None or _from_diffusers(obj, "diffusers.models.transformers"):
            return True  # unsupported diffusers transformers get a precise error in __init__
        return _from_diffusers(getattr(obj, "transformer", None), "diffusers.")  # a pipeline

    def __init__(self, obj: Any) -> None:
        is_model = isinstance(obj, torch.nn.Module)
        self.pipe = None if is_model else obj
        self.model: torch.nn.Module = obj if is_model else obj.transformer
        if self.pipe is not None and getattr(self.pipe, "transformer_2", None) is not None:
            raise UnsupportedModelError(
                f"{type(obj).__name__} has two transformers (Wan 2.2 experts); mmeff's DiT adapter handles one "
                "transformer per pipeline for now: apply to pipe.transformer (and pipe.transformer_2) separately"
            )
        self.layout: FamilyLayout = layout_for(self.model)
        found = find_sites(self.model, self.layout)
        self.sites: list[AttnSite] = [s for s, _ in found]
        self.modules: dict[str, torch.nn.Module] = {s.name: m for s, m in found}
        self.blocks: list[torch.nn.Module] = [b for name, _ in self.layout.blocks
                                              for b in getattr(self.model, name)]
        self.installed: dict[str, tuple[torch.nn.Module, Any]] = {}  # site -> (module, mmeff's wrapper)
        self.originals: dict[str, Any] = {}                          # site -> processor before apply
        self.info = DiTInfo(family=self.layout.family, model_class=type(self.model).__name__,
                            sites=tuple(self.sites), n_layers=1 + max(s.layer for s in self.sites),
                            has_pipeline=self.pipe is not None)
        self.signature = inspect.signature(self.model.forward)
        self.attention: list[tuple[str, AttentionRuntime]] = []
        self.guidance: tuple[str, GuidanceRuntime] | None = None
        self.tracker = StepTracker(self.pipe)
        self.call: _Call | None = None
        self.offset: torch.Tensor | None = None
        self.seconds: dict[str, float] = {}
        self.steps_seen = 0  # denoising steps of the latest generation
        self.counts: dict[str, int] = {"transformer_calls": 0, "branch_calls": 0, "partner_calls": 0,
                                       "attention_calls": 0}

    # ------------------------------------------------------------------ apply
    def apply(self, methods: list[MethodConfig]) -> Handle:
        if getattr(self.model, _MARK, False):
            raise AlreadyAppliedError(
                f"mmeff methods are already applied to this {type(self.model).__name__} (through its pipeline or "
                "directly); call handle.remove() first, or pass all methods to one mmeff.apply call"
            )
        for m in methods:
            if m.kind not in _HANDLERS:
                raise ConfigError(f"{m.name} (kind {m.kind!r}) cannot be applied to a DiT; DiT method kinds are "
                                  f"{sorted(_HANDLERS)}")
        for m in methods:
            _HANDLERS[m.kind](self, m)
        self._check_caches(when="at apply")
        self._check_pag()
        hooks = HookSet()
        try:
            hooks.set_attr(self.model, _MARK, True)
            hooks.pre_hook(self.model, self._pre_forward)
            hooks.post_hook(self.model, self._post_forward)
            hooks.on_remove(lambda: scrub_saved_processors(self.model))  # runs after every swap is undone
            for site in self.sites:
                if self._site_wanted(site):
                    module = self.modules[site.name]
                    wrapper = wrap_processor(module.processor, site.name, self._sdpa_callback(site))
                    self.originals[site.name] = wrapper._mmeff_inner
                    hooks.on_remove(swap(module, wrapper))
                    self.installed[site.name] = (module, wrapper)
            hooks.on_remove(self._reset)
        except Exception:
            hooks.remove()
            raise
        return Handle(self.pipe if self.pipe is not None else self.model, methods, hooks, self.report)

    def _site_wanted(self, site: AttnSite) -> bool:
        if any(rt.wants(site) for _, rt in self.attention):
            return True
        return self.guidance is not None and self.guidance[1].wants(site)

    def _reset(self) -> None:
        self.call, self.offset = None, None
        self.tracker.reset()
        self.installed.clear()

    # ------------------------------------------------------------------ never silently off (see .dit_guard)
    def _check_installed(self) -> None:
        names = replaced_sites(self.installed)
        if names:
            raise IncompatibleFeatureError(replacement_error_message(names, self.installed, self.originals,
                                                                     len(self.installed)))

    def _check_caller(self) -> None:
        if self.pipe is None:
            return
        caller = calling_pipeline(self.model)
        if caller is not None and caller is not self.pipe:
            raise AlreadyAppliedError(
                f"mmeff: this {type(self.model).__name__} is shared by two pipelines; mmeff was applied through "
                f"the {type(self.pipe).__name__} at {id(self.pipe):#x} and follows that pipeline's CFG and step "
                f"state, but the {type(caller).__name__} at {id(caller):#x} is calling it. remove() the handle and "
                "apply mmeff to the pipeline you call, or give each pipeline its own transformer"
            )

    def _check_pag(self) -> None:
        swapped = {id(m) for m in pag_sites(self.pipe, self.model)} if self.pipe is not None else set()
        shared = [s.name for s in self.sites if self._site_wanted(s) and id(self.modules[s.name]) in swapped]
        if shared:
            raise IncompatibleFeatureError(
                f"mmeff: this {type(self.pipe).__name__} swaps the attention processors of its pag_applied_layers "
                f"on every call, and mmeff's methods need {len(shared)} of them ({', '.join(shared[:3])}"
                f"{', ...' if len(shared) > 3 else ''}); use the non-PAG pipeline, or pipe.set_pag_applied_layers("
                "...) to layers mmeff does not use"
            )

    def _check_caches(self, when: str) -> None:
        if self.guidance is None or not self.guidance[1].adds_rows:
            return
        caches = active_caches(self.model, [*self.blocks, *self.modules.values()])
        if caches:
            raise IncompatibleFeatureError(
                f"mmeff: {self.guidance[0]} appends perturbed batch rows to the transformer call, which diffusers' "
                f"cache ({', '.join(caches)}, found {when}) does not support (it keeps one batch layout per call); "
                "disable the cache (transformer.disable_cache()) or use the guidance without it"
            )

    # ------------------------------------------------------------------ transformer hooks
    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        self._check_installed()
        self._check_caller()
        self._check_caches(when="at this call")
        bound = self.signature.bind_partial(*args, **kwargs)
        kw = dict(bound.arguments)
        extra = kw.pop(next((n for n, p in self.signature.parameters.items()
                             if p.kind is inspect.Parameter.VAR_KEYWORD), "__none__"), None)
        if extra:
            kw.update(extra)
        hidden = kw["hidden_states"]
        batch = int(hidden.shape[0])
        info = self.tracker.on_call(kw.get("timestep"), hidden)
        self.counts["transformer_calls"] += 1
        self.steps_seen = info.step + 1
        grid = tuple(int(x) for x in self.layout.grid(self.model, kw))
        branch = None
        partner = info.partner and self.layout.cfg == "sequential"
        if partner and self.offset is not None:
            self.counts["partner_calls"] += 1
        else:
            self.offset = None
            if self.guidance is not None:
                weight = float(self.guidance[1].scale_at(info.step, info.num_steps))
                if weight != 0.0:
                    branch = self._branch(kw, batch, weight)
        self.call = _Call(info, grid, branch)
        if branch is None:
            return (), kw
        self.counts["branch_calls"] += 1
        return (), br.extend(kw, self.layout.batch_keys, batch, branch.cond_rows)

    def _branch(self, kw: dict[str, Any], batch: int, weight: float) -> br.Branch:
        device = kw["hidden_states"].device
        batched = self.layout.cfg == "batched" and br.cfg_is_batched(self.pipe, kw, batch)
        rows = torch.arange(batch // 2, batch, device=device) if batched else torch.arange(batch, device=device)
        return br.Branch(batch=batch, cond_rows=rows, weight=weight, cfg_batched=batched)

    def _post_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        call, self.call = self.call, None
        if call is None:
            return output
        if call.branch is not None:
            sample = br.sample_of(output)
            t0 = _clock(sample)
            output, self.offset = br.fold(output, call.branch)
            self._add_time(self.guidance[0], t0, sample)
            return output
        if call.info.partner and self.layout.cfg == "sequential" and self.offset is not None:
            return br.add_offset(output, self.offset)
        return output

    # ------------------------------------------------------------------ attention
    def _sdpa_callback(self, site: AttnSite) -> Callable[..., torch.Tensor]:
        chain = [(name, rt) for name, rt in self.attention if rt.wants(site)]
        guidance = self.guidance if self.guidance is not None and self.guidance[1].wants(site) else None

        def callback(call_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any,
                     dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool,
                     dense: Callable[..., torch.Tensor]) -> torch.Tensor:
            def base(q_, k_, v_, m_, s_):
                return dense(q_, k_, v_, m_, dropout_p, is_causal, s_, enable_gqa)

            call = self.call
            if call is None or call_index > 0:  # outside a tracked forward, or a secondary op (IP-adapter)
                return base(q, k, v, attn_mask, scale)
            self.counts["attention_calls"] += 1
            text, image = spans(int(q.shape[-2]), call.n_image, site.text_position)
            perturbed = None
            if call.branch is not None:
                if q.shape[0] != call.branch.total:
                    raise MmeffError(f"{site.name}: attention batch {q.shape[0]} does not match the transformer "
                                     f"batch {call.branch.total}; this model reshapes its batch inside attention")
                perturbed = call.branch.rows
            ctx = AttnContext(site=site, step=call.info.step, num_steps=call.info.num_steps, grid=call.grid,
                              n_image=call.n_image, text=text, image=image, perturbed=perturbed, call=call_index,
                              attend=base, dropout_p=dropout_p, is_causal=is_causal)
            out = self._run_chain(chain, 0, ctx, q, k, v, attn_mask, scale, base)
            if guidance is not None and perturbed is not None:
                out = self._perturb(guidance, ctx, q, k, v, attn_mask, scale, out, perturbed)
            return out

        return callback

    def _run_chain(self, chain: list[tuple[str, AttentionRuntime]], i: int, ctx: AttnContext, q: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor, mask: Any, scale: float | None,
                   base: Callable[..., torch.Tensor]) -> torch.Tensor:
        if i == len(chain):
            return base(q, k, v, mask, scale)
        name, runtime = chain[i]
        inner_time = [0.0]

        def attend(q_, k_, v_, m_, s_):
            t = _clock(q_)
            try:
                return self._run_chain(chain, i + 1, ctx, q_, k_, v_, m_, s_, base)
            finally:
                inner_time[0] += _clock(q_) - t

        t0 = _clock(q)
        out = runtime(_with_attend(ctx, attend), q, k, v, mask, scale)
        self.seconds[name] = self.seconds.get(name, 0.0) + _clock(q) - t0 - inner_time[0]
        return out

    def _perturb(self, guidance: tuple[str, GuidanceRuntime], ctx: AttnContext, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, mask: Any, scale: float | None, out: torch.Tensor, rows: slice) -> torch.Tensor:
        t0 = _clock(q)
        total = q.shape[0]
        m = mask[rows] if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[0] == total else mask
        new = guidance[1].perturb(ctx, q[rows], k[rows], v[rows], m, scale, out[rows])
        result = torch.cat([out[:rows.start], new.to(out.dtype)], 0)
        self._add_time(guidance[0], t0, result)
        return result

    def _add_time(self, name: str, t0: float, t: torch.Tensor) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + _clock(t) - t0

    # ------------------------------------------------------------------ report
    def report(self) -> dict[str, Any]:
        per_method: dict[str, Any] = {}
        for name, rt in self.attention + ([self.guidance] if self.guidance else []):
            per_method[name] = {**rt.report(), "method_seconds": self.seconds.get(name, 0.0)}
        wrapped = [s.name for s in self.sites if self._site_wanted(s)]
        return {
            "host": self.family, "family": self.layout.family, "model": type(self.model).__name__,
            "n_layers": self.info.n_layers, "heads_per_layer": self.info.heads_per_layer(),
            "attention_sites": len(self.sites), "wrapped_sites": wrapped,
            "text_position": self.layout.text_position, "cfg": self.layout.cfg,
            "steps_seen": self.steps_seen, "num_steps": self.tracker.num_steps(),
            "generations": self.tracker.generations, **self.counts,
            "method_seconds": sum(self.seconds.values()), "per_method": per_method,
        }


def _from_diffusers(obj: Any, prefix: str) -> bool:
    return isinstance(obj, torch.nn.Module) and type(obj).__module__.startswith(prefix)


def _clock(t: torch.Tensor) -> float:
    """perf_counter after the device caught up (CUDA work is asynchronous)."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return time.perf_counter()


def _with_attend(ctx: AttnContext, attend: Callable[..., torch.Tensor]) -> AttnContext:
    return dataclasses.replace(ctx, attend=attend)


def describe(obj: Any) -> DiTInfo:
    """The attention sites and layer/head counts of a supported pipeline or transformer (nothing is changed)."""
    return DiTAdapter(obj).info

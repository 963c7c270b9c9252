"""Generic VLM host adapter: cuts visual tokens before the LLM and/or inside it at a chain of layers K1 < K2 < ...

Everything is done with per-instance forward hooks on the model's own modules:
- a pre-hook on the multimodal model (``model.model``) sees ``input_ids`` and tells prefill from decode;
  pre-LLM pruning rewrites its inputs there (features, placeholders, masks, positions);
- in-LLM pruning captures the q/k projections of layer K-1 (only during prefill), decides at the
  pre-hook of layer K, and every layer >= K gathers hidden states, RoPE tables and the mask;
  decode steps remap each pruned layer's mask columns onto its shorter cache.
The decision belongs to the prompt (docs/generation-contract.md): a forward that continues the last pruned
prompt (a reused cache, ``use_cache=False`` steps, assisted-decoding drafts) reuses its decision, which is made
on the prompt tokens alone. Family subclasses (llava.py, qwen_vl.py) only say where things are.

One plan per batch (docs/vlm-plan.md): an optional pre-LLM stage, then a chain of in-LLM cuts (``token_plan.Cut``),
each keeping a subset of the previous stage's tokens, ragged per sample. Every cut is expressed in the coordinates
of the LLM's input sequence, so masks, RoPE tables / M-RoPE positions and each layer's KV length follow from the
cut that governs that layer. FastV, EntropyPrune and random are the one-cut case.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import zlib
from typing import Any, Callable

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..core.config import MethodConfig
from ..core.errors import ConfigError, IncompatibleFeatureError, MissingImageError, UnsupportedModelError
from ..core.handle import Handle
from ..core.hooks import HookSet
from ..core.timing import MethodTimer
from ..pruners.base import PrunerConfig
from . import projector_probe
from . import prompt_match as pm
from . import steering_hooks as steering
from . import token_plan as tp
from .flops import prefill_flops
from .generate_guard import install_generate_guard

PREFILL, DECODE, OFF = "prefill", "decode", "off"
DECISION_BREAK = ("mmeff reads a new prompt eagerly (where its image tokens are, and for pre-LLM pruning which to "
                  "keep: data-dependent); compile the prefill without fullgraph=True, or let generate() compile "
                  "only the decode steps (docs/compile.md)")


@dataclasses.dataclass
class StepState:
    """What one prompt (prefill + its decode steps) needs to remember."""

    phase: str = OFF
    input_ids: torch.Tensor | None = None          # the prompt [B, L] (no draft or generated tokens)
    attn2d: torch.Tensor | None = None             # the prompt's 2-D padding mask [B, L]
    images: list[tuple[str, Any]] = dataclasses.field(default_factory=list)  # the prompt's image inputs
    visual_positions: list[torch.Tensor] = dataclasses.field(default_factory=list)  # per sample, global
    spans: list[list[tuple[int, int]]] = dataclasses.field(default_factory=list)     # per sample, local
    plan: tp.KeepPlan | None = None                # the prompt's first decision (pre-LLM plan, else the first cut)
    forward_plan: tp.KeepPlan | None = None        # the pre-LLM decision over this prefill forward (L + later tokens)
    cuts: list[tp.Cut] = dataclasses.field(default_factory=list)          # the prompt's in-LLM cuts decided so far
    forward_cuts: list[tp.Cut] = dataclasses.field(default_factory=list)  # the same over this prefill forward
    coords: "StageCoords | None" = None            # where the next cut's tokens are (scoring coordinates)
    kept_per_cut: list[list[int]] = dataclasses.field(default_factory=list)  # per decided cut, per sample
    pending_replace: dict[int, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)
    forward_attn2d: torch.Tensor | None = None     # this prefill forward's 2-D padding mask
    captured: dict[str, Any] = dataclasses.field(default_factory=dict)
    per_forward: dict[int, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
    kept_per_sample: list[int] = dataclasses.field(default_factory=list)
    kept_visual_index: list[torch.Tensor] = dataclasses.field(default_factory=list)  # per sample, into its visual tokens
    vit_maps: list[list[Any]] = dataclasses.field(default_factory=list)    # per sample, per image: ViT importance
    recycling: list[list[Any]] = dataclasses.field(default_factory=list)   # per sample, per image: merges (or None)

    @property
    def prompt_len(self) -> int:
        return int(self.input_ids.shape[1])


@dataclasses.dataclass
class StageCoords:
    """The tokens a cut chooses from, in the coordinates of the sequence it sees (the prompt for the first cut).

    length:  prompt slots of that sequence (continuation tokens come after them)
    visual:  per sample, the slots of its surviving visual tokens (sorted)
    spans:   per sample, per image [start, end) into ``visual`` (an image may have no token left)
    attn2d:  [B, length] 1 for real tokens (padding and fillers 0), or None when every slot is real
    filler:  [B, length] filler slots of an earlier cut, or None
    real:    per sample, non-filler slots (host ints)
    text_rows: per sample, slots of the text tokens after the first image (None: derive from the prompt)
    orig_visual: per sample, each surviving visual token's index among the prompt's visual tokens
    carry:   per sample, the method's per-token values (aligned with ``visual``), gathered at each cut
    """

    length: int
    visual: list[torch.Tensor]
    spans: list[list[tuple[int, int]]]
    attn2d: torch.Tensor | None
    filler: torch.Tensor | None
    real: list[int]
    text_rows: list[torch.Tensor] | None = None
    orig_visual: list[torch.Tensor] | None = None
    carry: list[dict[str, torch.Tensor]] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------------------------- registries
ScoreFn = Callable[["SampleView"], torch.Tensor]
_SCORES: dict[str, ScoreFn] = {}
Handler = Callable[["VLMAdapter", list[MethodConfig], HookSet], None]
_VLM_HANDLERS: dict[str, Handler] = {}


def register_vlm_score(name: str) -> Callable[[ScoreFn], ScoreFn]:
    """Register a quantity a pruner can ask its view for (``view.get(name)``), computed from what the host captured.

    The function gets the :class:`SampleView` of one sample at one cut and returns a tensor over that sample's
    surviving visual tokens (or whatever the method documents). Built-ins: ``last_query_attention``,
    ``query_states``, ``key_states``, ``text_rows_attention``, ``hidden_states``, ``features``.
    """
    def deco(fn: ScoreFn) -> ScoreFn:
        _SCORES[name] = fn
        return fn
    return deco


def register_vlm_handler(kind: str) -> Callable[[Handler], Handler]:
    """Register how methods of one ``kind`` install on a VLM (mirrors ``register_dit_handler``)."""
    def deco(fn: Handler) -> Handler:
        _VLM_HANDLERS[kind] = fn
        return fn
    return deco


class VLMAdapter:
    """Base adapter for transformers VLMs (``*ForConditionalGeneration``)."""

    family = "vlm"
    model_classes: tuple[str, ...] = ()

    # ------------------------------------------------------------------ family-specific
    def encode_images(self, kwargs: dict[str, Any]) -> Any:
        """The model's ``get_image_features`` output for this forward's images (``pooler_output``: per image)."""
        raise NotImplementedError  # abstract: provided by llava.py / qwen_vl.py

    def image_features(self, kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """Per-image projected features [N_i, D] for this forward's images."""
        return list(self.encode_images(kwargs).pooler_output)

    def full_positions(self, kwargs: dict[str, Any], input_ids: torch.Tensor) -> torch.Tensor:
        """Position ids of the unpruned sequence when the caller passed none."""
        raise NotImplementedError  # abstract: provided by llava.py / qwen_vl.py

    def expected_visual_tokens(self) -> int | None:
        """Visual tokens per image when fixed by the config (for early budget checks)."""
        return None

    uses_mrope = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def matches(cls, obj: Any) -> bool:
        return type(obj).__name__ in cls.model_classes

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.inner = model.model
        self.lm = self.inner.language_model
        self.layers = self.lm.layers
        self.text_config = self.lm.config
        self.n_layers = len(self.layers)
        self.image_token_id = int(model.config.image_token_id)
        self.timer = MethodTimer()
        self.state = StepState()
        self.pruner: PrunerConfig | None = None
        self.layer = 0                                # the first in-LLM cut (0: pre-LLM only)
        self.plan_layers: tuple[int, ...] = ()        # every cut of the method: 0 = pre-LLM, K >= 1 = LLM layer K
        self.has_pre = False
        self.llm_cuts: tuple[int, ...] = ()
        self._stage_of: list[int] = []                # per LLM layer: index of the cut governing it (-1: none)
        self.prompts = 0                              # prefills pruned since apply
        self.last: dict[str, Any] | None = None      # what the latest prefill kept (only the latest: no growth)
        self._pending_drafts = 0                      # draft tokens announced by the outer forward (assisted decoding)
        self.steering: list[Any] = []                 # runtimes of applied mitigators (their report())
        self.projector_rows: list[projector_probe.ProjectorRows] = []  # per image, for projector-probing pruners
        self.projector_recorder: projector_probe.ProjectorRecorder | None = None
        self.vision_stage: Any = None                 # ViT importance maps, for pruners that need them (VFlowOpt)

    # ------------------------------------------------------------------ apply
    def apply(self, methods: list[MethodConfig]) -> Handle:
        unknown = [m for m in methods if m.kind not in _VLM_HANDLERS]
        if unknown:
            raise ConfigError(
                f"{', '.join(m.name for m in unknown)} cannot be applied to a VLM ({self.family}); "
                f"VLM methods are of kinds {sorted(_VLM_HANDLERS)}"
            )
        hooks = HookSet()
        try:
            # steering last: a mitigator's hooks then see only the tokens that survive the pruner
            for kind in sorted(dict.fromkeys(m.kind for m in methods), key=lambda k: k == steering.MITIGATOR):
                _VLM_HANDLERS[kind](self, [m for m in methods if m.kind == kind], hooks)
            hooks.on_remove(self._reset)
        except Exception:
            hooks.remove()
            self._reset()
            raise
        return Handle(self.model, methods, hooks, self.report)

    def install_pruner(self, pruner: PrunerConfig, hooks: HookSet) -> None:
        """Check the pruner's whole plan against this model, then hook it in (nothing is installed on an error)."""
        if "vit_importance" in pruner.needs:
            pruner = pruner.bound_to(self.model)  # a zoo model's own calibration (VFlowOpt)
        layers = tuple(pruner.plan_layers(self.family, self.n_layers))
        self._check(pruner, layers)
        self.pruner, self.plan_layers = pruner, layers
        self.has_pre = layers[0] == 0
        self.llm_cuts = tuple(k for k in layers if k >= 1)
        self.layer = self.llm_cuts[0] if self.llm_cuts else 0
        self._stage_of = [sum(k <= i for k in self.llm_cuts) - 1 for i in range(self.n_layers)]
        hooks.pre_hook(self.model, self._on_outer_forward)
        hooks.pre_hook(self.inner, self._on_inner_forward)
        install_generate_guard(hooks, self.model, pruner)
        if "vit_importance" in pruner.needs:
            from .vflowopt_stage import VisionStage

            self.vision_stage = VisionStage(self, pruner)
            self.vision_stage.install(hooks)
        if self.llm_cuts:
            self._install_llm_hooks(hooks)
        if "projector" in pruner.needs:
            self.projector_recorder = projector_probe.ProjectorRecorder(self, hooks)

    @contextlib.contextmanager
    def suspended(self):
        """Pruner hooks stand aside (for a mitigator's extra branch through the language model)."""
        phase, self.state.phase = self.state.phase, OFF
        try:
            yield
        finally:
            self.state.phase = phase

    def _check(self, pruner: PrunerConfig, layers: tuple[int, ...]) -> None:
        if not layers or any(b <= a for a, b in zip(layers, layers[1:])):
            raise ConfigError(f"{pruner.name}: the cut layers must be strictly increasing, got {list(layers)}")
        layer = layers[-1]
        if layer >= self.n_layers:
            raise ConfigError(f"{pruner.name}: layer {layer} does not exist; {self.family} has {self.n_layers} LLM layers")
        if pruner.stage == "llm" and layers[0] < 1:
            raise ConfigError(f"{pruner.name} scores with layer K-1, so layer must be >= 1 (got {layers[0]})")
        if pruner.stage == "pre_llm" and layers[0] != 0:
            raise ConfigError(f"{pruner.name} declares a pre-LLM stage, so its first cut must be at layer 0, "
                              f"got {list(layers)}")
        if any(k >= 1 for k in layers):
            impl = self.text_config._attn_implementation
            if impl not in ("sdpa", "eager"):
                raise UnsupportedModelError(
                    f"in-LLM pruning supports attn_implementation 'sdpa' or 'eager', this model uses {impl!r}; "
                    "load it with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa'))"
                )
        if pruner.positions == "reindex" and self.uses_mrope:
            raise ConfigError(
                f"{pruner.name}: positions='reindex' is not defined for M-RoPE models ({self.family}); "
                "use positions='original'"
            )
        if pruner.positions == "reindex" and layers[0] == 0 and len(layers) > 1:
            raise ConfigError(f"{pruner.name}: positions='reindex' is not supported for a plan that cuts both before "
                              "and inside the LLM; use positions='original'")
        n = self.expected_visual_tokens()
        if n is not None:
            self._schedule(pruner, n, layers)  # raises BudgetError early

    def _schedule(self, pruner: PrunerConfig, n_visual: int, layers: tuple[int, ...]) -> list[int]:
        keep = list(pruner.keep_schedule(n_visual, self.n_layers, layers, family=self.family))
        if len(keep) != len(layers) or any(k < 0 for k in keep):
            raise ConfigError(f"{pruner.name}: keep_schedule gave {keep} for the {len(layers)} cuts {list(layers)}")
        return keep

    def _reset(self) -> None:
        self.state = StepState()
        self.projector_rows = []
        self.projector_recorder = None
        self.vision_stage = None


    # ------------------------------------------------------------------ forward pre-hooks
    def _on_outer_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        """Read ``logits_to_keep``: transformers' assisted decoding scores a prompt plus n - 1 drafts with n."""
        keep = kwargs.get("logits_to_keep", 0)
        self._pending_drafts = keep - 1 if isinstance(keep, int) and keep > 1 else 0
        return None

    def _on_inner_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        if args:  # normalise a positional input_ids
            kwargs = {"input_ids": args[0], **kwargs}
            args = ()
        drafts, self._pending_drafts = self._pending_drafts, 0
        self._refuse_unsupported(kwargs)
        past = kwargs.get("past_key_values")
        ids = kwargs.get("input_ids")
        new_tokens = ids if ids is not None else kwargs["inputs_embeds"]
        past_len = self._cache_length(past, new_tokens.shape[1]) if past is not None else 0
        if isinstance(past_len, int) and past_len == 0:
            return self._start_forward(kwargs, drafts if past is not None else 0)
        st = self.state
        if st.plan is None:
            st.phase = OFF
            return None
        rows = new_tokens.shape[0]
        if rows != st.plan.index.shape[0]:
            raise IncompatibleFeatureError(
                f"{self.pruner.name}: this cache holds {st.plan.index.shape[0]} pruned rows but the forward has {rows}; "
                "a cache can only be continued by the batch whose prompt filled it (run the prompt again without "
                "past_key_values)"
            )
        st.phase = DECODE
        st.per_forward.clear()
        if self.has_pre:
            return (), self._pre_llm_decode_inputs(kwargs, past_len)
        self._refuse_new_images(kwargs, ids)
        return None

    def _cache_length(self, past: Any, q: int) -> int | torch.Tensor:
        """Tokens in the cache before this forward of ``q`` tokens.

        A dynamic cache knows it on the host. A static cache keeps it in a device tensor, and reading it would
        sync with the device (and break a compiled graph): a one-token step on a pruned prompt's cache is a
        decode step, so it gets the tensor itself (used only in tensor arithmetic); any other forward (a
        prompt, a continuation) reads it on the host, as its decision needs it anyway.
        """
        n = past.get_seq_length()
        if not isinstance(n, torch.Tensor):
            return int(n)
        if q == 1 and self.state.plan is not None:
            return n
        return int(n)

    def _refuse_unsupported(self, kwargs: dict[str, Any]) -> None:
        """Generation paths that cannot run exactly yet: one clear error before anything changes."""
        name = self.pruner.name
        past = kwargs.get("past_key_values")
        if past is not None and getattr(past, "is_compileable", False):
            kinds = sorted({type(layer).__name__ for layer in past.layers} - {"StaticLayer"})
            if kinds:
                raise IncompatibleFeatureError(
                    f"{name}: cache layers {kinds} are not supported under pruning; use a StaticCache "
                    "(cache_implementation='static') or the default dynamic cache"
                )
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict) or (self.has_pre and mask is not None and mask.dim() != 2):
            raise IncompatibleFeatureError(
                f"{name}: precomputed {'per-layer' if isinstance(mask, dict) else '4-D'} attention masks are not "
                "supported under pruning; pass the 2-D padding mask (attention_mask of shape [batch, length])"
            )

    def _refuse_new_images(self, kwargs: dict[str, Any], ids: torch.Tensor | None) -> None:
        """An image arriving after the pruned prompt would escape the prompt's decision."""
        has_images = kwargs.get("pixel_values") is not None or bool(kwargs.get("mm_encoder_outputs"))
        if has_images and ids is not None and bool((ids == self.image_token_id).any()):
            raise IncompatibleFeatureError(
                f"{self.pruner.name}: new image tokens after a pruned prompt (a continued conversation that adds an "
                "image) are not supported; run the whole conversation as one prompt, without past_key_values"
            )

    @torch.compiler.disable(reason=DECISION_BREAK)
    def _start_forward(self, kwargs: dict[str, Any], drafts: int):
        """A forward on an empty cache: either a new prompt, or one that continues the last pruned prompt.

        Data-dependent (image positions; the pre-LLM choice), so it runs eagerly under ``torch.compile``: one
        graph break before the language model, which then compiles whole, the in-LLM decision included
        (see docs/compile.md).
        """
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ConfigError(
                f"{self.pruner.name} needs input_ids to locate the image placeholders; pass input_ids (with "
                "pixel_values), not inputs_embeds alone"
            )
        mask = kwargs.get("attention_mask")
        mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        images = pm.image_inputs(kwargs)
        st = self.state
        decided = st.plan is not None and len(st.cuts) == len(self.llm_cuts)
        if decided and pm.continues_prompt(st.input_ids, st.attn2d, st.images, input_ids, mask2d, images):
            st.phase = PREFILL
            st.per_forward.clear()
            st.captured.clear()
            self._extend_forward(input_ids.shape[1])
            st.forward_attn2d = mask2d
        else:
            self.state = st = self._new_prompt(input_ids, mask2d, images, drafts)
            self.prompts += 1  # counted here, eagerly: a counter read inside a compiled graph would recompile it
        if self.has_pre:
            return (), self._pre_llm_prefill_inputs(kwargs, input_ids)
        return (), kwargs

    def _new_prompt(self, input_ids: torch.Tensor, mask2d: torch.Tensor | None, images: list[tuple[str, Any]],
                    drafts: int) -> StepState:
        """State of a new prompt: the forward's tokens minus the trailing drafts (the decision never sees them)."""
        length = input_ids.shape[1] - drafts
        prompt = input_ids[:, :length]
        visual = prompt == self.image_token_id
        if not bool(visual.any()):
            raise MissingImageError(
                f"{self.pruner.name}: this batch has no image tokens; pass pixel_values with an image placeholder in "
                "the prompt, or call handle.remove() before running text-only prompts"
            )
        st = StepState(phase=PREFILL, input_ids=prompt, attn2d=mask2d[:, :length] if mask2d is not None else None,
                       images=images, forward_attn2d=mask2d)
        for b in range(prompt.shape[0]):
            pos = torch.nonzero(visual[b]).flatten()
            st.visual_positions.append(pos)
            st.spans.append(_runs(pos))
        st.coords = StageCoords(length, st.visual_positions, st.spans, st.attn2d, None, [length] * prompt.shape[0],
                                carry=[{} for _ in range(prompt.shape[0])])
        return st

    def _extend_forward(self, length: int) -> None:
        """The prompt's decisions over a forward of ``length`` tokens that continues it."""
        st = self.state
        llm_len = length
        if self.has_pre:
            st.forward_plan = tp.extend_plan(st.plan, length)
            llm_len = st.forward_plan.new_length
        prev_len, st.forward_cuts = llm_len, []
        for cut in st.cuts:
            st.forward_cuts.append(cut.extended(llm_len, prev_len))
            prev_len = st.forward_cuts[-1].plan.new_length

    # ------------------------------------------------------------------ decisions
    def _decide(self, view_factory: Callable[[int], "SampleView"], cut: int,
                device: torch.device) -> tuple[tp.KeepPlan, list[torch.Tensor], list[list[int]]]:
        """Ask the pruner for each sample's kept visual tokens at cut ``cut`` of its plan.

        Returns the plan in the coordinates of the sequence the cut sees (``state.coords``), each sample's kept
        indices into its surviving visual tokens, and the kept count per image.
        """
        st, pruner = self.state, self.pruner
        coords = st.coords
        length = coords.length
        keep_positions, dropped, kept_counts, kept_local, kept_images = [], [], [], [], []
        # Traced by torch.compile in the in-LLM path: every shape here follows from host ints (spans, budgets),
        # so the kept positions are taken with a sort of static size, never a boolean index (and no timer sync).
        timing = contextlib.nullcontext() if torch.compiler.is_compiling() else self.timer.section("select", device)
        with timing:
            for b, vis in enumerate(coords.visual):
                all_pos = torch.arange(length, device=device)
                n_vis = int(vis.numel())
                if n_vis == 0 and coords.filler is None:
                    keep_positions.append(all_pos)
                    dropped.append(0)
                    kept_counts.append(0)
                    kept_local.append(torch.zeros(0, dtype=torch.long))
                    kept_images.append([0] * len(coords.spans[b]))
                    continue
                spans = coords.spans[b]
                prompt_spans = st.spans[b]
                keep = [min(self._schedule(pruner, pe - ps, self.plan_layers)[cut], e - s)
                        for (s, e), (ps, pe) in zip(spans, prompt_spans)]
                local = pruner.select(view_factory(b), keep) if n_vis else torch.zeros(0, dtype=torch.long)
                is_vis = torch.zeros(length, dtype=torch.bool, device=device)
                is_vis[vis] = True
                kept_vis = vis[local.to(device)]
                keep_mask = ~is_vis
                if coords.filler is not None:
                    keep_mask &= ~coords.filler[b]
                keep_mask[kept_vis] = True
                n_keep = coords.real[b] - n_vis + int(kept_vis.numel())
                keep_positions.append(torch.where(keep_mask, all_pos, all_pos + length).sort().values[:n_keep])
                dropped.append(n_vis - int(kept_vis.numel()))
                kept_counts.append(int(kept_vis.numel()))
                kept_local.append(local)  # read on the host only when report() asks (no GPU sync here)
                if self.plan_layers[cut] == 0:  # pre-LLM (eager): what was kept, as a recycling rule may differ
                    kept_images.append([int(((local >= s) & (local < e)).sum()) for s, e in spans])
                else:
                    kept_images.append([min(k, e - s) for k, (s, e) in zip(keep, spans)])
        st.kept_per_sample = kept_counts
        st.kept_per_cut.append(kept_counts)
        plan = tp.build_plan(keep_positions, length, dropped)
        return plan, kept_local, kept_images

    def _after_cut(self, local: tp.KeepPlan, kept_local: list[torch.Tensor], kept_images: list[list[int]],
                   layer: int, more: bool) -> None:
        """Record what the cut kept; when ``more`` cuts follow, move the scoring coordinates onto its sequence."""
        st = self.state
        coords = st.coords
        # A decision traced into a compiled graph keeps no index tensors: under CUDA graphs they would be
        # overwritten by the next replay (report() then lists no kept_visual_index; the counts stay).
        compiling = torch.compiler.is_compiling()
        orig = coords.orig_visual
        if compiling:
            st.kept_visual_index = []
        elif orig is None:
            st.kept_visual_index = kept_local
        else:
            st.kept_visual_index = [o[k.to(o.device)] for o, k in zip(orig, kept_local)]
        if more:
            st.coords = self._next_coords(coords, local, kept_local, kept_images)
        self._record(layer, local)

    def _replacements(self, local: tp.KeepPlan) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Merged tokens asked for by ``view.replace_hidden``, moved onto the slots of the cut's sequence."""
        st = self.state
        out = []
        for b, (idx, values) in sorted(st.pending_replace.items()):
            old = st.coords.visual[b][idx.to(st.coords.visual[b].device)]
            n_fill = int(local.new_length - (~local.filler[b]).sum()) if local.has_fillers else 0
            out.append((b, torch.searchsorted(local.index[b, n_fill:], old) + n_fill, values.detach()))
        st.pending_replace = {}
        return out

    def _next_coords(self, coords: StageCoords, local: tp.KeepPlan, kept_local: list[torch.Tensor],
                     kept_images: list[list[int]]) -> StageCoords:
        """Coordinates of the sequence a cut leaves: kept slots packed to the right of left fillers."""
        visual, spans, rows, orig, carry, real = [], [], [], [], [], []
        new_len = local.new_length
        for b, vis in enumerate(coords.visual):
            n_keep = coords.real[b] - int(vis.numel()) + int(kept_local[b].numel())
            n_fill = new_len - n_keep
            slots = local.index[b, n_fill:]
            k = kept_local[b].to(vis.device)
            visual.append(torch.searchsorted(slots, vis[k]) + n_fill)
            rows.append(torch.searchsorted(slots, self.text_row_positions(b)) + n_fill)
            bounds = [0]
            for n in kept_images[b]:
                bounds.append(bounds[-1] + n)
            spans.append(list(zip(bounds[:-1], bounds[1:])))
            base = coords.orig_visual[b] if coords.orig_visual is not None else torch.arange(int(vis.numel()), device=vis.device)
            orig.append(base[k.to(base.device)])
            carry.append({name: val[k.to(val.device)] for name, val in coords.carry[b].items()})
            real.append(n_keep)
        attn2d = coords.attn2d
        if attn2d is not None or local.has_fillers:
            base2d = attn2d if attn2d is not None else torch.ones(local.index.shape[0], coords.length, dtype=torch.long,
                                                                  device=local.index.device)
            attn2d = tp.gather_seq(base2d, local).masked_fill(local.filler, 0)
        return StageCoords(new_len, visual, spans, attn2d, local.filler if local.has_fillers else None, real,
                           rows, orig, carry)

    def _record(self, layer: int, plan: tp.KeepPlan) -> None:
        st = self.state
        n_vis = [int(v.numel()) for v in st.visual_positions]
        done = ([0] if self.has_pre else []) + list(self.llm_cuts)
        self.last = {
            "visual": n_vis, "kept": list(st.kept_per_sample), "length": st.prompt_len,
            "new_length": plan.new_length, "layer": layer,
            "layers": done[:len(st.kept_per_cut)], "kept_per_cut": [list(k) for k in st.kept_per_cut],
            "kept_visual_index": list(st.kept_visual_index),
        }

    # ------------------------------------------------------------------ pre-LLM path
    def _pre_llm_prefill_inputs(self, kwargs: dict[str, Any], input_ids: torch.Tensor) -> dict[str, Any]:
        st = self.state
        enc = kwargs.get("mm_encoder_outputs") or {}
        per_sample = self._prompt_features(kwargs, enc, input_ids.device)
        if st.plan is None:
            views = (lambda b: SampleView(self, b, feats=per_sample[b])) if per_sample is not None else \
                (lambda b: SampleView(self, b))
            plan, kept_local, kept_images = self._decide(views, 0, input_ids.device)
            st.plan = plan
            self._after_cut(plan, kept_local, kept_images, 0, bool(self.llm_cuts))
            st.forward_plan = tp.extend_plan(st.plan, input_ids.shape[1])
        plan = st.forward_plan
        out = dict(kwargs)
        if per_sample is not None:
            kept_feats = []
            for b, spans in enumerate(st.spans):
                kept_global = plan.index[b][~plan.filler[b]]
                recycling = st.recycling[b] if st.recycling else [None] * len(spans)
                for (s, e), f, merge in zip(spans, per_sample[b], recycling):
                    if merge is not None:  # VFlowOpt: recycled tokens replace their slots' features
                        f = merge.apply(f)
                    sel = torch.isin(st.visual_positions[b][s:e], kept_global)
                    kept_feats.append(f[sel.to(f.device)])
            out.pop("pixel_values", None)
            out["mm_encoder_outputs"] = {**enc, "image": BaseModelOutputWithPooling(pooler_output=tuple(kept_feats))}
        pad_id = self._filler_token_id()
        new_ids = tp.gather_seq(input_ids, plan).masked_fill(plan.filler, pad_id)
        out["input_ids"] = new_ids
        am = kwargs.get("attention_mask")
        if am is not None:
            out["attention_mask"] = tp.gather_seq(am, plan).masked_fill(plan.filler, 0)
        else:
            # Always explicit: without a mask and a cache, transformers reads the gaps that pruning leaves in
            # position_ids as boundaries of packed sequences and would block attention across them.
            self._refuse_packed(kwargs)
            out["attention_mask"] = (~plan.filler).to(torch.long)
        types = self.token_types(kwargs, input_ids)
        if types is not None:
            out["mm_token_type_ids"] = tp.gather_seq(types, plan).masked_fill(plan.filler, 0)
        pos = kwargs.get("position_ids")
        if pos is None or self.uses_mrope:  # M-RoPE models also refresh rope_deltas here
            full = self.full_positions(kwargs, input_ids)
            pos = full if pos is None else pos
        if self.pruner.positions == "reindex":
            mask = out.get("attention_mask")
            mask = mask if mask is not None else torch.ones_like(new_ids)
            new_pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
        else:
            new_pos = tp.gather_positions(pos, plan)
        out["position_ids"] = new_pos
        return out

    def _refuse_packed(self, kwargs: dict[str, Any]) -> None:
        """Several sequences packed in one row (restarting text positions, no mask) cannot be cut before the LLM."""
        pos = kwargs.get("position_ids")
        if pos is None or kwargs.get("past_key_values") is not None:
            return
        text = pos[0] if pos.dim() == 3 and pos.shape[0] == 4 else pos if pos.dim() == 2 else None
        if text is not None and bool((text.diff(dim=-1) != 1).any()):
            raise IncompatibleFeatureError(
                f"{self.pruner.name}: packed sequences (several prompts in one row, told apart by restarting "
                "position_ids and no attention_mask) cannot be pruned before the LLM; pass one prompt per row "
                "with an attention_mask"
            )

    def _prompt_features(self, kwargs: dict[str, Any], enc: dict[str, Any],
                         device: torch.device) -> list[list[torch.Tensor]] | None:
        """Per sample, per image projected features; None when the forward carries no image inputs.

        Without images the placeholders are embedded as ordinary tokens (as the unpruned model does); only
        pruners that score features need them.
        """
        st = self.state
        maps = None
        needs_pixels = st.plan is None and "vit_importance" in self.pruner.needs
        if enc.get("image") is not None and (not needs_pixels or hasattr(enc["image"], "vflowopt_maps")):
            feats = list(enc["image"].pooler_output)
            maps = getattr(enc["image"], "vflowopt_maps", None) if needs_pixels else None
        elif kwargs.get("pixel_values") is not None:
            with self.timer.section("features", device):
                out = self.encode_images(kwargs)
            feats = list(out.pooler_output)
            maps = getattr(out, "vflowopt_maps", None) if needs_pixels else None
        elif st.plan is None and "projector" in self.pruner.needs:
            raise MissingImageError(
                f"{self.pruner.name} perturbs the projector's input, but this forward has image placeholders and no "
                "pixel_values; pass pixel_values with the prompt"
            )
        elif st.plan is None and ("features" in self.pruner.needs or needs_pixels):
            raise MissingImageError(
                f"{self.pruner.name} scores image {'pixels' if needs_pixels else 'features'}, but this forward has "
                "image placeholders and no pixel_values (precomputed features, or transformers calling an assistant "
                "model without them); pass pixel_values, or apply the pruner to the main model only"
            )
        else:
            return None
        per_sample: list[list[torch.Tensor]] = []
        i = 0
        if maps is not None:
            st.vit_maps = []
        for b, spans in enumerate(st.spans):
            mine = feats[i:i + len(spans)]
            if maps is not None:
                st.vit_maps.append(maps[i:i + len(spans)])
            i += len(spans)
            for (s, e), f in zip(spans, mine):
                if f.shape[0] != e - s:
                    raise ConfigError(f"image features ({f.shape[0]}) do not match the {e - s} placeholders of sample {b}")
            per_sample.append(mine)
        if self.projector_recorder is not None and st.plan is None:  # projector-probing pruners (zooprune)
            self.projector_rows = self.projector_recorder.rows(feats)
        return per_sample


    def token_types(self, kwargs: dict[str, Any], input_ids: torch.Tensor) -> torch.Tensor | None:
        """``mm_token_type_ids`` over this forward's tokens, when the family uses them (Qwen derives them)."""
        types = kwargs.get("mm_token_type_ids")
        if types is None or types.shape[-1] == input_ids.shape[-1]:
            return types
        if types.shape[-1] > input_ids.shape[-1]:
            return types[..., -input_ids.shape[-1]:]
        # transformers' assisted decoding does not extend them over the drafts: drafts are text (type 0)
        return torch.cat([types, types.new_zeros(types.shape[0], input_ids.shape[-1] - types.shape[-1])], -1)

    def _filler_token_id(self) -> int:
        pad = getattr(self.text_config, "pad_token_id", None)
        if pad is None or pad == self.image_token_id:
            pad = 0 if self.image_token_id != 0 else 1
        return int(pad)

    def _pre_llm_decode_inputs(self, kwargs: dict[str, Any], past_len: int | torch.Tensor) -> dict[str, Any]:
        """A forward on a cache that pre-LLM pruning shortened by ``L - L'`` slots in every layer.

        The mask's width (or, without a mask, the first text position) tells the logical position of the new
        tokens. transformers compares the (shorter) cache with the full ids and so re-feeds the last ``L - L'``
        cached tokens when a generation continues from ``past_key_values``: those are dropped here, so they are
        not cached twice. A static cache's decode step (``past_len`` a device tensor, one token, a mask padded
        to the cache's size) cannot overlap: nothing is read on the host, positions are computed on the device.
        """
        plan = self.state.plan
        logical_past = past_len + plan.length - plan.new_length
        out = dict(kwargs)
        ids = kwargs.get("input_ids")
        q = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        am = kwargs.get("attention_mask")
        if isinstance(past_len, torch.Tensor):
            start = None
        elif am is not None:
            start = int(am.shape[-1]) - q
        else:  # no mask, so no padding; a single new token cannot overlap the cache (no host read then)
            start = self._start_from_positions(kwargs.get("position_ids"), q) if q > 1 else None
        if start is not None:
            overlap = logical_past - start
            if overlap < 0 or overlap >= q:
                raise IncompatibleFeatureError(
                    f"{self.pruner.name}: these {q} tokens start at position {start}, but the pruned cache holds "
                    f"{logical_past} tokens of this sequence; continue a cache only with the full sequence (or only "
                    "the new tokens) and its full attention mask"
                )
            if overlap:
                out = pm.drop_leading(out, overlap)
                q -= overlap
        if am is not None:
            out["attention_mask"] = tp.remap_2d_mask(am, plan)
        elif plan.has_fillers:
            full = torch.ones(plan.index.shape[0], int(logical_past) + q, dtype=torch.long, device=plan.index.device)
            out["attention_mask"] = tp.remap_2d_mask(full, plan)
        self._refuse_new_images(out, out.get("input_ids"))
        pos = out.get("position_ids")
        if pos is None:
            pos = self._decode_positions(logical_past, q, plan)
        elif self.pruner.positions == "reindex":
            pos = pos - plan.dropped.view(*([1] * (pos.dim() - 2)), -1, 1)
        out["position_ids"] = pos
        return out

    def _start_from_positions(self, pos: torch.Tensor | None, q: int) -> int | None:
        """Index in the full sequence of the first of ``q`` unpadded tokens, read from the last one's position."""
        if pos is None:
            return None
        if pos.dim() == 3 and pos.shape[0] == 4:  # text row first, then M-RoPE axes (transformers' Qwen layout)
            pos = pos[0]
        return int(pos[0, -1]) - (q - 1) if pos.dim() == 2 else None

    def _decode_positions(self, logical_past: int, q: int, plan: tp.KeepPlan) -> torch.Tensor:
        """Positions of new tokens after ``logical_past`` tokens when the caller passed none (plain forward)."""
        bsz = plan.index.shape[0]
        base = (torch.arange(q, device=plan.index.device) + logical_past).expand(bsz, -1)
        if self.pruner.positions == "original":
            return base
        return base - plan.dropped.view(-1, 1)

    # ------------------------------------------------------------------ in-LLM path
    def _install_llm_hooks(self, hooks: HookSet) -> None:
        for j, layer in enumerate(self.llm_cuts):
            prev = self.layers[layer - 1].self_attn
            hooks.pre_hook(prev, self._capture_attn_inputs(j))
            hooks.post_hook(prev.q_proj, self._capture("q", j))
            hooks.post_hook(prev.k_proj, self._capture("k", j))
        for i in range(self.layer, self.n_layers):
            hooks.pre_hook(self.layers[i], self._layer_hook(i))

    def _capturing(self, cut: int) -> bool:
        """Layer K-1 of cut ``cut`` captures its inputs only while that cut is still to be decided."""
        st = self.state
        return st.phase == PREFILL and len(st.cuts) == cut

    def _capture_attn_inputs(self, cut: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
            if self._capturing(cut):
                self.state.captured["attn"] = module
                self.state.captured["position_embeddings"] = kwargs.get("position_embeddings")
            return None
        return hook

    def _capture(self, name: str, cut: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._capturing(cut):
                self.state.captured[name] = output.detach()
        return hook

    def _layer_hook(self, index: int) -> Callable:
        stage = self._stage_of[index]
        at_cut = self.llm_cuts[stage] == index

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
            st = self.state
            if st.phase == PREFILL:
                if at_cut and len(st.cuts) == stage:
                    self._decide_in_llm(stage, args[0] if args else kwargs["hidden_states"])
                if stage >= len(st.forward_cuts):
                    return None
                cut = st.forward_cuts[stage]
                if cut.plan.is_identity:
                    return None
                return self._prefill_layer_inputs(index, args, kwargs, cut, stage, at_cut)
            if st.phase == DECODE and stage < len(st.cuts) and not st.cuts[stage].plan.is_identity:
                return self._decode_layer_inputs(index, args, kwargs, st.cuts[stage].plan, stage)
            return None
        return hook

    def _decide_in_llm(self, stage: int, hidden: torch.Tensor) -> None:
        """The decision of in-LLM cut ``stage``; static shapes, so ``torch.compile`` traces it into the prefill graph."""
        st = self.state
        layer = self.llm_cuts[stage]
        cut_index = stage + int(self.has_pre)
        local, kept_local, kept_images = self._decide(
            lambda b: SampleView(self, b, hidden=hidden, cut=cut_index, layer=layer), cut_index, hidden.device)
        prev = st.cuts[-1].plan if st.cuts else None
        plan = tp.compose(prev, local)
        cut = tp.Cut(layer, plan, local, self._replacements(local))
        st.cuts.append(cut)
        llm_len = st.forward_cuts[0].plan.length if st.forward_cuts else hidden.shape[1]
        st.forward_cuts.append(cut.extended(llm_len, hidden.shape[1]))
        if not self.has_pre and stage == 0:
            st.plan = plan
        self._after_cut(local, kept_local, kept_images, layer, stage + 1 < len(self.llm_cuts))
        st.captured.clear()

    def _mask_format(self, mask: torch.Tensor | None) -> tuple[bool, torch.dtype]:
        if mask is not None:
            return mask.dtype == torch.bool, mask.dtype
        as_bool = self.text_config._attn_implementation != "eager"
        return as_bool, self.lm.dtype if not as_bool else torch.bool

    def _cached(self, obj: Any, fn: Callable[[Any], Any], stage: int = 0) -> Any:
        """Per-forward cache keyed by object identity and stage (one gather per forward and cut, not per layer)."""
        if obj is None or torch.compiler.is_compiling():  # compiled: the graph computes it once per layer
            return fn(obj)
        key = (id(obj), stage)
        hit = self.state.per_forward.get(key)
        if hit is not None and hit[0] is obj:
            return hit[1]
        val = fn(obj)
        self.state.per_forward[key] = (obj, val)
        return val

    def _prefill_layer_inputs(self, index: int, args: tuple, kwargs: dict[str, Any], cut: tp.Cut, stage: int,
                              at_cut: bool):
        plan = cut.plan
        hidden = args[0] if args else kwargs["hidden_states"]
        if at_cut:
            hidden = tp.gather_seq(hidden, cut.local)
            if cut.replace:
                hidden = hidden.clone()
                for b, slots, values in cut.replace:
                    hidden[b, slots.to(hidden.device)] = values.to(hidden.dtype)
        past = kwargs.get("past_key_values")
        kv_slots = past.get_mask_sizes(hidden.shape[1], index)[0] if past is not None else hidden.shape[1]
        out = dict(kwargs)
        out.pop("hidden_states", None)
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            out["position_embeddings"] = self._cached(pe, lambda p: self._prefill_rope(p, plan, hidden), stage)
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor) and pos.shape[-1] == plan.length:
            out["position_ids"] = self._cached(pos, lambda p: tp.gather_positions(p, plan), stage)
        mask = kwargs.get("attention_mask")
        as_bool, dtype = self._mask_format(mask)
        make = lambda m: tp.prefill_mask(m, plan, as_bool=as_bool, dtype=dtype, kv_slots=kv_slots)
        out["attention_mask"] = self._cached(mask, make, stage) if mask is not None else make(None)
        return (hidden,), out

    def _prefill_rope(self, pe: tuple[torch.Tensor, torch.Tensor], plan: tp.KeepPlan, hidden: torch.Tensor):
        if self.pruner.positions == "reindex":
            keep_real = (~plan.filler).long()
            if self.state.forward_attn2d is not None:
                keep_real = keep_real * tp.gather_seq(self.state.forward_attn2d.long(), plan)
            new_pos = (keep_real.cumsum(-1) - 1).clamp_min(0)
            return self.lm.rotary_emb(hidden, position_ids=new_pos)
        return tuple(tp.gather_seq(t, plan) for t in pe)

    def _decode_layer_inputs(self, index: int, args: tuple, kwargs: dict[str, Any], plan: tp.KeepPlan, stage: int):
        hidden = args[0] if args else kwargs["hidden_states"]
        q = hidden.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is None and q == 1 and self.pruner.positions == "original" and not plan.has_fillers:
            return None  # one new token sees the whole (pruned) cache at its original position: nothing to change
        past = kwargs.get("past_key_values")
        if past is not None:  # host ints for both cache kinds; a static cache's fill stays a tensor (no sync)
            kv_slots, filled = past.get_mask_sizes(q, index)[0], past.get_seq_length(index)
        else:
            kv_slots, filled = plan.new_length + q, plan.new_length
        static = past is not None and getattr(past, "is_compileable", False)
        as_bool, dtype = self._mask_format(mask)
        out = dict(kwargs)
        make = lambda m: tp.decode_mask(m, plan, q_len=q, kv_slots=kv_slots, causal_offset=filled,
                                        as_bool=as_bool, dtype=dtype, static_slots=static)
        out["attention_mask"] = self._cached(mask, make, stage) if mask is not None else make(None)
        if self.pruner.positions == "reindex":
            pe = kwargs.get("position_embeddings")
            pos = kwargs.get("position_ids")
            if pe is not None and pos is not None:
                out["position_embeddings"] = self.lm.rotary_emb(hidden, position_ids=pos - plan.dropped.view(-1, 1))
        return args, out

    # ------------------------------------------------------------------ kept slots, for steering methods
    def prompt_slots(self, layer: int) -> tp.KeepPlan | None:
        """Which prompt positions fill the first slots of LLM layer ``layer``'s sequence (and KV cache), as a plan in
        prompt coordinates (fillers on the left); the slots after them are the tokens after the prompt, in order.

        None when the layer sees the whole prompt (no pruner, no decision yet, or a layer before every cut). Read
        by a mitigator whose per-column tensors follow the prompt (GIFT); valid once the pruner has decided the
        cuts up to ``layer``, i.e. inside that layer's forward.
        """
        st = self.state
        if self.pruner is None or st.plan is None:
            return None
        plan = st.plan if self.has_pre else None
        stage = self._stage_of[layer] if self.llm_cuts else -1
        if 0 <= stage < len(st.cuts):
            plan = tp.compose(plan, st.cuts[stage].plan)
        return plan

    # ------------------------------------------------------------------ score computations
    def rotated_qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE q [B,H,L,d] and k [B,H,L,d] (k repeated to H) of layer K-1, from captured projections."""
        cap = self.state.captured
        if "qk" in cap:
            return cap["qk"]
        attn = cap["attn"]
        head_dim = attn.head_dim
        n = self.state.coords.length  # the decision reads the prompt only (assisted decoding appends drafts)
        q = cap["q"][:, :n]
        k = cap["k"][:, :n]
        bsz, length = q.shape[:2]
        q = q.view(bsz, length, -1, head_dim).transpose(1, 2)
        k = k.view(bsz, length, -1, head_dim).transpose(1, 2)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        if rope is None:
            raise UnsupportedModelError(f"cannot find apply_rotary_pos_emb next to {type(attn).__name__}")
        cos, sin = (t[..., :n, :] for t in cap["position_embeddings"])
        q, k = rope(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        cap["qk"] = (q, k)
        return q, k

    def last_query_attention(self) -> torch.Tensor:
        """[B, H, L] softmax attention of each sample's last real token at layer K-1 (one row per sample)."""
        cap = self.state.captured
        if "last_attn" in cap:
            return cap["last_attn"]
        q, k = self.rotated_qk()
        bsz, _, length, _ = q.shape
        am = self.state.coords.attn2d
        if am is not None and am.shape[-1] == length:
            last = (am.long() * torch.arange(length, device=q.device)).argmax(-1)
            valid = am.bool()
        else:
            last = torch.full((bsz,), length - 1, device=q.device, dtype=torch.long)
            valid = torch.ones(bsz, length, dtype=torch.bool, device=q.device)
        q_last = q[torch.arange(bsz, device=q.device), :, last]                  # [B, H, d]
        logits = torch.einsum("bhd,bhld->bhl", q_last.float(), k.float()) * cap["attn"].scaling
        causal = torch.arange(length, device=q.device)[None] <= last[:, None]
        logits = logits.masked_fill(~(valid & causal)[:, None, :], float("-inf"))
        cap["last_attn"] = logits.softmax(-1)
        return cap["last_attn"]

    def text_rows_attention(self, sample: int) -> torch.Tensor:
        """[H, R, L] softmax attention of one sample's text rows after its first image (layer K-1).

        Only these R query rows are computed (O(R * L)); padding keys are masked, causality holds.
        """
        q, k = self.rotated_qk()
        st = self.state
        length = q.shape[2]
        rows = self.text_row_positions(sample)
        logits = torch.einsum("hrd,hld->hrl", q[sample][:, rows].float(), k[sample].float()) * st.captured["attn"].scaling
        cols = torch.arange(length, device=q.device)
        allowed = cols[None, :] <= rows[:, None]
        am = st.coords.attn2d
        if am is not None and am.shape[-1] == length:
            allowed = allowed & am[sample].bool()[None, :]
        return logits.masked_fill(~allowed[None], float("-inf")).softmax(-1)

    def text_row_positions(self, sample: int) -> torch.Tensor:
        """Positions of the non-padding text tokens after the sample's first image span (in the cut's coordinates)."""
        st = self.state
        if st.coords is not None and st.coords.text_rows is not None:
            return st.coords.text_rows[sample]
        vis = st.visual_positions[sample]
        length = st.input_ids.shape[1]
        start = int(vis[st.spans[sample][0][1] - 1]) + 1 if vis.numel() else 0
        pos = torch.arange(start, length, device=vis.device)
        is_vis = torch.zeros(length, dtype=torch.bool, device=vis.device)
        is_vis[vis] = True
        keep = ~is_vis[pos]
        if st.attn2d is not None:
            keep = keep & st.attn2d[sample, pos].bool()
        return pos[keep]

    # ------------------------------------------------------------------ report
    def report(self) -> dict[str, Any]:
        pruner = self.pruner
        rep: dict[str, Any] = {"host": self.family, "method": pruner.name if pruner else None,
                               "stage": pruner.stage if pruner else None, "layer": self.layer,
                               "n_layers": self.n_layers, "prompts": self.prompts,
                               "method_seconds": self.timer.total, "method_seconds_by_section": dict(self.timer.seconds)}
        if self.steering:
            rep["steering"] = [s.report() for s in self.steering]
        last = self.last
        if last is None:
            return rep
        n_vis = sum(last["visual"]) / max(1, len(last["visual"]))
        per_layer = [n_vis] * self.n_layers
        for layer, kept_cut in zip(last["layers"], last["kept_per_cut"]):
            mean = sum(kept_cut) / max(1, len(kept_cut))
            per_layer[layer:] = [mean] * (self.n_layers - layer)
        # the papers' "equal token" count (SparseVLM, AdaptInfer): the layer before a cut counts its *output*
        equal_token = per_layer[1:] + per_layer[-1:]
        text = last["length"] - n_vis
        dense = prefill_flops(self.text_config, [last["length"]] * self.n_layers)
        pruned = prefill_flops(self.text_config, [text + n for n in per_layer])
        rep.update({
            "cut_layers": list(last["layers"]),
            "visual_tokens_per_layer": per_layer,
            "visual_tokens_input": per_layer[0],
            "equivalent_budget": sum(per_layer) / self.n_layers,
            "equal_token_budget": sum(equal_token) / self.n_layers,
            "kept_per_cut_per_sample": last["kept_per_cut"],
            "visual_tokens_per_sample": last["visual"],
            "kept_after_layer_per_sample": last["kept"],
            "kept_visual_index": [sorted(int(i) for i in t.tolist()) for t in last["kept_visual_index"]],
            "prefill_tflops": {"dense": dense / 1e12, "pruned": pruned / 1e12, "ratio": pruned / dense},
        })
        return rep


@register_vlm_handler("visual_token_pruner")
def _install_pruners(adapter: VLMAdapter, pruners: list[MethodConfig], hooks: HookSet) -> None:
    if len(pruners) != 1:
        raise ConfigError(f"apply exactly one pruner to a VLM at a time, got {[m.name for m in pruners]}")
    adapter.install_pruner(pruners[0], hooks)  # type: ignore[arg-type]


@dataclasses.dataclass
class SampleView:
    """The :class:`~mmeff.pruners.base.ScoreView` of one sample (lazy, computes only what is asked)."""

    adapter: VLMAdapter
    sample: int
    hidden: torch.Tensor | None = None
    feats: list[torch.Tensor] | None = None
    cut: int = 0
    layer: int = 0

    @property
    def _vis(self) -> torch.Tensor:
        """Slots of the sample's surviving visual tokens in the sequence this cut sees."""
        return self.adapter.state.coords.visual[self.sample]

    @property
    def n_visual(self) -> int:
        return int(self._vis.numel())

    @property
    def spans(self) -> list[tuple[int, int]]:
        return self.adapter.state.coords.spans[self.sample]

    @property
    def carry(self) -> dict[str, torch.Tensor]:
        """Per-token values [n_visual] the method stores here; the host gathers them through every later cut."""
        return self.adapter.state.coords.carry[self.sample]

    @property
    def text_positions(self) -> torch.Tensor:
        """Slots of the text tokens after the first image (the rows ``text_rows_attention`` computes)."""
        return self.adapter.text_row_positions(self.sample)

    @property
    def visual_positions(self) -> torch.Tensor:
        """Slots of the surviving visual tokens (columns of ``text_rows_full_attention``)."""
        return self._vis

    def get(self, name: str) -> torch.Tensor:
        """A registered quantity (:func:`register_vlm_score`) for this sample at this cut."""
        fn = _SCORES.get(name)
        if fn is None:
            raise ConfigError(f"no VLM score {name!r} is registered; known: {sorted(_SCORES)}")
        return fn(self)

    def replace_hidden(self, local: torch.Tensor, values: torch.Tensor) -> None:
        """In-LLM cuts: the kept tokens ``local`` (indices into this view's visual tokens) enter the next layer with
        hidden states ``values`` [n, D] instead of their own (token merging / recycling)."""
        if self.hidden is None:
            raise ConfigError("replace_hidden is only available to in-LLM cuts")
        self.adapter.state.pending_replace[self.sample] = (local, values)

    def text_rows_full_attention(self) -> torch.Tensor:
        """[H, R, L] attention of the R text rows over the whole sequence this cut sees (rows only, no L x L)."""
        return self.adapter.text_rows_attention(self.sample)

    def last_query_attention(self) -> torch.Tensor:
        return self.adapter.last_query_attention()[self.sample][:, self._vis]

    def query_states(self) -> torch.Tensor:
        q, _ = self.adapter.rotated_qk()
        return q[self.sample][:, self._vis].transpose(0, 1)

    def key_states(self) -> torch.Tensor:
        """[n_visual, H, d] post-RoPE keys of layer K-1 (KV heads repeated to H)."""
        _, k = self.adapter.rotated_qk()
        return k[self.sample][:, self._vis].transpose(0, 1)

    def text_rows_attention(self) -> torch.Tensor:
        """[H, R, n_visual] attention from the R text rows after the image to the visual tokens."""
        return self.adapter.text_rows_attention(self.sample)[:, :, self._vis]

    def hidden_states(self) -> torch.Tensor:
        if self.hidden is None:
            raise ConfigError("hidden states are only available to in-LLM pruners")
        return self.hidden[self.sample, self._vis]

    def features(self) -> torch.Tensor:
        if self.feats is None:
            raise ConfigError("image features are only available to pre-LLM pruners")
        return torch.cat(self.feats, 0)

    def projector_probe(self) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """(rows [n_visual, d_in], valid [n_visual], projector callable) of this sample (pre-LLM, ``needs`` "projector")."""
        if self.feats is None or not self.adapter.projector_rows:
            raise ConfigError("the projector's input is only available to pre-LLM pruners that declare needs={'projector'}")
        first = sum(len(s) for s in self.adapter.state.spans[:self.sample])
        mine = self.adapter.projector_rows[first:first + len(self.spans)]
        rows = torch.cat([r.rows for r in mine], 0)
        valid = torch.cat([r.valid for r in mine], 0)
        return rows, valid, projector_probe.projector_fn(self.adapter)

    def vit_maps(self) -> list[Any]:
        """Per image of this sample: the ViT importance map laid out on its visual tokens (vision stage)."""
        maps = self.adapter.state.vit_maps
        if not maps:
            raise ConfigError("ViT importance maps are only available to pruners that declare 'vit_importance'")
        return maps[self.sample]

    def vflowopt_params(self, n_visual: int) -> Any:
        """VFlowOpt's resolved hyperparameters for an image of ``n_visual`` tokens."""
        return self.adapter.vision_stage.params(n_visual)

    def set_recycling(self, merges: list[Any]) -> None:
        """Record this sample's per-image merges, applied to the features before ``inputs_embeds`` (VFlowOpt)."""
        st = self.adapter.state
        if not st.recycling:
            st.recycling = [[None] * len(sp) for sp in st.spans]
        st.recycling[self.sample] = merges

    def generator(self) -> torch.Generator:
        ids = self.adapter.state.input_ids[self.sample]
        am = self.adapter.state.attn2d
        if am is not None:
            ids = ids[am[self.sample].bool()]
        digest = zlib.crc32(ids.cpu().numpy().tobytes())
        seed = getattr(self.adapter.pruner, "seed", 0)
        return torch.Generator().manual_seed((seed * 1_000_003 + digest) % (2 ** 63))


for _name in ("last_query_attention", "query_states", "key_states", "text_rows_attention", "hidden_states",
              "features", "text_rows_full_attention"):
    register_vlm_score(_name)(getattr(SampleView, _name))


def _runs(pos: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous runs of global positions, as [start, end) in local (0..n) indices: one run per image."""
    if pos.numel() == 0:
        return []
    breaks = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    starts = [0] + breaks.tolist()
    ends = breaks.tolist() + [int(pos.numel())]
    return list(zip(starts, ends))


"""VHR: Vision-aware Head Reinforcement (He et al., ACL 2025; reference §8), spec name ``vhr``.

At a new prompt's prefill the same conversation without the image runs once through the language model
(:mod:`.no_image`); then, layer by layer in the with-image prefill, the ``o_proj`` pre-hook of each layer in
``layers`` reads the per-head outputs at the prompt's last position, selects the heads whose output moves
most when the image is removed (:mod:`.vhd`), and scales their slice of the ``o_proj`` input by ``alpha``
at every position, so later layers see the reinforced states (the paper's lockstep). The heads are frozen
for every later forward of that prompt (decode steps, ``use_cache=False`` continuations), which keeps the
KV cache consistent. Only ``o_proj`` inputs change, so SDPA / flash attention stay on.

Choices where the paper is open (reference §8, Ambiguities), documented in docs/hallucination.md:
(a) the no-image branch is *not* reinforced (it runs before the with-image prefill, unsteered);
(b) the scale applies to all prompt positions (consistent KV); (c) the no-image prompt is the prompt
minus its image placeholder tokens. Default ``layers``: the paper's {1} ∪ last 14 of 32, scaled to depth.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from ..core.config import require
from ..core.errors import IncompatibleFeatureError
from ..core.hooks import HookSet
from ..core.registry import register_method
from . import prompt_track as pt
from .base import MitigatorConfig, scaled_layers
from .no_image import run_text_only, strip_image_tokens
from .vhd import select_heads

if TYPE_CHECKING:  # pragma: no cover
    from ..hosts.vlm_base import VLMAdapter


@register_method
@dataclasses.dataclass(frozen=True)
class VHR(MitigatorConfig):
    """Scale the ``o_proj`` input of the most vision-sensitive heads by ``alpha`` (chosen per sample).

    ``layers``: LLM layers to reinforce (default: {1} ∪ the last 14/32 of the layers); ``alpha``: the scale
    (paper: 2; 1 is dense exactly); ``outliers``: Eq. 6 outlier zeroing; ``squared``: squared distance.
    """

    name: ClassVar[str] = "vhr"
    alpha: float = 2.0
    layers: tuple[int, ...] | None = None
    outliers: bool = True
    squared: bool = False

    def validate(self) -> None:
        require(self.alpha > 0, f"vhr: alpha must be > 0 (paper: 2; 1 = dense), got {self.alpha}")
        require(self.layers is None or (len(self.layers) > 0 and min(self.layers) >= 0),
                f"vhr: layers must be non-negative LLM layer indices, got {self.layers}")

    def resolve_layers(self, n_layers: int) -> tuple[int, ...]:
        layers = self.layers if self.layers is not None else scaled_layers(n_layers, (1,), 14, 32)
        require(max(layers) < n_layers, f"vhr: layer {max(layers)} does not exist; the model has {n_layers} LLM layers")
        return tuple(sorted(set(layers)))

    def install(self, adapter: "VLMAdapter", hooks: HookSet) -> "VHRRuntime":
        runtime = VHRRuntime(self, adapter, self.resolve_layers(adapter.n_layers))
        runtime.install(hooks)
        return runtime


class VHRRuntime:
    """The hooks and per-prompt state of one applied :class:`VHR`."""

    def __init__(self, config: VHR, adapter: "VLMAdapter", layers: tuple[int, ...]) -> None:
        self.config, self.adapter, self.layers = config, adapter, layers
        self.prompt = pt.PromptState()
        self.no_img: dict[int, torch.Tensor] = {}      # layer -> [B, H, d] text-only head outputs (last position)
        self.scales: dict[int, torch.Tensor] = {}      # layer -> [B, H] per-head scale, frozen for the prompt
        self.selected: dict[int, torch.Tensor] = {}    # layer -> [B, H] bool
        self.capturing = False
        self.prompts = 0

    def install(self, hooks: HookSet) -> None:
        hooks.pre_hook(self.adapter.model, self._on_forward)
        for i in self.layers:
            hooks.pre_hook(self.adapter.layers[i].self_attn.o_proj, self._o_proj_hook(i), with_kwargs=False)
        hooks.on_remove(self._reset)

    def _reset(self) -> None:
        self.prompt, self.no_img, self.scales, self.selected = pt.PromptState(), {}, {}, {}

    # ------------------------------------------------------------------ per forward
    def _on_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
        self.prompt = pt.classify(self.prompt, kwargs, self.adapter.image_token_id, self.config.name)
        if self.prompt.phase == pt.NEW:
            if self.prompt.last_index() is not None and self.adapter.pruner is not None:
                raise IncompatibleFeatureError(
                    "vhr with a pruner needs left padding (the prompt's last token in the last column); set "
                    "tokenizer.padding_side = 'left'"
                )
            self.scales, self.selected, self.prompts = {}, {}, self.prompts + 1
            self._run_no_image_branch()
        return None

    def _run_no_image_branch(self) -> None:
        """Capture the text-only head outputs at the last position of every reinforced layer."""
        ad = self.adapter
        pad = getattr(ad.model.config, "pad_token_id", None) or getattr(ad.text_config, "pad_token_id", None) or 0
        ids, mask = strip_image_tokens(self.prompt.input_ids, self.prompt.attn2d, ad.image_token_id, int(pad))
        self.no_img = {}
        self.capturing = True
        try:
            with ad.suspended():
                run_text_only(ad.model, ad.lm, ids, mask)
        finally:
            self.capturing = False

    def _o_proj_hook(self, layer: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple):
            x = args[0]
            if self.capturing:
                self.no_img[layer] = self._heads(x[:, -1]).detach()
                return None
            phase = self.prompt.phase
            if phase == pt.OFF:
                return None
            if phase == pt.NEW and layer not in self.scales:
                self._select(layer, x)
            scale = self.scales[layer]
            if x.shape[0] != scale.shape[0]:
                raise IncompatibleFeatureError(
                    f"vhr: {x.shape[0]} rows reach layer {layer} but the prompt had {scale.shape[0]}; a cache can "
                    "only be continued by the batch whose prompt filled it (run the prompt again without past_key_values)"
                )
            per_channel = scale.repeat_interleave(x.shape[-1] // scale.shape[-1], dim=-1).to(x.dtype)
            return (x * per_channel[:, None, :],)
        return hook

    def _heads(self, flat: torch.Tensor) -> torch.Tensor:
        """[B, H*d] -> [B, H, d]."""
        n_heads = self.adapter.text_config.num_attention_heads
        return flat.reshape(flat.shape[0], n_heads, -1)

    @torch.no_grad()
    def _select(self, layer: int, x: torch.Tensor) -> None:
        last = self.prompt.last_index()
        rows = x[:, -1] if last is None else x[torch.arange(x.shape[0], device=x.device), last.to(x.device)]
        chosen, _ = select_heads(self._heads(rows), self.no_img[layer].to(x.device),
                                 outliers=self.config.outliers, squared=self.config.squared)
        self.selected[layer] = chosen
        ones = torch.ones(chosen.shape, dtype=torch.float32, device=x.device)
        self.scales[layer] = torch.where(chosen, ones * self.config.alpha, ones)

    def report(self) -> dict[str, Any]:
        return {"mitigator": "vhr", "alpha": self.config.alpha, "layers": list(self.layers),
                "prompts": self.prompts,
                "selected_heads": {int(k): v.nonzero().tolist() for k, v in self.selected.items()}}

"""GIFT: gaze-shift-guided cross-modal fusion enhancement (Qi et al., ICML 2026; reference §7), spec ``gift``.

At a new prompt's prefill, the saliency layers' pre-hooks recompute the attention rows of the question
tokens (and the token before them) from the layer's own q/k (:mod:`.attn_rows`; never the L x L map), and
turn the rise of attention on each visual token into weights ``w_v`` (:mod:`.gift_math`). From then on,
every attention row that predicts a generated token (the last prompt row, every decode row, and those rows
in a ``use_cache=False`` continuation) gets, in each enhancement layer, ``log w`` added on the visual columns
of its vision-heavy heads and ``log r`` on the question columns of its text-heavy heads, passed to SDPA as
an additive float ``attention_mask``: fast attention stays on.

Spans come from the prompt itself, not from template offsets: the question is the text after the (last)
image, up to the end-of-turn token the chat template closes the user turn with (the model's EOS id);
without one, all text after the image. Informative words: :mod:`.query_words` (spaCy when installed,
else a documented stop-list tagger); no informative word -> all question tokens; no tokenizer -> all
question tokens (reported). This single-pass form needs every enhancement layer after the saliency layers
(the official Qwen2-VL config, saliency 14 / enhancement 5-18, needs a second prefill and is refused).

With a pruner, every layer's rows and columns are that layer's kept slots (:mod:`.kept_slots`, from the host's
``prompt_slots``): saliency over the surviving visual tokens, the bias gathered onto each enhancement layer's cache.
"""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from ..core.config import require
from ..core.errors import IncompatibleFeatureError
from ..core.hooks import HookSet
from ..core.registry import register_method
from . import attn_rows as ar
from . import gift_math as gm
from . import kept_slots as ks
from . import prompt_track as pt
from .base import MitigatorConfig
from .query_words import informative_tokens, tagger_name

if TYPE_CHECKING:  # pragma: no cover
    from ..hosts.vlm_base import VLMAdapter


@register_method
@dataclasses.dataclass(frozen=True)
class GIFT(MitigatorConfig):
    """Amplify attention to gaze-shift-salient visual tokens at decode (``alpha = 0`` is dense exactly).

    ``alpha``: weight strength (paper: 5 for LLaVA-1.5, 4 for Qwen2-VL); ``saliency_layers`` /
    ``layers``: default the LLaVA-1.5-7B config ({11} and 12-22 of 32) scaled to the model's depth;
    ``tokenizer``: a local tokenizer folder for the POS filter (default: the model's own folder when local).
    """

    name: ClassVar[str] = "gift"
    alpha: float = 5.0
    saliency_layers: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None
    tokenizer: str | None = None

    def validate(self) -> None:
        require(self.alpha >= 0, f"gift: alpha must be >= 0 (paper: 4-5; 0 = dense), got {self.alpha}")
        for name, v in (("saliency_layers", self.saliency_layers), ("layers", self.layers)):
            require(v is None or (len(v) > 0 and min(v) >= 0), f"gift: {name} must be non-empty LLM layer indices, got {v}")

    def resolve(self, n_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        sal = self.saliency_layers if self.saliency_layers is not None else (round(11 * n_layers / 32),)
        if self.layers is not None:
            enh = self.layers
        else:
            start = max(max(sal) + 1, round(12 * n_layers / 32))
            enh = tuple(range(start, max(start, round(22 * n_layers / 32)) + 1))
        top = max(max(sal), max(enh))
        require(top < n_layers, f"gift: layer {top} does not exist; the model has {n_layers} LLM layers")
        require(min(enh) > max(sal), f"gift: enhancement layers {enh} must all come after the saliency layers {sal} "
                                     "(the saliency is read in the same prefill); move them later")
        return tuple(sorted(set(sal))), tuple(sorted(set(enh)))

    def install(self, adapter: "VLMAdapter", hooks: HookSet) -> "GIFTRuntime":
        sal, enh = self.resolve(adapter.n_layers)
        runtime = GIFTRuntime(self, adapter, sal, enh)
        runtime.install(hooks)
        return runtime


def _load_tokenizer(config: GIFT, model: torch.nn.Module) -> Any | None:
    """The tokenizer for the POS filter: the given folder, else the model's own local folder, else None."""
    path = config.tokenizer or getattr(model, "name_or_path", "") or ""
    if not path or not os.path.isdir(path):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - no usable tokenizer: fall back to all question tokens (reported)
        return None


class GIFTRuntime:
    """Hooks and per-prompt state of one applied :class:`GIFT`."""

    def __init__(self, config: GIFT, adapter: "VLMAdapter", saliency: tuple[int, ...], layers: tuple[int, ...]) -> None:
        self.config, self.adapter = config, adapter
        self.saliency_layers, self.layers = saliency, layers
        self.prompt = pt.PromptState()
        self.tokenizer = _load_tokenizer(config, adapter.model)
        self.end_ids = _end_of_turn_ids(adapter.model)
        self.skip_ids = {int(getattr(adapter.model.config, k)) for k in ("vision_end_token_id", "vision_start_token_id")
                         if getattr(adapter.model.config, k, None) is not None}
        self.visual: list[torch.Tensor] = []         # per sample: prompt positions of the image tokens
        self.query: list[torch.Tensor] = []          # per sample: prompt positions of the question tokens
        self.informative: list[torch.Tensor] = []    # per sample: bool per question token
        self.shifts: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per sample, per saliency layer:
        #                                              (prompt positions of the visual tokens it saw [V'], saliency [V'])
        self.log_w: torch.Tensor | None = None       # [B, prompt_len] log weight per prompt position
        self.visual_cols: torch.Tensor | None = None  # [B, prompt_len] bool
        self.query_cols: torch.Tensor | None = None   # [B, prompt_len] bool
        self.layer_cols: dict[int, tuple[torch.Tensor, ...]] = {}  # layer -> column table, log w, query over its slots
        self.forward_len = 0
        self.prompts = 0
        self.fallbacks = 0

    def install(self, hooks: HookSet) -> None:
        hooks.pre_hook(self.adapter.model, self._on_forward)
        if self.config.alpha == 0:  # exp(0 * s) = 1 and r = 1: the bias is zero, nothing to install
            return
        for i in self.saliency_layers:
            hooks.pre_hook(self.adapter.layers[i].self_attn, self._saliency_hook(i))
        for i in self.layers:
            hooks.pre_hook(self.adapter.layers[i].self_attn, self._enhance_hook(i))
        hooks.on_remove(self._reset)

    def _reset(self) -> None:
        self.prompt = pt.PromptState()
        self.log_w = None

    # ------------------------------------------------------------------ per forward
    def _on_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
        self.prompt = pt.classify(self.prompt, kwargs, self.adapter.image_token_id, self.config.name)
        ids = kwargs.get("input_ids")
        self.forward_len = int(ids.shape[1]) if ids is not None else 0
        if self.prompt.phase == pt.NEW:
            if self.prompt.last_index() is not None:
                raise IncompatibleFeatureError("gift needs left padding (each prompt's last token in the last column); "
                                               "set tokenizer.padding_side = 'left'")
            self.prompts += 1
            self._new_prompt()
        return None

    def _new_prompt(self) -> None:
        ids, mask = self.prompt.input_ids, self.prompt.attn2d
        self.visual, self.query, self.informative = [], [], []
        for b in range(ids.shape[0]):
            row = ids[b]
            valid = mask[b].bool() if mask is not None else torch.ones_like(row, dtype=torch.bool)
            vis = torch.nonzero((row == self.adapter.image_token_id) & valid).flatten()
            self.visual.append(vis)
            q = self._question_positions(row, int(vis[-1]) + 1)
            self.query.append(q)
            self.informative.append(self._informative(row[q]))
        self.shifts = [[] for _ in range(ids.shape[0])]
        self.log_w = None

    def _question_positions(self, row: torch.Tensor, start: int) -> torch.Tensor:
        """The question's token positions: after the image (and its closing marker), up to the end of the turn."""
        length = row.shape[0]
        while start < length and int(row[start]) in self.skip_ids:
            start += 1
        end = length
        for j in range(start, length):
            if int(row[j]) in self.end_ids:
                end = j
                break
        return torch.arange(start, end, device=row.device)

    def _informative(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tokenizer is None or ids.numel() == 0:
            return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)  # -> all question tokens
        flags = informative_tokens(ids.tolist(), self.tokenizer.convert_ids_to_tokens)
        return torch.tensor(flags, dtype=torch.bool, device=ids.device)

    # ------------------------------------------------------------------ saliency (prefill of a new prompt)
    def _saliency_hook(self, layer: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
            if self.prompt.phase != pt.NEW or self.log_w is not None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            slots = ks.LayerSlots.of(self.adapter, layer, self.prompt)
            for b in range(hidden.shape[0]):
                self.shifts[b].append(self._sample_saliency(module, hidden[b:b + 1], cos[b:b + 1] if cos.shape[0] > 1 else cos,
                                                            sin[b:b + 1] if sin.shape[0] > 1 else sin, b, slots))
            if layer == self.saliency_layers[-1]:
                self._finish_weights(self.prompt.input_ids.shape[1], hidden.device)
            return None
        return hook

    @torch.no_grad()
    def _sample_saliency(self, attn: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         b: int, slots: ks.LayerSlots) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt positions of the visual tokens this layer sees, their saliency) for sample ``b``.

        On a pruned layer the rows and columns are the layer's own slots: the question rows, the slot just
        before the first of them, and the surviving visual tokens (GIFT on the kept sequence).
        """
        vis_pos, vis = slots.visual(b, self.visual[b])
        if self.query[b].numel() == 0:
            return vis_pos, torch.zeros(vis.numel(), device=hidden.device)
        q_slots = slots.rows(b, self.query[b])
        rows = torch.cat([q_slots[:1] - 1, q_slots])
        q = ar.rotated(attn, hidden[:, rows], attn.q_proj, cos[..., rows, :], sin[..., rows, :])
        k = ar.rotated(attn, hidden, attn.k_proj, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = torch.einsum("hrd,hkd->hrk", q[0].float(), k[0].float()) * attn.scaling
        cols = torch.arange(hidden.shape[1], device=hidden.device)
        allowed = cols[None, :] <= rows[:, None]
        valid = slots.valid(b, self.prompt.attn2d, hidden.shape[1])
        if valid is not None:
            allowed = allowed & valid[None, :]
        probs = logits.masked_fill(~allowed[None], float("-inf")).softmax(-1)
        shift = gm.gaze_shift(probs[:, :, vis], self.informative[b])
        return vis_pos, gm.layer_saliency(shift)

    @torch.no_grad()
    def _finish_weights(self, length: int, device: torch.device) -> None:
        """Per-prompt-position weights from the saliency layers; with a pruner, only the visual tokens that
        survive up to the last saliency layer get a weight (an earlier layer's saliency is read at those tokens)."""
        bsz = len(self.shifts)
        self.log_w = torch.zeros(bsz, length, device=device)
        self.visual_cols = torch.zeros(bsz, length, dtype=torch.bool, device=device)
        self.query_cols = torch.zeros(bsz, length, dtype=torch.bool, device=device)
        for b in range(bsz):
            if not bool(self.informative[b].any()):
                self.fallbacks += 1
            kept = self.shifts[b][-1][0]
            s = torch.stack([v if pos.numel() == kept.numel() else v[torch.searchsorted(pos, kept)]
                             for pos, v in self.shifts[b]]).mean(0)
            w = gm.visual_weights(s, self.config.alpha) if self.query[b].numel() and s.numel() else torch.ones_like(s)
            self.log_w[b, kept] = w.log()
            self.visual_cols[b, kept] = True
            self.query_cols[b, self.query[b]] = True
        self.layer_cols = {}

    # ------------------------------------------------------------------ enhancement (rows predicting tokens)
    def _rows_to_steer(self, q_len: int) -> int:
        phase = self.prompt.phase
        if phase == pt.NEW:
            return 1
        if phase == pt.CONTINUE:
            return self.forward_len - self.prompt.input_ids.shape[1] + 1
        return q_len

    def _enhance_hook(self, layer: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
            if self.prompt.phase == pt.OFF or self.log_w is None:
                return None
            if args:
                kwargs = {"hidden_states": args[0], **kwargs}
            hidden = kwargs["hidden_states"]
            if hidden.shape[0] != self.log_w.shape[0]:
                raise IncompatibleFeatureError(
                    f"gift: {hidden.shape[0]} rows reach layer {layer} but the prompt had {self.log_w.shape[0]}; a cache can "
                    "only be continued by the batch whose prompt filled it (run the prompt again without past_key_values)"
                )
            q_len = hidden.shape[1]
            n = self._rows_to_steer(q_len)
            with torch.no_grad():  # the bias is a constant of the forward, like a mask
                probs, allowed = ar.last_rows_probs(module, kwargs, n, layer)
                k_len = probs.shape[-1]
                table, log_w, query = self._columns(layer, k_len)
                bias = gm.enhancement_bias(probs, log_w, None, query, table=table).to(hidden.dtype)
                if n == q_len:  # every row of the forward is steered (a decode step): the mask is the bias itself
                    mask = bias if allowed is None else bias.masked_fill(~allowed, torch.finfo(hidden.dtype).min)
                else:
                    if allowed is not None:
                        bias = bias.masked_fill(~allowed, 0.0)
                    mask = ar.full_float_mask(kwargs.get("attention_mask"), q_len, k_len, hidden.dtype, hidden.device)
                    mask = mask.expand(hidden.shape[0], probs.shape[1], q_len, k_len).clone()
                    mask[:, :, q_len - n:, :] += bias
            out = dict(kwargs)
            out["attention_mask"] = mask
            return (), out
        return hook

    def _columns(self, layer: int, k_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(:func:`gift_math.column_table`, ``log w``, question flags) over the layer's ``k_len`` key columns.

        The prompt part follows the layer's kept slots (:meth:`VLMAdapter.prompt_slots`): dropped visual tokens
        have no column, fillers get none of the flags; generated tokens get 0 / False. Built once per prompt and
        layer, with room for later tokens, so a decode step only slices.
        """
        cols = self.layer_cols.get(layer)
        if cols is None or cols[0].shape[1] < k_len:
            plan = ks.LayerSlots.of(self.adapter, layer, self.prompt).plan
            log_w, vis, query = self.log_w, self.visual_cols, self.query_cols
            if plan is not None:
                log_w, vis, query = (t.gather(1, plan.index).masked_fill(plan.filler, 0) for t in (log_w, vis, query))
            width = max(k_len, log_w.shape[1]) + max(64, k_len // 2)
            log_w, vis, query = (torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1])], 1) for t in (log_w, vis, query))
            cols = self.layer_cols[layer] = (gm.column_table(log_w, vis, query), log_w, query)
        return cols[0][:, :k_len], cols[1][:, :k_len], cols[2][:, :k_len]

    def report(self) -> dict[str, Any]:
        return {"mitigator": "gift", "alpha": self.config.alpha, "saliency_layers": list(self.saliency_layers),
                "layers": list(self.layers), "prompts": self.prompts, "pos_tagger": tagger_name()
                if self.tokenizer is not None else "none (no tokenizer: all question tokens)",
                "samples_without_informative_words": self.fallbacks}


def _end_of_turn_ids(model: torch.nn.Module) -> set[int]:
    """Token ids that close a chat turn: the model's EOS ids (generation config, else config)."""
    ids: set[int] = set()
    for cfg in (getattr(model, "generation_config", None), model.config, getattr(model.config, "text_config", None)):
        eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        if eos is None:
            continue
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return ids

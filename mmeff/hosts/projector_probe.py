"""The projector's input row of every visual token, and the projector as a row-wise callable.

Pruners that probe the vision-language projector (ZOO-Prune perturbs its input and measures its output)
need, per visual token the LLM would see, the vector the projector consumed and a function mapping such
rows to projected features. While such a pruner is applied, hooks on the projector module record its
latest input and output (:class:`ProjectorRecorder`), so the vision tower runs once (also when ``generate()``
encodes the images before the prefill). Per family:

- LLaVA-1.5: the projector MLP's input is one CLIP patch feature per token (the order of the tokens).
- LLaVA-NeXT: the same per crop patch; packing (unpadding, newline tokens) happens after the projector and
  only moves its outputs, so each token is matched to the output row it copies. Newline tokens have no input
  (``valid`` is False there: their projected feature is a constant).
- Qwen2-VL: the PatchMerger's input is the 2x2 group of ViT patches of a merged token (4 x d_v values).
- Qwen2.5-VL: the same, but the tower works in window order and reorders the merged tokens after the
  merger; the window index of ``transformers.vision_utils`` (for the recorded grid) gives that order.

Every probe is checked once: the callable applied to the rows must reproduce the image features.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ..core.errors import UnsupportedModelError


@dataclasses.dataclass
class ProjectorRows:
    """One image: the projector input per visual token ([N, d_in]; zeros where ``valid`` is False)."""

    rows: torch.Tensor
    valid: torch.Tensor


def projector_module(adapter: Any) -> torch.nn.Module:
    """The module whose input is perturbed: the MLP projector (LLaVA) or the PatchMerger (Qwen)."""
    if adapter.family in ("llava", "llava_next"):
        return adapter.inner.multi_modal_projector
    return adapter.inner.visual.merger


@dataclasses.dataclass(frozen=True)
class RowProjector:
    """The projector as a row-wise callable ``[R, d_in] -> [R, D]``, with its MLP parts when it has the
    ``second(act(first(pre(x))))`` form (all four hosts), so sensitivity can use the structured JVP.

    ``pre`` is None when ``first`` sees the input row itself (LLaVA); Qwen's is the per-patch norm of the
    PatchMerger with the 2x2 patches flattened back into one row. ``act`` is elementwise."""

    module: torch.nn.Module
    unit: int | None = None                  # Qwen: the per-patch width the merger's norm works on
    pre: Callable[[torch.Tensor], torch.Tensor] | None = None
    first: torch.nn.Linear | None = None
    act: Callable[[torch.Tensor], torch.Tensor] | None = None
    second: torch.nn.Linear | None = None

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.module(rows if self.unit is None else rows.reshape(-1, self.unit))


def _is_mlp(seq: Any) -> bool:
    return (isinstance(seq, torch.nn.Sequential) and len(seq) == 3 and isinstance(seq[0], torch.nn.Linear)
            and isinstance(seq[2], torch.nn.Linear))


def row_projector(module: torch.nn.Module, unit: int | None = None) -> RowProjector:
    """:class:`RowProjector` of a LLaVA projector (``unit`` None) or a Qwen PatchMerger (``unit``: patch width);
    the MLP parts are filled in only where the module has the known structure."""
    if unit is None:
        if all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in ("linear_1", "linear_2")) \
                and hasattr(module, "act") and type(module).forward.__qualname__.startswith("Llava"):
            # the stock LLaVA / LLaVA-NeXT projector: linear_1 -> act -> linear_2
            return RowProjector(module, None, None, module.linear_1, module.act, module.linear_2)
        return RowProjector(module)
    mlp, norm = getattr(module, "mlp", None), getattr(module, "ln_q", None)
    if norm is None or not _is_mlp(mlp) or not type(module).forward.__qualname__.startswith(("PatchMerger.", "Qwen2_5_VLPatchMerger.")):
        return RowProjector(module, unit)
    width = mlp[0].in_features

    def pre(rows: torch.Tensor) -> torch.Tensor:
        return norm(rows.reshape(-1, unit)).reshape(-1, width)
    return RowProjector(module, unit, pre, mlp[0], mlp[1], mlp[2])


def projector_fn(adapter: Any) -> RowProjector:
    """Row-wise projector: ``[R, d_in] -> [R, D]`` (Qwen: a row is a merged token's 2x2 patches, flattened)."""
    module = projector_module(adapter)
    if adapter.family in ("llava", "llava_next"):
        return row_projector(module)
    unit = adapter.inner.visual.config.embed_dim if hasattr(adapter.inner.visual.config, "embed_dim") \
        else adapter.inner.visual.config.hidden_size
    return row_projector(module, unit)


class ProjectorRecorder:
    """Records the projector's latest input and output (and Qwen2.5's image grid) while a pruner is applied.

    ``generate()`` encodes the images itself before the prefill (``mm_encoder_outputs``), so the input must be
    caught whenever the projector runs, not only when the host asks for features.
    """

    def __init__(self, adapter: Any, hooks: Any) -> None:
        self.adapter = adapter
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.grid: torch.Tensor | None = None
        module = projector_module(adapter)
        hooks.pre_hook(module, self._on_input, with_kwargs=False)
        hooks.post_hook(module, self._on_output)
        if adapter.family == "qwen2_5_vl":
            hooks.pre_hook(adapter.inner.visual, self._on_visual)
        hooks.on_remove(self.clear)

    def _on_input(self, module: torch.nn.Module, args: tuple) -> None:
        self.x = args[0].detach()

    def _on_output(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.y = output.detach()

    def _on_visual(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

    def clear(self) -> None:
        self.x = self.y = self.grid = None

    def rows(self, feats: list[torch.Tensor]) -> list[ProjectorRows]:
        """Per image of ``feats`` (the features the LLM receives), the projector input of each token."""
        if self.x is None or self.y is None:
            raise UnsupportedModelError(f"{self.adapter.family}: the projector did not run for these image features; "
                                        "projector-probing pruners (e.g. zooprune) need the model to encode the images")
        family = self.adapter.family
        if family == "llava":
            flat = self.x.reshape(-1, self.x.shape[-1])
            out = _split_rows(flat, feats)
        elif family == "llava_next":
            out = _matched_rows(self.x.reshape(-1, self.x.shape[-1]), self.y.reshape(-1, self.y.shape[-1]), feats)
        else:
            out = _qwen_rows(self.adapter, self.x, self.grid, feats)
        _check(self.adapter, feats, out)
        return out


def _split_rows(flat: torch.Tensor, feats: list[torch.Tensor]) -> list[ProjectorRows]:
    sizes = [int(f.shape[0]) for f in feats]
    if sum(sizes) != flat.shape[0]:
        raise UnsupportedModelError(f"{flat.shape[0]} projector rows for {sum(sizes)} image tokens; projector-probing "
                                    "pruners need one projector row per image token")
    return [ProjectorRows(r, torch.ones(r.shape[0], dtype=torch.bool, device=r.device)) for r in torch.split(flat, sizes)]


def _matched_rows(x: torch.Tensor, y: torch.Tensor, feats: list[torch.Tensor]) -> list[ProjectorRows]:
    """LLaVA-NeXT: packing (crop layout, unpadding, newlines) only moves projector outputs, so every token's
    feature is bit-equal to the projector output of its row; newline tokens match none (``valid`` False)."""
    where = {}
    for i, row in enumerate(y.cpu().numpy()):
        where.setdefault(row.tobytes(), i)
    out = []
    for f in feats:
        ids = torch.tensor([where.get(r.tobytes(), -1) for r in f.detach().cpu().numpy()], dtype=torch.long,
                           device=x.device)
        valid = ids >= 0
        out.append(ProjectorRows(torch.where(valid[:, None], x[ids.clamp_min(0)], 0.0), valid))
    return out


def _qwen_rows(adapter: Any, x: torch.Tensor, grid: torch.Tensor | None,
               feats: list[torch.Tensor]) -> list[ProjectorRows]:
    """Qwen2-VL / 2.5-VL: one row per merged token (its 2x2 patches), in the order of the image tokens."""
    visual = adapter.inner.visual
    merge = visual.spatial_merge_size
    rows = x.reshape(-1, x.shape[-1] * merge * merge)
    if adapter.family == "qwen2_5_vl":  # the tower works in window order and restores the order after the merger
        from transformers.vision_utils import get_vision_window_index

        if grid is None:
            raise UnsupportedModelError("qwen2_5_vl: the vision tower's grid_thw was not seen; cannot order the rows")
        window_index, _ = get_vision_window_index(grid, spatial_merge_size=merge, window_size=visual.window_size,
                                                  patch_size=visual.patch_size, kwargs={})
        rows = rows[torch.argsort(window_index.to(rows.device))]
    return _split_rows(rows, feats)


@torch.no_grad()
def _check(adapter: Any, feats: list[torch.Tensor], rows: list[ProjectorRows]) -> None:
    """The callable on the rows must give the features the LLM receives (else the mapping is wrong)."""
    fn = projector_fn(adapter)
    if len(feats) != len(rows):
        raise UnsupportedModelError(f"{adapter.family}: {len(rows)} images of projector rows for {len(feats)} images")
    for f, r in zip(feats, rows):
        got = fn(r.rows[r.valid])
        if fn.first is not None:  # the MLP parts the structured JVP uses must compose to the same function
            x = r.rows[r.valid]
            parts = fn.second(fn.act(fn.first(x if fn.pre is None else fn.pre(x))))
            if not torch.allclose(parts, got, atol=1e-5, rtol=1e-4):
                raise UnsupportedModelError(f"{adapter.family}: the projector's MLP parts do not compose to its output")
        if got.shape != f[r.valid].shape or not torch.allclose(got, f[r.valid], atol=1e-4, rtol=1e-3):
            raise UnsupportedModelError(
                f"{adapter.family}: the projector applied to its recorded input does not reproduce the image "
                "features; this model's vision path is not supported by projector-probing pruners (e.g. zooprune)")

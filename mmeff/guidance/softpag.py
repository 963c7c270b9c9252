"""SoftPAG: head-level perturbed-attention guidance with a continuous strength u (arXiv 2506.10978).

For the selected (layer, head) pairs the perturbed branch uses ``A_soft = (1 - u) * A + u * I``. Because the
map is linear in A, the perturbed head output is ``(1 - u) * Attn(Q, K, V) + u * V``: normal (flash-compatible)
attention plus one axpy, no N x N map. Modes:

- ``"joint_identity"`` (HeadHunter): identity over the whole joint sequence, text tokens included.
- ``"image_identity"`` (diffusers-PAG-like): image queries attend to themselves plus all text keys; text rows are
  unchanged. Computed exactly as one softmax over [text keys + the token's own key] per image query, which
  is the reference's LSE merge written directly; memory is ``b * heads_selected * N_img * (N_txt + 1)`` floats
  (SD3 at 1024 px: 4096 x 334 x 4 B = 5.5 MB per head and sample). On image-only attention (PixArt, Wan) both
  modes are plain identity.

Guidance (added by the DiT adapter to the stock pipeline's step): ``eps = eps_cfg + scale * (eps_cond - eps_pert)``
for steps whose fraction ``step / num_steps`` lies in ``[start, stop)``. ``u = 0`` or ``scale = 0`` is a no-op.
Heads are given as ``heads="l.h;l.h"`` (or pairs), whole ``layers``, and/or a ``preset`` (a name under
``mmeff/guidance/presets/`` or a path: JSON ``{"heads": ["l,h", ...]}`` / a list, or HeadHunter's text file
with one ``l,h`` per line). Layer numbers are the adapter's global block indices (FLUX: double blocks, then
single blocks).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from ..core.config import MethodConfig, require
from ..core.errors import ConfigError
from ..core.registry import register_method
from ..hosts.dit_context import AttnContext, AttnSite, DiTInfo, GuidanceRuntime

PRESET_DIR = Path(__file__).with_name("presets")
PRESET_FORMAT = "mmeff.softpag.preset/1"


# ---------------------------------------------------------------------------------------------- head spelling
def parse_head(item: Any) -> tuple[int, int]:
    """``(l, h)``, ``"l.h"``, ``"l,h"`` or ``"l:h"`` -> (l, h)."""
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return int(item[0]), int(item[1])
    if isinstance(item, str):
        parts = [p for p in re.split(r"[.,:\s]+", item.strip()) if p]
        if len(parts) == 2 and all(p.lstrip("-").isdigit() for p in parts):
            return int(parts[0]), int(parts[1])
    raise ConfigError(f"softpag: cannot read head {item!r}; write heads as 'layer.head' (e.g. '3.7') or (3, 7)")


def parse_heads(value: Any) -> tuple[tuple[int, int], ...]:
    if value is None or value == "" or value == ():
        return ()
    if isinstance(value, str):
        value = [s for s in re.split(r"[;|]", value) if s.strip()]
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(x, int) for x in value):
        value = [value]
    return tuple(sorted({parse_head(v) for v in value}))


def load_preset(preset: str) -> tuple[tuple[int, int], ...]:
    """Heads of a named preset or a preset/HeadHunter file."""
    path = Path(preset).expanduser()
    if not path.exists():
        named = PRESET_DIR / f"{preset}.json"
        if not named.exists():
            names = sorted(p.stem for p in PRESET_DIR.glob("*.json")) if PRESET_DIR.is_dir() else []
            raise ConfigError(f"softpag: preset {preset!r} is neither a file nor a named preset; named presets: "
                              f"{names or 'none installed'}")
        path = named
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"softpag: preset {path} is not valid JSON: {exc}") from exc
        heads = data.get("heads") if isinstance(data, dict) else data
        if not isinstance(heads, list):
            raise ConfigError(f"softpag: preset {path} must hold a list of 'l,h' strings (or {{'heads': [...]}})")
        return parse_heads(heads)
    return parse_heads([line for line in text.splitlines() if line.strip() and not line.startswith("#")])


def save_preset(path: str | Path, heads: Iterable[tuple[int, int]], **meta: Any) -> Path:
    """Write a SoftPAG preset JSON (``{"heads": ["l,h", ...], ...meta}``) that ``SoftPAG(preset=path)`` loads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": PRESET_FORMAT, "heads": [f"{l},{h}" for l, h in heads], **meta}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- config
@register_method
@dataclasses.dataclass(frozen=True)
class SoftPAG(MethodConfig):
    """Soft perturbed-attention guidance on selected heads of a diffusers DiT."""

    name: ClassVar[str] = "softpag"
    kind: ClassVar[str] = "dit_guidance"

    heads: tuple[str, ...] = ()
    u: float = 1.0
    scale: float = 3.0
    layers: tuple[int, ...] = ()
    preset: str | None = None
    mode: Literal["joint_identity", "image_identity"] = "joint_identity"
    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self) -> None:
        canon = tuple(f"{l}.{h}" for l, h in parse_heads(self.heads))
        object.__setattr__(self, "heads", canon)
        layers = self.layers
        if isinstance(layers, (int, str)):
            layers = [s for s in re.split(r"[;|,\s]+", str(layers)) if s]
        object.__setattr__(self, "layers", tuple(sorted({int(x) for x in layers})))
        super().__post_init__()

    def validate(self) -> None:
        require(0.0 <= self.u <= 1.0, f"softpag: u must be in [0, 1] (0 = no perturbation, 1 = PAG), got {self.u}")
        require(math.isfinite(self.scale), f"softpag: scale must be finite, got {self.scale}")
        require(0.0 <= self.start < self.stop <= 1.0,
                f"softpag: need 0 <= start < stop <= 1 (fractions of the denoising steps), "
                f"got {self.start}, {self.stop}")
        require(self.mode in ("joint_identity", "image_identity"),
                f"softpag: mode must be 'joint_identity' or 'image_identity', got {self.mode!r}")
        require(all(l >= 0 for l in self.layers), f"softpag: layers must be >= 0, got {self.layers}")
        require(bool(self.heads or self.layers or self.preset),
                "softpag: say which heads to perturb: heads='l.h;l.h', layers='l;l' or preset=<name or file>")
        if self.preset:
            load_preset(self.preset)

    @property
    def is_noop(self) -> bool:
        return self.u == 0.0 or self.scale == 0.0

    def head_pairs(self) -> tuple[tuple[int, int], ...]:
        """Explicit heads plus preset heads (whole layers are expanded by the runtime, which knows head counts)."""
        pairs = set(parse_heads(self.heads))
        if self.preset:
            pairs.update(load_preset(self.preset))
        return tuple(sorted(pairs))

    def make_runtime(self, info: DiTInfo) -> SoftPAGRuntime:
        return SoftPAGRuntime(self, info)


# ---------------------------------------------------------------------------------------------- runtime
class SoftPAGRuntime(GuidanceRuntime):
    def __init__(self, cfg: SoftPAG, info: DiTInfo) -> None:
        self.cfg = cfg
        per_layer = info.heads_per_layer()
        selected: dict[int, set[int]] = {}
        for layer in cfg.layers:
            if layer not in per_layer:
                raise ConfigError(f"softpag: layer {layer} does not exist; {info.model_class} has layers "
                                  f"0..{info.n_layers - 1}")
            selected.setdefault(layer, set()).update(range(per_layer[layer]))
        for layer, head in cfg.head_pairs():
            if layer not in per_layer:
                raise ConfigError(f"softpag: head {layer}.{head}: layer {layer} does not exist; {info.model_class} "
                                  f"has layers 0..{info.n_layers - 1}")
            if not 0 <= head < per_layer[layer]:
                raise ConfigError(f"softpag: head {layer}.{head}: layer {layer} has heads 0..{per_layer[layer] - 1}")
            selected.setdefault(layer, set()).add(head)
        if (cfg.start, cfg.stop) != (0.0, 1.0) and not info.has_pipeline:
            raise ConfigError("softpag: start/stop are fractions of a pipeline's denoising steps; apply to the "
                              "pipeline (not its bare transformer) or leave start=0, stop=1")
        self.heads = {l: sorted(hs) for l, hs in sorted(selected.items())}
        self._index: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.calls = 0

    @property
    def adds_rows(self) -> bool:
        return not self.cfg.is_noop

    def wants(self, site: AttnSite) -> bool:
        return site.primary and site.layer in self.heads

    def scale_at(self, step: int, num_steps: int | None) -> float:
        if self.cfg.is_noop:
            return 0.0
        if num_steps:
            frac = step / num_steps
            if not self.cfg.start <= frac < self.cfg.stop:
                return 0.0
        return self.cfg.scale

    def _idx(self, layer: int, device: torch.device) -> torch.Tensor:
        key = (layer, device)
        if key not in self._index:
            self._index[key] = torch.tensor(self.heads[layer], dtype=torch.long, device=device)
        return self._index[key]

    def perturb(self, ctx: AttnContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: torch.Tensor | None, scale: float | None, out: torch.Tensor) -> torch.Tensor:
        if v.shape[1] != out.shape[1]:
            raise ConfigError(f"softpag: {ctx.site.name} uses grouped KV heads ({v.shape[1]} KV vs {out.shape[1]} "
                              "query heads); head-level identity is not defined there")
        self.calls += 1
        u = self.cfg.u
        idx = self._idx(ctx.layer, out.device)
        o = out.index_select(1, idx)
        vv = v.index_select(1, idx)
        if self.cfg.mode == "image_identity" and ctx.text is not None:
            i0, i1 = ctx.image
            target = image_identity(q.index_select(1, idx), k.index_select(1, idx), vv,
                                    _select_mask(attn_mask, q, idx), scale, ctx.text, ctx.image).to(o.dtype)
            img = o[:, :, i0:i1]
            mixed_img = target if u == 1.0 else (1.0 - u) * img + u * target
            mixed = o.clone()
            mixed[:, :, i0:i1] = mixed_img
        else:
            mixed = vv.to(o.dtype) if u == 1.0 else (1.0 - u) * o + u * vv.to(o.dtype)
        return out.index_copy(1, idx, mixed)

    def report(self) -> dict[str, Any]:
        heads = [f"{l}.{h}" for l, hs in self.heads.items() for h in hs]
        return {"heads": heads, "n_heads": len(heads), "layers": sorted(self.heads), "u": self.cfg.u,
                "scale": self.cfg.scale, "mode": self.cfg.mode, "start": self.cfg.start, "stop": self.cfg.stop,
                "noop": self.cfg.is_noop, "perturbed_attention_calls": self.calls}


def _select_mask(mask: torch.Tensor | None, q: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
    """The SDPA mask broadcast to [b, H, S, S] (a view) and restricted to the selected heads."""
    if mask is None:
        return None
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    b, h, s = q.shape[0], q.shape[1], q.shape[2]
    return m.expand(b, h, s, s).index_select(1, idx)


def image_identity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scale: float | None, text: tuple[int, int], image: tuple[int, int]) -> torch.Tensor:
    """Outputs of the image queries when each attends only to its own key and to all text keys.

    q/k/v: [b, h, S, d]; returns [b, h, N_img, d] in float32. One softmax over [text logits, self logit].
    """
    (t0, t1), (i0, i1) = text, image
    sc = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qi = q[:, :, i0:i1].float()
    lt = torch.matmul(qi, k[:, :, t0:t1].float().transpose(-1, -2)) * sc          # [b, h, n_img, n_txt]
    ls = (qi * k[:, :, i0:i1].float()).sum(-1, keepdim=True) * sc                 # [b, h, n_img, 1]
    if mask is not None:
        mt = mask[:, :, i0:i1, t0:t1]
        md = mask[:, :, i0:i1, i0:i1].diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
        if mask.dtype == torch.bool:
            lt = lt.masked_fill(~mt, float("-inf"))
            ls = ls.masked_fill(~md, float("-inf"))
        else:
            lt = lt + mt.float()
            ls = ls + md.float()
    w = torch.softmax(torch.cat([lt, ls], -1), -1)
    return torch.matmul(w[..., :-1], v[:, :, t0:t1].float()) + w[..., -1:] * v[:, :, i0:i1].float()

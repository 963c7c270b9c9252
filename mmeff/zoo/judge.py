"""``tiny-clip-judge``: a tiny open_clip CLIP trained on the shapes world, used to score generated images.

The model is a real :class:`open_clip.model.CLIP` built from a custom config (ViT on 32x32 px, patch 4; a small
causal text transformer), trained from scratch by :mod:`mmeff.zoo.train_judge` (no pretrained weights).

**Tokenizer.** open_clip's ``SimpleTokenizer`` ships its BPE vocabulary with the package, but its 49,408-entry
embedding table alone would be ~10-25 MB at these widths, so the judge uses a tiny word tokenizer instead
(:class:`WordTokenizer`): lower-cased words/commas/quotes of the world vocabulary, ``<pad>``=0, ``<sot>``=1,
``<eot>``=2, ``<unk>``=3; text pooling is open_clip's ``pool_type="eos"`` on ``<eot>``.

**Scores.**

- :meth:`Judge.clip_score`: ``100 * cos(image_embedding, text_embedding)`` per (image, prompt) pair (the
  torchmetrics CLIPScore scale, without clipping at 0).
- :meth:`Judge.object_presence` (GenEval-style): the fraction of the requested ``colour shape`` objects that are
  detected. Detection uses a small **presence head** trained jointly with the CLIP: a linear multi-label
  classifier on the (unnormalised) image embedding with one logit per (colour, shape) pair (8 x 6 = 48), trained with BCE (positive weight 4)
  on the rendered scenes' object lists; an object counts as detected when its sigmoid is > 0.5. Requested
  objects come from a :class:`~mmeff.zoo.world.Scene` or are parsed from a prompt/caption
  (every "<colour> <shape>" phrase; duplicates count once).
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

MODEL_DIR = Path(__file__).resolve().parent / "models" / "tiny-clip-judge"
IMAGE_SIZE = 32
CONTEXT = 40
FORMAT = "mmeff.zoo.tiny-clip-judge/1"


def default_config() -> dict[str, Any]:
    from .train_sd3 import world_vocabulary
    from .world import COLOURS, SHAPES

    vocab = ["<pad>", "<sot>", "<eot>", "<unk>", ",", '"'] + world_vocabulary()
    return {
        "format": FORMAT,
        "embed_dim": 64,
        "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 4, "width": 96, "layers": 4, "head_width": 24,
                       "mlp_ratio": 2.0},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": len(vocab), "width": 64, "heads": 4, "layers": 2,
                     "mlp_ratio": 2.0, "pad_id": 0, "eos_id": 2, "pool_type": "eos"},
        "vocab": vocab,
        "presence_pairs": [f"{c} {s}" for c in COLOURS for s in SHAPES],
        "image_norm": {"mean": 0.5, "std": 0.5},
    }


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary: ``[<sot>, words..., <eot>, <pad>...]`` of length ``context``."""

    def __init__(self, vocab: Sequence[str], context: int = CONTEXT) -> None:
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context = context

    def words(self, text: str) -> list[str]:
        return re.findall(r'[a-z0-9]+|[,"]', text.lower())

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), self.context, dtype=torch.long)
        unk = self.index["<unk>"]
        for i, t in enumerate(texts):
            ids = [self.index.get(w, unk) for w in self.words(t)][: self.context - 2]
            ids = [self.index["<sot>"]] + ids + [self.index["<eot>"]]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


class JudgeModel(torch.nn.Module):
    """open_clip CLIP + a linear (colour, shape) presence head on the image embedding."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        from open_clip.model import CLIP

        self.clip = CLIP(embed_dim=config["embed_dim"], vision_cfg=dict(config["vision_cfg"]),
                         text_cfg=dict(config["text_cfg"]))
        self.presence = torch.nn.Linear(config["embed_dim"], len(config["presence_pairs"]))


def build(config: dict[str, Any] | None = None, seed: int = 0) -> tuple[JudgeModel, dict[str, Any]]:
    config = config or default_config()
    torch.manual_seed(seed)
    return JudgeModel(config), config


def to_tensor(images: Any, config: dict[str, Any]) -> torch.Tensor:
    """PIL images / HWC arrays (uint8 or float in [0, 1]) / a BCHW tensor in [0, 1] -> normalised [B, 3, 32, 32]."""
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[1] == 3:
        x = images.float()
    else:
        arrs = []
        for im in images:
            if hasattr(im, "convert"):  # PIL
                im = im.convert("RGB")
                if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                    im = im.resize((IMAGE_SIZE, IMAGE_SIZE), resample=3)
                a = np.asarray(im, dtype=np.float32) / 255.0
            else:
                a = np.asarray(im)
                a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
            arrs.append(a)
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
    if x.shape[-1] != IMAGE_SIZE or x.shape[-2] != IMAGE_SIZE:
        x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    n = config["image_norm"]
    return (x.clamp(0, 1) - n["mean"]) / n["std"]


def requested_objects(item: Any) -> list[str]:
    """Distinct ``"colour shape"`` pairs asked for by a Scene, or found in a prompt/caption string."""
    from .world import COLOURS, SHAPES

    if hasattr(item, "objects"):
        pairs = [f"{o.colour} {o.shape}" for o in item.objects]
    else:
        pat = r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")\b"
        pairs = [f"{c} {s}" for c, s in re.findall(pat, str(item).lower())]
    return list(dict.fromkeys(pairs))


class Judge:
    """The trained tiny CLIP judge (``Judge.load()``) with CLIP-score and object-presence metrics."""

    def __init__(self, model: JudgeModel, config: dict[str, Any], info: dict[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.config = config
        self.info = info or {}
        self.tokenizer = WordTokenizer(config["vocab"], config["text_cfg"]["context_length"])
        self.pairs = list(config["presence_pairs"])

    @classmethod
    def load(cls, path: str | Path | None = None) -> Judge:
        path = Path(path) if path is not None else MODEL_DIR
        if not (path / "config.json").is_file():
            from ..core.errors import ConfigError

            raise ConfigError(f"judge not built: {path} has no config.json; run `python -m mmeff.zoo.train_judge`")
        config = json.loads((path / "config.json").read_text())
        model, _ = build(config)
        model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
        info_f = path / "training.json"
        info = json.loads(info_f.read_text()) if info_f.is_file() else None
        return cls(model, config, info)

    @property
    def trained(self) -> bool:
        return bool(self.info.get("trained"))

    @torch.no_grad()
    def embed_images(self, images: Any) -> torch.Tensor:
        return self.model.clip.encode_image(to_tensor(images, self.config), normalize=True)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.clip.encode_text(self.tokenizer(texts), normalize=True)

    def clip_score(self, images: Any, prompts: Sequence[str]) -> list[float]:
        """``100 * cos`` between each image and its prompt."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        im, tx = self.embed_images(images), self.embed_texts(prompts)
        if len(prompts) != im.shape[0]:
            raise ValueError(f"clip_score: {im.shape[0]} images but {len(prompts)} prompts")
        return (100.0 * (im * tx).sum(-1)).tolist()

    @torch.no_grad()
    def presence_probs(self, images: Any) -> torch.Tensor:
        """[B, 48] sigmoid probabilities of each (colour, shape) pair being present."""
        feats = self.model.clip.encode_image(to_tensor(images, self.config), normalize=False)
        return torch.sigmoid(self.model.presence(feats))

    def object_presence(self, images: Any, scenes_or_prompts: Sequence[Any], threshold: float = 0.5) -> list[float]:
        """Fraction of requested colour-shape objects detected in each image (GenEval-style; 1.0 if none asked)."""
        probs = self.presence_probs(images)
        out = []
        for p, item in zip(probs, scenes_or_prompts):
            req = [self.pairs.index(r) for r in requested_objects(item) if r in self.pairs]
            out.append(float((p[req] > threshold).float().mean()) if req else 1.0)
        return out

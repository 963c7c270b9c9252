"""Dense vs mitigated captions of a weak-evidence scene, with the hallucinated objects marked.

Usable from a notebook and by the demo's hallucination tab::

    from mmeff.demo.halluc_compare import caption_compare
    from mmeff.demo.vlm_compare import load_model
    model, processor = load_model("tiny-llava")
    result = caption_compare(model, processor, seed=1150023, method="vhr")  # dense names a pink star that is not there
    print(result.markdown())
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from PIL import Image

from ..zoo.processors import chat
from ..zoo.world import Mention, hallucinated, make_caption
from ..zoo.world.chair import COLOUR_SYNONYMS, SHAPE_SYNONYMS, SIZE_SYNONYMS
from ..zoo.world.questions import CAPTION_PROMPT
from ..zoo.world.weak import render_weak, weak_scene

MARK = "**~~{}~~**"
"""How a hallucinated object is marked in markdown (bold, struck through)."""


@dataclasses.dataclass
class CaptionComparison:
    """The scene, its true caption, and the dense and mitigated captions with their hallucinations."""

    seed: int
    method: str
    image: Image.Image
    reference: str
    dense: str
    mitigated: str
    dense_hallucinated: list[Mention]
    mitigated_hallucinated: list[Mention]

    def markdown(self) -> str:
        return "\n\n".join([
            f"**scene {self.seed}, true objects:** {self.reference}",
            f"**dense** ({len(self.dense_hallucinated)} hallucinated): {mark(self.dense, self.dense_hallucinated)}",
            f"**{self.method}** ({len(self.mitigated_hallucinated)} hallucinated): "
            f"{mark(self.mitigated, self.mitigated_hallucinated)}",
        ])


def mark(caption: str, mentions: list[Mention]) -> str:
    """``caption`` with every phrase naming a hallucinated object wrapped in :data:`MARK`."""
    shape_words = {m.shape: [w for w, s in SHAPE_SYNONYMS.items() if s == m.shape] for m in mentions}
    adjectives = "|".join(sorted(set(COLOUR_SYNONYMS) | set(SIZE_SYNONYMS), key=len, reverse=True))
    out = caption
    for m in mentions:
        nouns = "|".join(sorted(shape_words[m.shape], key=len, reverse=True))
        colours = [w for w, c in COLOUR_SYNONYMS.items() if c == m.colour] if m.colour else []
        pattern = (rf"\b((?:(?:{adjectives})\s+)*" + (rf"(?:{'|'.join(colours)})\s+(?:(?:{adjectives})\s+)*" if colours else "")
                   + rf"(?:{nouns})(?:es|s)?)\b")
        out = re.sub(pattern, lambda g: MARK.format(g.group(1)), out, flags=re.IGNORECASE)
    return out


def caption_compare(model: Any, processor: Any, seed: int, method: str = "vhr",
                    max_new_tokens: int = 96) -> CaptionComparison:
    """Greedy captions of weak scene ``seed`` without and with ``method``; the model is left dense."""
    import mmeff

    scene = weak_scene(int(seed))
    image = render_weak(scene)
    text = processor.apply_chat_template(chat(CAPTION_PROMPT), add_generation_prompt=True)
    inputs = processor(images=[image], text=[text], return_tensors="pt").to(model.device)

    def caption() -> str:
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()

    dense = caption()
    with mmeff.apply(model, *method.split("+")):
        mitigated = caption()
    return CaptionComparison(int(seed), method, image, make_caption(scene), dense, mitigated,
                             hallucinated(dense, scene), hallucinated(mitigated, scene))

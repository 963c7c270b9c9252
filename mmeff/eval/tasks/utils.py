"""lmms-eval hooks of the mmeff world tasks: visuals, prompts, scoring and aggregations.

Rows (see :func:`mmeff.eval.data.task_rows`) carry the scene as a JSON string, so
:func:`doc_to_visual` renders the image on the fly with :func:`mmeff.zoo.world.render`; no image
file is ever written or read.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from PIL import Image

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"])}
_WORD = re.compile(r"[a-z0-9]+")


# --------------------------------------------------------------------------- visuals and prompts

@lru_cache(maxsize=256)
def _render(scene_json: str) -> Image.Image:
    from mmeff.zoo.world import render
    from mmeff.zoo.world.scene import Scene

    return render(Scene.from_dict(json.loads(scene_json))).convert("RGB")


def scene(doc: dict[str, Any]):
    """The :class:`~mmeff.zoo.world.scene.Scene` of a row."""
    from mmeff.zoo.world.scene import Scene

    return Scene.from_dict(json.loads(doc["scene"]))


@lru_cache(maxsize=256)
def _render_weak(scene_json: str) -> Image.Image:
    from mmeff.zoo.world.scene import Scene
    from mmeff.zoo.world.weak import render_weak

    return render_weak(Scene.from_dict(json.loads(scene_json))).convert("RGB")


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The rendered scene (336x336 RGB), one image per row (weak-evidence rendering for the halluc tasks)."""
    weak = json.loads(doc["meta"]).get("weak", False) if isinstance(doc.get("meta"), str) else False
    return [(_render_weak if weak else _render)(doc["scene"]).copy()]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '') or ''}{doc['question']}{kw.get('post_prompt', '') or ''}"


def doc_to_target(doc: dict[str, Any]) -> str:
    return doc["answer"]


# --------------------------------------------------------------------------- answer matching

def words(text: str) -> list[str]:
    """Lower-case alphanumeric words with number words mapped to digits."""
    return [_NUMBER_WORDS.get(w, w) for w in _WORD.findall(text.lower())]


def normalize(text: str) -> str:
    return " ".join(words(text))


def is_match(pred: str, answer: str) -> bool:
    """Exact match after normalisation, or the prediction *starts with* the (short) answer
    ("Yes, there is." matches "yes"; "3 circles" matches "3")."""
    p, a = words(pred), words(answer)
    if not a:
        return not p
    return p == a or p[: len(a)] == a


def says_yes(pred: str) -> bool:
    """POPE convention: a reply is "yes" unless its first word (or any word) is a negation."""
    w = words(pred)
    if not w:
        return False
    if w[0] in ("yes", "no"):
        return w[0] == "yes"
    return not any(x in ("no", "not") for x in w)


# --------------------------------------------------------------------------- process_results

def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """Per-row scores; the keys depend on the row's family (POPE / caption / short QA)."""
    pred = results[0] if results else ""
    family = doc["family"]
    if family == "existence":
        pred_yes, gold_yes = says_yes(pred), doc["answer"] == "yes"
        pair = {"pred": pred_yes, "gold": gold_yes}
        return {
            "exact_match": float(pred_yes == gold_yes),
            "f1": pair, "precision": pair, "recall": pair,
            "yes_ratio": float(pred_yes),
        }
    if family == "caption":
        item = {"caption": pred, "scene": doc["scene"]}
        return {"chair_s": item, "chair_i": item, "object_recall": item}
    return {"exact_match": float(is_match(pred, doc["answer"]))}


# --------------------------------------------------------------------------- aggregations

def _confusion(items: list[dict[str, bool]]) -> tuple[int, int, int]:
    tp = sum(1 for i in items if i["pred"] and i["gold"])
    fp = sum(1 for i in items if i["pred"] and not i["gold"])
    fn = sum(1 for i in items if not i["pred"] and i["gold"])
    return tp, fp, fn


def pope_precision(items: list[dict[str, bool]]) -> float:
    tp, fp, _ = _confusion(items)
    return tp / (tp + fp) if tp + fp else 0.0


def pope_recall(items: list[dict[str, bool]]) -> float:
    tp, _, fn = _confusion(items)
    return tp / (tp + fn) if tp + fn else 0.0


def pope_f1(items: list[dict[str, bool]]) -> float:
    """F1 of the "yes" class (the POPE convention)."""
    tp, fp, fn = _confusion(items)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def _chair(items: list[dict[str, str]]) -> dict[str, float]:
    from mmeff.zoo.world import chair_scores
    from mmeff.zoo.world.scene import Scene

    scenes = [Scene.from_dict(json.loads(i["scene"])) for i in items]
    return chair_scores([i["caption"] for i in items], scenes)


def chair_s(items: list[dict[str, str]]) -> float:
    """Captions with at least one hallucinated object / all captions (lower is better)."""
    return _chair(items)["chair_s"]


def chair_i(items: list[dict[str, str]]) -> float:
    """Hallucinated object mentions / all mentions (lower is better)."""
    return _chair(items)["chair_i"]


def object_recall(items: list[dict[str, str]]) -> float:
    """(shape, colour) pairs of the scenes mentioned by the captions / all pairs."""
    return _chair(items)["recall"]

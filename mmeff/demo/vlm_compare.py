"""Dense vs pruned answers of one VLM on one image and question, with the kept-token map.

The demo's VLM tab is a thin layer over :func:`compare`; it is also usable from a notebook::

    from mmeff.demo.vlm_compare import compare, load_model, scene_questions
    model, processor = load_model("tiny-qwen2-vl")
    image, qas = scene_questions(7)
    result = compare(model, processor, image, qas[0].question, "entropyprune:budget=64", expected=qas[0].answer)
    print(result.table())
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from PIL import Image

from ..zoo.eval_dense import normalise
from ..zoo.processors import chat
from .timing import TIMING_REPEATS, warm_median


@dataclasses.dataclass
class VLMComparison:
    """What the dense and the pruned model said, what it cost, and which tokens the pruner kept."""

    question: str
    method: str
    dense_answer: str
    pruned_answer: str
    dense_seconds: float
    pruned_seconds: float
    report: dict[str, Any]
    kept_maps: list[Image.Image]
    expected: str | None = None

    def correct(self, answer: str) -> bool | None:
        """Exact match after normalisation (None when the true answer is unknown)."""
        return None if self.expected is None else normalise(answer) == normalise(self.expected)

    def rows(self) -> list[list[Any]]:
        """Table rows: run, answer, correct, visual tokens into the LLM, prefill TFLOPs share, seconds."""
        rep = self.report
        n_in = rep.get("visual_tokens_per_sample", [None])[0]
        tflops = rep.get("prefill_tflops", {})
        return [
            ["dense", self.dense_answer, self.correct(self.dense_answer), n_in, 1.0, round(self.dense_seconds, 3)],
            [self.method, self.pruned_answer, self.correct(self.pruned_answer),
             round(rep.get("equivalent_budget", float("nan")), 1), round(tflops.get("ratio", float("nan")), 3),
             round(self.pruned_seconds, 3)],
        ]

    HEADERS = ["run", "answer", "correct", "visual tokens (average over layers)", "prefill FLOPs vs dense", "seconds"]

    def table(self) -> str:
        lines = [" | ".join(self.HEADERS)] + [" | ".join(str(c) for c in r) for r in self.rows()]
        return "\n".join(lines)


@functools.lru_cache(maxsize=2)
def load_model(name_or_path: str) -> tuple[Any, Any]:
    """``mmeff.zoo.load`` with a small cache, so switching methods does not reload the model."""
    from ..zoo import load

    return load(name_or_path)


def scene_questions(seed: int, families: tuple[str, ...] | None = None) -> tuple[Image.Image, list[Any]]:
    """A shapes-world scene rendered at 336 px and its questions with exact answers (captions left out)."""
    from ..zoo.world import FAMILIES, generate_scene, make_questions, render

    scene = generate_scene(int(seed))
    wanted = families or tuple(f for f in FAMILIES if f != "caption")
    return render(scene), make_questions(scene, int(seed), families=wanted)


def _encode(model: Any, processor: Any, image: Image.Image, question: str) -> Any:
    """The chat prompt for one image and question, on the model's device."""
    text = processor.apply_chat_template(chat(question), add_generation_prompt=True)
    return processor(images=[image], text=[text], return_tensors="pt").to(model.device)


def _generate(model: Any, processor: Any, inputs: Any, max_new_tokens: int, repeats: int) -> tuple[str, float]:
    """The greedy answer and its warm median generation time (one warm-up, then ``repeats`` timed runs)."""
    def once() -> Any:
        with torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)

    out, seconds = warm_median(once, repeats)
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    return answer, seconds


def compare(model: Any, processor: Any, image: Image.Image, question: str, method: str, *,
            expected: str | None = None, max_new_tokens: int = 16, repeats: int = TIMING_REPEATS) -> VLMComparison:
    """Greedy answers without and with ``method`` (a spec such as ``"fastv:budget=64"``), and its kept-token map.

    The method is removed before returning, also when generation fails, so the model is left dense.
    Seconds are warm: one warm-up run, then the median of ``repeats``.
    """
    import mmeff

    from ..eval.kept_token_map import kept_token_maps

    if image is None:
        raise ValueError("give an image: the methods prune visual tokens, so there must be some")
    if not question or not question.strip():
        raise ValueError("give a question about the image")
    image = image.convert("RGB")
    inputs = _encode(model, processor, image, question)
    dense, t_dense = _generate(model, processor, inputs, max_new_tokens, repeats)
    with mmeff.apply(model, method) as handle:
        pruned, t_pruned = _generate(model, processor, inputs, max_new_tokens, repeats)
        report = handle.report()
    try:
        maps = kept_token_maps(model, inputs, report, [image])
    except ValueError:
        maps = []  # a layout without a single grid (LLaVA-NeXT tiles): answers and numbers still stand
    return VLMComparison(question=question, method=method, dense_answer=dense, pruned_answer=pruned,
                         dense_seconds=t_dense, pruned_seconds=t_pruned, report=report, kept_maps=maps,
                         expected=expected)

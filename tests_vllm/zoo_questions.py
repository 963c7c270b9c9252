"""Questions about held-out shapes-world scenes, as vLLM requests and as transformers inputs."""
from __future__ import annotations

from typing import Any

from mmeff.zoo.processors import chat
from mmeff.zoo.world import build_split, render, scene_of


def scenes(n_scenes: int) -> list[tuple[Any, list[str]]]:
    """``n_scenes`` test-split scenes: (image, [questions]) each, in a fixed order."""
    grouped: dict[int, tuple[Any, list[str]]] = {}
    for row in build_split("test", n_scenes):
        key = int(row["seed"]) if "seed" in row else id(row["scene"])
        if key not in grouped:
            grouped[key] = (render(scene_of(row)), [])
        grouped[key][1].append(row["question"])
    return list(grouped.values())


def vllm_requests(processor: Any, n_scenes: int) -> list[dict[str, Any]]:
    """One ``LLM.generate`` request per question (the chat-template prompt and its image)."""
    return [{"prompt": processor.apply_chat_template(chat(q), add_generation_prompt=True),
             "multi_modal_data": {"image": image}}
            for image, questions in scenes(n_scenes) for q in questions]


def transformers_answers(model: Any, processor: Any, n_scenes: int, max_new_tokens: int) -> list[str]:
    """Greedy transformers answers to the same questions, in the order of :func:`vllm_requests`."""
    from mmeff.zoo.eval_dense import answer

    out: list[str] = []
    for image, questions in scenes(n_scenes):
        out += answer(model, processor, [image] * len(questions), questions, max_new_tokens=max_new_tokens)
    return out

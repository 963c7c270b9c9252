"""The hallucination bench's batched runs give each scene what it gives alone, and its logs resume."""
from __future__ import annotations

import json

import pytest

import mmeff
from mmeff.eval.halluc_bench import run_method, run_scenes
from mmeff.zoo.load import load
from mmeff.zoo.world.weak import WeakKnobs, weak_seeds

SEEDS = list(weak_seeds(4))
TOKENS = 24


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.endswith("seconds") and k != "batch"} for r in rows]


@pytest.mark.parametrize("method", ["dense", "vhr", "gift", "entropyprune:keep=64", "entropyprune:keep=64+vhr",
                                    "entropyprune:keep=64+gift"])
def test_batch_of_four_scenes_equals_each_scene_alone(method):
    """Captions, hallucinated objects and POPE answers of 4 scenes in one batch = each scene at batch 1 (tiny-llava)."""
    model, processor = load("tiny-llava")
    knobs = WeakKnobs()
    handle = None if method == "dense" else mmeff.apply(model, *method.split("+"))
    try:
        batched = run_scenes(model, processor, SEEDS, knobs, TOKENS)
        alone = [run_scenes(model, processor, [s], knobs, TOKENS)[0] for s in SEEDS]
    finally:
        if handle is not None:
            handle.remove()
    assert _strip(batched) == _strip(alone)
    assert [r["batch"] for r in batched] == [4] * 4 and len({r["caption_seconds"] for r in batched}) == 1


def test_batched_log_resumes_without_rerunning(tmp_path):
    """A log with some scenes done: the rest run in batches, the done ones are read back, order follows the seeds."""
    model, processor = load("tiny-llava")
    knobs = WeakKnobs()
    log = tmp_path / "dense.jsonl"
    first = run_method(model, processor, "dense", SEEDS[:1], knobs, 8, log, batch=4)
    rows = run_method(model, processor, "dense", SEEDS, knobs, 8, log, batch=2)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["seed"] for r in rows] == SEEDS and rows[0] == first[0]
    assert [r["seed"] for r in lines] == SEEDS and [r["batch"] for r in lines] == [1, 2, 2, 1]

"""Bench batch speed-up: the same scenes at batch 1 and at batch 8, interleaved chunk by chunk, 1 thread; rows identical?

Usage: PYTHONPATH=. python scripts/halluc_batch_speedup.py tiny-llava 16 dense,gift,entropyprune:keep=64+gift OUT.json
"""
import json
import sys
import time

import torch

import mmeff
from mmeff.eval.halluc_bench import run_scenes
from mmeff.eval.report import versions
from mmeff.zoo.load import load
from mmeff.zoo.world.weak import WeakKnobs, weak_seeds

torch.set_num_threads(1)
name, n, methods, out = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4]
model, processor = load(name)
knobs, seeds = WeakKnobs(), list(weak_seeds(n))
res = {"what": "halluc bench: seconds per scene at batch 1 vs batch 8 on the same scenes, interleaved per chunk of 8",
       "model": name, "n_scenes": n, "caption_tokens": 96, "threads": 1, "versions": versions(), "methods": {}}
strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("seconds") and k != "batch"} for r in rows]
for method in methods:
    h = None if method == "dense" else mmeff.apply(model, *method.split("+"))
    t1 = t8 = 0.0; one, eight = [], []
    try:
        for i in range(0, n, 8):
            chunk = seeds[i:i + 8]
            t = time.perf_counter(); one += [run_scenes(model, processor, [s], knobs, 96)[0] for s in chunk]; t1 += time.perf_counter() - t
            t = time.perf_counter(); eight += run_scenes(model, processor, chunk, knobs, 96); t8 += time.perf_counter() - t
    finally:
        if h is not None: h.remove()
    diff = [s for s, a, b in zip(seeds, strip(one), strip(eight)) if a != b]
    res["methods"][method] = {"seconds_per_scene_batch1": t1 / n, "seconds_per_scene_batch8": t8 / n, "speedup": t1 / t8,
                              "identical_rows": not diff, "differing_seeds": diff}
    print(method, res["methods"][method], flush=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)

"""Serving throughput and time to first token in vLLM: dense vs mmeff-pruned zoo VLMs, several concurrencies.

Needs the vLLM environment (``bash scripts/setup_vllm.sh``). One engine per configuration, each in a
process of its own; requests go through vLLM's AsyncLLM (what ``vllm serve`` runs) with at most
``c`` in flight. Every request has its own scene image, so neither the prefix cache nor the encoder
cache can reuse work between requests; 8 output tokens each (``ignore_eos``), greedy, float32.
Each concurrency level runs ``--rounds`` times on fresh images; the summary is the median round (the
2-core machine is shared, so single rounds are noisy), every round is kept under ``rounds``.

    .venv-vllm/bin/python benchmarks/bench_vllm_serving.py --out docs/results/vllm-serving-cpu-tiny-llava.json
    .venv-vllm/bin/python benchmarks/bench_vllm_serving.py --model tiny-qwen2-vl \
        --out docs/results/vllm-serving-cpu-tiny-qwen2-vl.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SPECS = {
    "tiny-llava": {"dense": "", "random-b144": "random:budget=144,positions=reindex",
                   "random-b64": "random:budget=64,positions=reindex"},
    "tiny-qwen2-vl": {"dense": "", "random-b72": "random:budget=72", "random-b36": "random:budget=36"},
}
ARCH = {"tiny-llava": "MmeffLlavaForConditionalGeneration", "tiny-qwen2-vl": "MmeffQwen2VLForConditionalGeneration"}
DENSE_TOKENS = {"tiny-llava": 576, "tiny-qwen2-vl": 144}
WORKER = {"tiny-llava": "auto", "tiny-qwen2-vl": "mmeff.serving.vllm.worker.MmeffCPUWorker"}


def _requests(processor: Any, first_scene: int, n: int) -> list[dict[str, Any]]:
    from mmeff.zoo.processors import chat
    from mmeff.zoo.world import generate_scene, render

    out = []
    for i in range(first_scene, first_scene + n):
        prompt = processor.apply_chat_template(chat("What colour is the largest shape?"), add_generation_prompt=True)
        out.append({"prompt": prompt, "multi_modal_data": {"image": render(generate_scene(900_000 + i))}})
    return out


async def _level(engine: Any, requests: list[dict[str, Any]], concurrency: int, tag: str) -> dict[str, Any]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    gate = asyncio.Semaphore(concurrency)
    ttft: list[float] = []
    latency: list[float] = []
    prompt_tokens: list[int] = []

    async def one(i: int, req: dict[str, Any]) -> None:
        async with gate:
            t0 = time.perf_counter()
            first = None
            async for out in engine.generate(req, params, request_id=f"{tag}-{concurrency}-{i}"):
                if first is None:
                    first = time.perf_counter() - t0
                    prompt_tokens.append(len(out.prompt_token_ids))
            ttft.append(first)
            latency.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(ttft, n=10)
    return {"concurrency": concurrency, "requests": len(requests), "wall_s": round(wall, 3),
            "requests_per_s": round(len(requests) / wall, 3),
            "output_tokens_per_s": round(8 * len(requests) / wall, 2),
            "ttft_mean_s": round(statistics.mean(ttft), 4), "ttft_p50_s": round(statistics.median(ttft), 4),
            "ttft_p90_s": round(q[-1], 4), "latency_mean_s": round(statistics.mean(latency), 4),
            "prompt_tokens": prompt_tokens[0]}


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-level summary: the median of each number over the rounds."""
    keys = [k for k in rounds[0] if k not in ("concurrency", "requests", "prompt_tokens")]
    out = {k: rounds[0][k] for k in ("concurrency", "requests", "prompt_tokens")}
    out.update({k: round(statistics.median(r[k] for r in rounds), 4) for k in keys})
    out["rounds"] = rounds
    return out


async def _run_one(model: str, name: str, levels: list[int], n: int, n_rounds: int) -> dict[str, Any]:
    from transformers import AutoProcessor
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from mmeff.zoo.load import zoo_path

    path = str(zoo_path(model))
    spec = SPECS[model][name]
    overrides: dict[str, Any] = {"architectures": [ARCH[model]]}
    if spec:
        overrides["mmeff_prune"] = spec
    t0 = time.perf_counter()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=path, hf_overrides=overrides, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
        worker_cls=WORKER[model]))
    start_s = time.perf_counter() - t0
    processor = AutoProcessor.from_pretrained(path)
    try:
        await _level(engine, _requests(processor, 0, 4), 2, "warmup")
        rows = []
        for k, c in enumerate(levels):
            rounds = [await _level(engine, _requests(processor, 100 + 1000 * k + 100 * j, n), c, f"{name}-{j}")
                      for j in range(n_rounds)]
            rows.append(_median_round(rounds))
            print(name, {k: v for k, v in rows[-1].items() if k != "rounds"}, flush=True)
    finally:
        engine.shutdown()
    return {"config": name, "spec": spec or None, "engine_start_s": round(start_s, 2),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "levels": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/vllm-serving-cpu.json")
    ap.add_argument("--model", default="tiny-llava", choices=sorted(SPECS))
    ap.add_argument("--configs", help="comma-separated subset of the model's configurations (default: all)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=24, help="requests per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per concurrency level (median reported)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print its JSON
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if args.one:
        print("RESULT " + json.dumps(asyncio.run(_run_one(args.model, args.one, levels, args.requests, args.rounds))), flush=True)
        return
    results = []
    for name in (args.configs or ",".join(SPECS[args.model])).split(","):
        proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--one", name,
                               "--concurrency", args.concurrency,
                               "--requests", str(args.requests), "--rounds", str(args.rounds)], cwd=ROOT, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(results[-1]), flush=True)
    import torch
    import vllm

    report = {
        "what": f"vLLM serving of {args.model} ({DENSE_TOKENS[args.model]} visual tokens/image), dense vs mmeff "
                "pre-LLM pruning via the plugin; distinct image per request; 8 output tokens; float32; enforce_eager",
        "model": args.model,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), shared; no GPU",
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "settings": {"VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"],
                     "VLLM_CPU_OMP_THREADS_BIND": os.environ["VLLM_CPU_OMP_THREADS_BIND"]},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":  # vLLM starts its engine in separate processes
    main()

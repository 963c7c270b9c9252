"""Answer the zoo questions with vLLM in a process of its own; prints one JSON line (the tests read it).

    python -m tests_vllm.run_vllm --model tiny-llava --scenes 4 [--spec "random:budget=64,positions=reindex"]

A separate process per engine keeps each test's vLLM (and its worker processes) from outliving it.
"""
from __future__ import annotations

import argparse
import json
import os

ARCH = {"tiny-llava": "MmeffLlavaForConditionalGeneration", "tiny-qwen2-vl": "MmeffQwen2VLForConditionalGeneration"}
WORKER = "mmeff.serving.vllm.worker.MmeffCPUWorker"
SERVING_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--spec", default="")
    ap.add_argument("--scenes", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--worker-cls", default=WORKER, help="'auto' for vLLM's own worker")
    args = ap.parse_args()
    for k, v in SERVING_ENV.items():
        os.environ.setdefault(k, v)

    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from mmeff.zoo.load import zoo_path
    from tests_vllm.zoo_questions import vllm_requests

    path = str(zoo_path(args.model))
    overrides = {"architectures": [ARCH[args.model]]}
    if args.spec:
        overrides["mmeff_prune"] = args.spec
    llm = LLM(model=path, hf_overrides=overrides, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              worker_cls=args.worker_cls)
    requests = vllm_requests(AutoProcessor.from_pretrained(path), args.scenes)
    outs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=args.max_tokens), use_tqdm=False)
    print("RESULT " + json.dumps({
        "answers": [o.outputs[0].text.strip() for o in outs],
        "prompt_lengths": [len(o.prompt_token_ids) for o in outs],
    }))


if __name__ == "__main__":  # vLLM starts its engine in separate processes
    main()

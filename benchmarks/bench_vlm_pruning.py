"""Prefill latency, generation time, KV-cache bytes and method time: dense vs FastV vs EntropyPrune.

LLaVA-1.5-7B architecture (CLIP ViT-L/336 + Llama-7B, 576 visual tokens) with random weights in bf16
on the GPU; batch 1 and 16; budgets 192/128/64. Ratios are against the dense baseline of the same run.
``--tiny`` runs a tiny model on the CPU to check the script itself (numbers meaningless).
``--compiled`` times batch 1 with dense and pruned runs both compiled, in the same run: the prefill through
``torch.compile(model, mode=--compile-mode)`` (the pruning decision runs eagerly at one graph break) and
the decode steps through generate()'s own compile on a static cache (``fullgraph=True``, CUDA graphs with
``reduce-overhead``); per-token decode = (time of N tokens - time of 1 token) / (N - 1).

    python benchmarks/bench_vlm_pruning.py --out runs/bench_vlm_pruning.json
    python benchmarks/bench_vlm_pruning.py --compiled --budgets 192,64 --out runs/bench_vlm_compiled.json
    python benchmarks/bench_vlm_pruning.py --compiled --tiny --out runs/bench_vlm_compiled_tiny.json  # CPU check
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import torch

import mmeff


def build_llava_7b(device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       pad_token_id=0, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, vision_feature_layer=-2)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model


def make_batch(model: torch.nn.Module, batch: int, text_len: int, device: str, dtype: torch.dtype) -> dict:
    vc = model.config.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2
    image_id = model.config.image_token_id
    g = torch.Generator().manual_seed(0)
    vocab = min(1000, model.config.text_config.vocab_size)
    before = torch.randint(3, vocab, (batch, 5), generator=g)
    after = torch.randint(3, vocab, (batch, text_len - 5), generator=g)
    before[before == image_id] = 3
    after[after == image_id] = 3
    ids = torch.cat([before, torch.full((batch, n_img), image_id), after], 1)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": torch.randn(batch, 3, vc.image_size, vc.image_size, generator=g).to(device, dtype)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, Any]:
    out = fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], out


def kv_bytes(cache: Any) -> int:
    total = 0
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


@torch.no_grad()
def run_case(model, inputs, spec: str | None, new_tokens: int, device: str, repeats: int) -> dict:
    handle = mmeff.apply(model, spec) if spec else None
    try:
        prefill_s, out = timed(lambda: model(**inputs, use_cache=True), device, repeats)
        cache = kv_bytes(out.past_key_values)
        del out
        gen_s, _ = timed(lambda: model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                do_sample=False), device, max(1, repeats // 2))
        rep = handle.report() if handle else {}
        calls = max(1, rep.get("prompts", 1))
        return {"spec": spec or "dense", "prefill_s": prefill_s, "generate_s": gen_s, "kv_cache_bytes": cache,
                "method_s_per_prompt": rep.get("method_seconds", 0.0) / calls,
                "equivalent_budget": rep.get("equivalent_budget"),
                "visual_tokens_per_layer": rep.get("visual_tokens_per_layer"),
                "prefill_tflops": rep.get("prefill_tflops")}
    finally:
        if handle:
            handle.remove()


def _fresh_compile_state(model) -> None:
    """Forget compiled code between cases (the hooks differ), including generate()'s cached compiled call."""
    torch._dynamo.reset()
    model.__dict__.pop("_compiled_call", None)
    model.__dict__.pop("_last_compile_config", None)


@torch.no_grad()
def run_compiled_case(model, inputs, spec: str | None, new_tokens: int, device: str, repeats: int,
                      mode: str) -> dict:
    """Batch-1 prefill and per-token decode, both compiled, under ``spec`` (None: dense)."""
    from transformers import CompileConfig

    _fresh_compile_state(model)
    handle = mmeff.apply(model, spec) if spec else None
    try:
        eager_prefill_s, _ = timed(lambda: model(**inputs, use_cache=True), device, repeats)
        compiled = torch.compile(model, mode=mode)
        t0 = time.perf_counter()
        for _ in range(3):  # compile, then CUDA-graph warm-up and recording under reduce-overhead
            compiled(**inputs, use_cache=True)
        sync(device)
        prefill_compile_s = time.perf_counter() - t0
        prefill_s, out = timed(lambda: compiled(**inputs, use_cache=True), device, repeats)
        logits = out.logits[:, -1].float()
        del out
        config = CompileConfig(fullgraph=True, mode=mode)
        config._compile_all_devices = True  # also on the CPU (--tiny); the GPU compiles by default

        def gen(n: int):
            return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  cache_implementation="static", compile_config=config)

        t0 = time.perf_counter()
        gen(new_tokens)
        sync(device)
        decode_compile_s = time.perf_counter() - t0
        one_s, _ = timed(lambda: gen(1), device, repeats)
        many_s, tokens = timed(lambda: gen(new_tokens), device, repeats)
        rep = handle.report() if handle else {}
        return {"spec": spec or "dense", "batch": 1, "compile_mode": mode, "prefill_eager_s": eager_prefill_s,
                "prefill_s": prefill_s, "decode_s_per_token": (many_s - one_s) / max(1, new_tokens - 1),
                "generate_s": many_s, "prefill_compile_s": prefill_compile_s, "decode_compile_s": decode_compile_s,
                "last_logits_head": logits[0, :4].tolist(), "tokens": tokens[0, -new_tokens:].tolist(),
                "equivalent_budget": rep.get("equivalent_budget"), "prefill_tflops": rep.get("prefill_tflops")}
    finally:
        if handle:
            handle.remove()
        _fresh_compile_state(model)


def run_compiled(model, args, budgets: list[int], device: str, dtype: torch.dtype) -> list[dict]:
    """Dense and every method x budget, all compiled, at batch 1 (ratios against the compiled dense run)."""
    inputs = make_batch(model, 1, args.text_len, device, dtype)
    dense = run_compiled_case(model, inputs, None, args.new_tokens, device, args.repeats, args.compile_mode)
    results = [dense]
    print(f"compiled dense: prefill {dense['prefill_s'] * 1e3:.2f} ms (eager {dense['prefill_eager_s'] * 1e3:.2f}), "
          f"decode {dense['decode_s_per_token'] * 1e3:.2f} ms/token")
    for method in args.methods.split(","):
        for b in budgets:
            r = run_compiled_case(model, inputs, f"{method}:budget={b}", args.new_tokens, device, args.repeats,
                                  args.compile_mode)
            r.update(prefill_speedup=dense["prefill_s"] / r["prefill_s"],
                     decode_speedup=dense["decode_s_per_token"] / r["decode_s_per_token"]
                     if r["decode_s_per_token"] > 0 else None,
                     prefill_speedup_vs_eager_dense=dense["prefill_eager_s"] / r["prefill_s"])
            results.append(r)
            print(f"compiled {r['spec']}: prefill x{r['prefill_speedup']:.2f} "
                  f"({r['prefill_s'] * 1e3:.2f} ms), decode {r['decode_s_per_token'] * 1e3:.2f} ms/token")
    return results


def profile_prefill(model, inputs, spec: str | None, device: str) -> None:
    """Print torch.profiler's top ops for one prefill under ``spec`` (to find syncs and slow kernels)."""
    from torch.profiler import ProfilerActivity, profile

    handle = mmeff.apply(model, spec) if spec else None
    try:
        with torch.no_grad():
            model(**inputs, use_cache=True)
            sync(device)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
            with profile(activities=acts) as prof:
                model(**inputs, use_cache=True)
                sync(device)
        key = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
        print(f"--- profile of one prefill, {spec or 'dense'}, sorted by {key}")
        print(prof.key_averages().table(sort_by=key, row_limit=25))
        print(f"--- same, sorted by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    finally:
        if handle:
            handle.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_vlm_pruning.json")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--budgets", default="192,128,64")
    ap.add_argument("--methods", default="fastv,entropyprune")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--text-len", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", nargs="*", default=None, metavar="SPEC",
                    help="after the timings, profile one batch-1 prefill per SPEC ('dense' for none)")
    ap.add_argument("--tiny", action="store_true", help="tiny random model on CPU (checks the script only)")
    ap.add_argument("--compiled", action="store_true",
                    help="batch 1 only: dense and pruned, both compiled (prefill and per-token decode)")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode for --compiled (default: reduce-overhead on GPU, default on CPU)")
    args = ap.parse_args()

    if args.tiny:
        from mmeff.zoo.tiny_models import tiny_llava
        device, dtype = "cpu", torch.float32
        model = tiny_llava(layers=8)
        budgets = [12, 8]
        args.new_tokens, args.repeats = 4, 1
        if args.compiled:
            model, budgets = tiny_llava(layers=4), [8]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("this benchmark needs a CUDA GPU (use --tiny to check the script on CPU)")
        device, dtype = "cuda", torch.bfloat16
        model = build_llava_7b(device, dtype)
        budgets = [int(b) for b in args.budgets.split(",")]

    results = []
    if args.compiled:
        args.compile_mode = args.compile_mode or ("reduce-overhead" if device == "cuda" else "default")
        args.batches = "1"
        results = run_compiled(model, args, budgets, device, dtype)
    for batch in [int(b) for b in args.batches.split(",")] if not args.compiled else []:
        inputs = make_batch(model, batch, args.text_len, device, dtype)
        dense = run_case(model, inputs, None, args.new_tokens, device, args.repeats)
        dense.update(batch=batch)
        results.append(dense)
        print(f"batch {batch} dense: prefill {dense['prefill_s'] * 1e3:.1f} ms, generate {dense['generate_s']:.2f} s")
        for method in args.methods.split(","):
            for b in budgets:
                r = run_case(model, inputs, f"{method}:budget={b}", args.new_tokens, device, args.repeats)
                r.update(batch=batch, prefill_speedup=dense["prefill_s"] / r["prefill_s"],
                         generate_speedup=dense["generate_s"] / r["generate_s"],
                         kv_cache_ratio=r["kv_cache_bytes"] / dense["kv_cache_bytes"])
                results.append(r)
                print(f"batch {batch} {r['spec']}: prefill x{r['prefill_speedup']:.2f}, generate "
                      f"x{r['generate_speedup']:.2f}, KV {r['kv_cache_ratio']:.2f}, method "
                      f"{r['method_s_per_prompt'] * 1e3:.2f} ms")
    if args.profile is not None:
        inputs = make_batch(model, 1, args.text_len, device, dtype)
        for spec in args.profile or ["dense"]:
            profile_prefill(model, inputs, None if spec == "dense" else spec, device)
    import transformers
    meta = {"config": vars(args), "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "mmeff": mmeff.__version__, "python": platform.python_version()},
            "mode": "compiled" if args.compiled else "eager"}
    from pathlib import Path
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print("wrote", args.out)


if __name__ == "__main__":
    main()

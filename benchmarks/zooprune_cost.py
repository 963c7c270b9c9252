"""ZOO-Prune's cost at LLaVA-1.5-7B size, as a share of the dense prefill (issue 17).

Counts FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` on the real module graph:

- the dense prefill of a LLaVA-1.5-7B-shaped model (CLIP ViT-L/336 + Llama-7B, 576 visual tokens, B=1);
- ZOO-Prune's projector sensitivity over the 576 tokens with m directions: central finite differences (two
  projector passes per (token, direction) pair, the official form), the generic JVP (``torch.func.jvp`` per
  pair) and the structured JVP mmeff uses on its hosts (primal once per token; ``W1 u_j`` once per direction;
  one ``W2`` matmul per pair).

On ``--device meta`` nothing is allocated and no weights exist, so the count runs on any CPU in seconds; on a
GPU (``--device cuda``) the same script also times both estimators and the dense prefill (median of
``--repeats``), so the FLOP shares and the time shares come from one run. The reference estimates about
3.1 TFLOPs for the finite-difference form against about 8.5 TFLOPs for the dense prefill.

    python benchmarks/zooprune_cost.py --out docs/results/zooprune-cost-llava7b.json            # FLOPs, CPU
    python benchmarks/zooprune_cost.py --device cuda --out runs/zooprune-cost-gpu.json          # + timings
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vlm_pruning import build_llava_7b, make_batch  # noqa: E402

from mmeff.hosts.projector_probe import row_projector  # noqa: E402
from mmeff.pruners.zoo_sensitivity import draw_directions, projector_sensitivity  # noqa: E402


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of one call of ``fn`` as counted by torch's flop counter."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def median_seconds(fn: Callable[[], Any], device: str, repeats: int) -> float | None:
    """Median wall seconds of ``fn`` after one warm-up (None on the meta device: nothing runs)."""
    if device == "meta":
        return None
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="meta", help="meta (FLOPs only, any CPU) or cuda (FLOPs and timings)")
    p.add_argument("--directions", type=int, default=64, help="m, ZOO-Prune's number of random directions")
    p.add_argument("--chunk", type=int, default=4096, help="(token, direction) pairs per projector call")
    p.add_argument("--text-len", type=int, default=40, help="text tokens around the image in the prompt")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = build_llava_7b(args.device, dtype)
    inputs = make_batch(model, 1, args.text_len, "cpu", dtype)
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    d_in = model.config.vision_config.hidden_size
    projector = model.model.multi_modal_projector
    x = torch.randn(n_visual, d_in, device=args.device, dtype=dtype)
    u = draw_directions(torch.Generator().manual_seed(0), args.directions, d_in).to(args.device, dtype)

    @torch.inference_mode()
    def dense() -> Any:
        if args.device != "meta":
            return model(**inputs, use_cache=False, logits_to_keep=1)
        # meta tensors have no values, so the model's image-token bookkeeping cannot run: the same three
        # stages by hand (tower at the feature layer, projector, LLM over the spliced sequence)
        tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        feats = projector(tower.hidden_states[model.config.vision_feature_layer][:, 1:])
        length = inputs["input_ids"].shape[1]
        embeds = torch.empty(1, length, feats.shape[-1], device="meta", dtype=dtype)
        mask = torch.zeros(1, 1, length, length, device="meta", dtype=dtype)  # 4-D: taken as given
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                            position_ids=torch.arange(length, device="meta")[None],
                                            use_cache=False).last_hidden_state
        return model.lm_head(hidden[:, -1:])

    structured = row_projector(projector)
    assert structured.first is not None, "the LLaVA projector should expose its MLP parts"
    forms = {"fd": (projector, "fd"), "jvp_generic": (projector, "jvp"), "jvp_structured": (structured, "jvp")}

    def sensitivity(form: str) -> Callable[[], Any]:
        fn, estimator = forms[form]
        return lambda: projector_sensitivity(fn, x, u, estimator=estimator, chunk=args.chunk)

    rows: dict[str, Any] = {}
    dense_flops = count_flops(dense)
    rows["dense_prefill"] = {"tflops": dense_flops / 1e12,
                             "seconds": median_seconds(dense, args.device, args.repeats)}
    for est in forms:
        flops = count_flops(sensitivity(est))
        secs = median_seconds(sensitivity(est), args.device, args.repeats)
        rows[f"zooprune_{est}"] = {
            "tflops": flops / 1e12, "share_of_dense_flops": flops / dense_flops, "seconds": secs,
            "share_of_dense_time": (secs / rows["dense_prefill"]["seconds"]
                                    if secs is not None and rows["dense_prefill"]["seconds"] else None)}
    import transformers

    result = {
        "what": "ZOO-Prune projector sensitivity vs dense prefill, LLaVA-1.5-7B shape (random weights), batch 1",
        "config": {**vars(args), "n_visual": n_visual, "projector": "Linear(1024, 4096) -> GELU -> Linear(4096, 4096)",
                   "dtype": str(dtype)},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "machine": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                    else f"{platform.machine()} CPU (meta device: FLOPs counted, nothing timed)"),
        "reference_estimate_tflops": {"zooprune_fd": 3.1, "dense_prefill": 8.5},
        "default_estimator": "jvp (structured on all four hosts)",
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, r in rows.items():
        share = r.get("share_of_dense_flops")
        print(f"{name:16s} {r['tflops']:7.3f} TFLOPs" + (f"  ({share:.1%} of dense)" if share is not None else "")
              + (f"  {r['seconds'] * 1e3:.1f} ms" if r["seconds"] is not None else ""))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""lmms-eval model ``mmeff``: a zoo model or any HF LLaVA / Qwen-VL checkpoint, with mmeff methods.

Registered through the entry point ``lmms_eval.models: mmeff = mmeff.eval.lmms_plugin:MANIFEST``::

    python -m lmms_eval --model mmeff --model_args pretrained=tiny-llava,method=fastv:keep=64 \
        --tasks mmeff_pope_random --include_path $(python -m mmeff.eval.data --limit 50) --limit 50

Data parallel, one process per GPU (or per CPU share), lmms-eval splitting the documents::

    torchrun --nproc_per_node 2 -m lmms_eval --model mmeff --model_args pretrained=tiny-llava ...
    accelerate launch --num_processes 2 -m lmms_eval --model mmeff --model_args pretrained=tiny-llava ...

Model arguments (``--model_args k=v,k=v``):

- ``pretrained``: ``tiny-llava`` / ``tiny-qwen2-vl`` (shipped zoo models), a local folder or a hub id
  (``llava-hf/llava-1.5-7b-hf``); loaded with :func:`mmeff.zoo.load`.
- ``method``: an mmeff method spec. lmms-eval splits ``--model_args`` on commas, so write the
  method's own options with ``;`` or ``|`` instead of ``,``:
  ``method=entropyprune:budget=128;layer=2`` or ``method=fastv:keep=64|layer=2``
  (a quoted value also works: ``method="entropyprune:budget=128,layer=2"``). Methods that act on
  different stages are joined with ``+``. ``method=none`` (or leaving it out) is dense.
  Tuple-valued options keep their ``;``-separated items: ``heads=1;2;layer=3`` reads as
  ``heads=(1, 2), layer=3`` (an item without ``=`` continues the previous option).
  Pruner sizes: ``budget=B`` is the layer-averaged equivalent budget, ``keep=N`` the tokens kept after
  the cut (see :class:`mmeff.pruners.base.PrunerConfig`).
- ``device`` (default: cuda if available, else cpu; ``cuda:<LOCAL_RANK>`` under a multi-process launch),
  ``dtype`` (``auto``/``float32``/``bfloat16``/``float16``), ``attn_implementation`` (default ``sdpa``),
  ``batch_size``, ``max_new_tokens`` (a cap used when a task gives none), ``system_prompt``.

A method that cannot run on the model (wrong kind, a budget the images cannot meet) is found when the
model is built, by one short generation with it applied. lmms-eval's CLI turns every exception into a log
line and exits 0, so a model built by that CLI (:meth:`MmeffLMM.create_from_arg_string`) prints one
``mmeff: error:`` line on stderr and exits with status 2 instead; used from Python it raises the
:class:`~mmeff.core.errors.MmeffError`.

Requests are batched (left padding, the processor's chat template). For every request the model
records the visual tokens entering the LLM, the equivalent budget (visual tokens averaged over all
LLM layers), prefill TFLOPs and wall time (:attr:`MmeffLMM.records`, :meth:`MmeffLMM.summary`), read
from :meth:`mmeff.Handle.report` when a method is applied.
"""
from __future__ import annotations

MODEL_ID = "mmeff"
CLASS_PATH = "mmeff.eval.lmms_plugin.MmeffLMM"


def _manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


# Importing ``lmms_eval.models`` (below) loads every entry-point manifest, including ours; when this
# module is imported first, lmms-eval then finds it half-initialised. A callable payload is accepted
# by lmms-eval, so MANIFEST exists from the start and becomes the instance at the end of the module.
MANIFEST = _manifest

import contextlib
import json
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from ..core.errors import ConfigError, MmeffError

try:  # tqdm comes with lmms-eval; keep the plugin importable without it anyway
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None  # type: ignore[assignment]

DENSE_WORDS = frozenset({"", "none", "dense", "off", "null"})


# --------------------------------------------------------------------------- method model-arg parsing

def parse_method_arg(value: Any) -> list[str]:
    """Method spec strings from an lmms-eval ``method=`` model arg (see the module docstring).

    ``"entropyprune:budget=64;layer=2"`` -> ``["entropyprune:budget=64,layer=2"]``;
    ``"fastv:budget=64|layer=3+random:budget=32"`` -> two specs; ``None``/``"none"`` -> ``[]``.
    The specs are only re-spelled here; :func:`mmeff.parse_method` validates them.
    """
    if value is None or value is False:
        return []
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in parse_method_arg(v)]
    text = str(value).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if text.lower() in DENSE_WORDS:
        return []
    specs = []
    for part in text.split("+"):
        part = part.strip()
        if not part:
            raise ConfigError(f"empty method in {value!r}; join methods with '+', e.g. fastv:budget=64+vhr")
        name, _, rest = part.partition(":")
        name = name.strip()
        if not name:
            raise ConfigError(f"method spec {part!r} has no method name (expected e.g. fastv:budget=64)")
        items: list[str] = []
        for piece in re.split(r"[;,|]", rest):
            piece = piece.strip()
            if not piece:
                continue
            if "=" in piece or not items:
                items.append(piece)
            else:  # an item of a tuple value such as heads=1;2
                items[-1] += ";" + piece
        specs.append(name + (":" + ",".join(items) if items else ""))
    return specs


def _to_dtype(dtype: Any) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    s = str(dtype).lower().replace("torch.", "")
    if s == "auto":
        return "auto"
    table = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if s not in table:
        raise ConfigError(f"dtype {dtype!r} not understood; use auto, float32, bfloat16 or float16")
    return table[s]


def world_size() -> int:
    """Processes of a ``torchrun`` / ``accelerate launch`` run (1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _device(device: Any) -> str:
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if world_size() > 1 else "cuda"
        return "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available; pass device=cpu")
    return str(device)


def _exit_with(error: Exception) -> None:
    print(f"mmeff: error: {error}", file=sys.stderr)
    raise SystemExit(2)


# --------------------------------------------------------------------------- the model

class MmeffLMM(lmms):
    """lmms-eval ``simple`` model running a transformers VLM with optional mmeff methods.

    ``model``/``processor`` may be given directly (tests, the runner); otherwise ``pretrained`` is
    loaded with :func:`mmeff.zoo.load`. :meth:`set_methods` swaps the applied methods between
    evaluations without reloading the model.
    """

    is_simple = True

    def __init__(self, pretrained: str = "tiny-llava", method: Any = None, device: Any = None,
                 dtype: Any = None, batch_size: Any = 1, attn_implementation: str = "sdpa",
                 max_new_tokens: int | None = None, system_prompt: str | None = None,
                 progress: bool = True, model: Any = None, processor: Any = None, exit_on_error: bool = False,
                 **kwargs: Any) -> None:
        super().__init__()
        self.exit_on_error = bool(exit_on_error)
        for key in ("max_batch_size", "trust_remote_code", "use_cache"):
            kwargs.pop(key, None)
        if kwargs:
            raise ConfigError(
                f"mmeff lmms-eval model: unknown model_args {sorted(kwargs)}; valid: pretrained, method, device, "
                "dtype, batch_size, attn_implementation, max_new_tokens, system_prompt"
            )
        self.pretrained = str(pretrained)
        self._device = _device(device)
        if world_size() > 1:
            self._join_process_group()
        if model is None or processor is None:
            from mmeff.zoo import load as zoo_load

            dt = _to_dtype(dtype)
            model, processor = zoo_load(self.pretrained, device=self._device,
                                        attn_implementation=attn_implementation,
                                        **({"dtype": dt} if dt is not None else {}))
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"
        try:
            self.batch_size_per_gpu = max(1, int(batch_size))
        except (TypeError, ValueError):  # "auto"
            self.batch_size_per_gpu = 1
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens else None
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None
        self.progress = bool(progress)
        cfg = model.config
        self.text_config = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.n_layers = int(self.text_config.num_hidden_layers)
        tok_id = getattr(cfg, "image_token_id", None)
        if tok_id is None:
            tok_id = getattr(cfg, "image_token_index", None)
        self.image_token_id = int(tok_id) if tok_id is not None else None
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        self._adds_bos = self._tokenizer_adds_bos()
        self.handle = None
        self.method_specs: list[str] = []
        self.records: list[dict[str, Any]] = []
        self._prompts_seen = 0
        self._method_seconds_seen = 0.0
        with self._fatal_on_error():
            self.set_methods(method)
            if self.handle is not None:  # a method that cannot run on this model fails here, not mid-evaluation
                self.warmup()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "MmeffLMM":
        """lmms-eval's CLI entry: as the base class, but an mmeff error exits with status 2 (see the module doc)."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        args.update({k: v for k, v in (additional_config or {}).items() if v is not None})
        args["exit_on_error"] = True
        try:
            return cls(**args)
        except MmeffError as e:
            _exit_with(e)

    @contextlib.contextmanager
    def _fatal_on_error(self) -> Iterator[None]:
        """With ``exit_on_error``, an MmeffError becomes one stderr line and exit status 2."""
        try:
            yield
        except MmeffError as e:
            if self.exit_on_error:
                _exit_with(e)
            raise

    def _join_process_group(self) -> None:
        """Join (or start) the torch.distributed group of a multi-process launch and take its rank, so that
        lmms-eval shards the documents and gathers the results (gloo on the CPU, nccl on GPUs)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            if self._device.startswith("cuda"):
                torch.cuda.set_device(torch.device(self._device))
            dist.init_process_group(backend="nccl" if self._device.startswith("cuda") else "gloo")
        self._rank = dist.get_rank()
        self._world_size = dist.get_world_size()

    def gather_records(self) -> None:
        """Under data parallelism, replace each process's records with every process's (in rank order)."""
        import torch.distributed as dist

        if self._world_size > 1 and dist.is_initialized():
            parts: list[Any] = [None] * self._world_size
            dist.all_gather_object(parts, self.records)
            self.records = [r for part in parts for r in part]

    # ------------------------------------------------------------------ methods
    @property
    def label(self) -> str:
        return "+".join(self.method_specs) if self.method_specs else "dense"

    def set_methods(self, method: Any) -> None:
        """Remove the applied methods (if any) and apply ``method`` (spec string(s) or configs; None = dense)."""
        import mmeff

        self.remove_methods()
        if method is None:
            specs: list[Any] = []
        elif isinstance(method, (list, tuple)):
            specs = [m for v in method for m in (parse_method_arg(v) if isinstance(v, str) else [v])]
        elif isinstance(method, str):
            specs = parse_method_arg(method)
        else:
            specs = [method]
        if not specs:
            return
        configs = [mmeff.parse_method(s) for s in specs]
        self.handle = mmeff.apply(self.model, *configs)
        self.method_specs = [c.spec() for c in configs]
        self._prompts_seen = 0
        self._method_seconds_seen = 0.0

    def remove_methods(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        self.handle = None
        self.method_specs = []

    def reset_records(self) -> None:
        self.records = []

    def warmup(self) -> None:
        """One short generation on a world scene, so the first timed run does not pay for warm-up."""
        from mmeff.zoo.world import generate_scene, render

        inputs = self._encode([self._prompt("Describe the image.", 1)], [render(generate_scene(0)).convert("RGB")])
        with torch.inference_mode():
            self._run(lambda x: self.model.generate(**x, **self._generation_args({"max_new_tokens": 2})), inputs, True)
        if self.handle is not None:  # do not count the warm-up prompt in the records
            rep = self.handle.report()
            self._prompts_seen = int(rep.get("prompts", 0) or 0)
            self._method_seconds_seen = float(rep.get("method_seconds", 0.0) or 0.0)

    # ------------------------------------------------------------------ lmms-eval plumbing
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def clean(self) -> None:
        """lmms-eval calls this after every evaluation; the base class would delete the model,
        but the runner reuses it across dense and method runs, so only free cached memory."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise MmeffError(
            "the mmeff lmms-eval model answers single-turn tasks (generate_until, loglikelihood); "
            "multi-round tasks are not supported"
        )

    # ------------------------------------------------------------------ prompts
    def _tokenizer_adds_bos(self) -> bool:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is None:
            return False
        try:
            ids = self.tokenizer("a").input_ids
        except Exception:  # pragma: no cover - exotic tokenizers
            return False
        return bool(ids) and ids[0] == bos

    def _prompt(self, context: str, n_images: int) -> str:
        if self.image_token in context:  # the task placed its own image tokens
            n_images = 0
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": context}]
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if template:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:  # no template: the LLaVA-1.5 conversation format
            sys = f"{self.system_prompt} " if self.system_prompt else ""
            text = f"{sys}USER: {(self.image_token + chr(10)) * n_images}{context} ASSISTANT:"
        bos = getattr(self.tokenizer, "bos_token", None)
        if self._adds_bos and bos and text.startswith(bos):  # the tokenizer adds it again otherwise
            text = text[len(bos):]
        return text

    def _visuals(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> list[Any]:
        if doc_to_visual is None:
            return []
        vis = doc_to_visual(self.task_dict[task][split][doc_id])
        if vis is None:
            return []
        vis = list(vis) if isinstance(vis, (list, tuple)) else [vis]
        for v in vis:
            if isinstance(v, (str, dict)):
                raise MmeffError(
                    f"task {task!r} gives {type(v).__name__} visuals (video/audio); the mmeff model takes images only"
                )
        return [v.convert("RGB") if hasattr(v, "convert") else v for v in vis]

    def _encode(self, texts: list[str], images: list[Any]) -> dict[str, torch.Tensor]:
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        inputs = self.processor(**kwargs)
        dtype = next(self.model.parameters()).dtype
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device)
                if v.is_floating_point():
                    v = v.to(dtype)
            out[k] = v
        return out

    # ------------------------------------------------------------------ accounting
    def _account(self, inputs: dict[str, torch.Tensor], meta: list[tuple[str, int]], seconds: float) -> None:
        """One record per request of the batch: visual tokens, equivalent budget, FLOPs, time."""
        from mmeff.hosts.flops import prefill_flops

        ids = inputs["input_ids"]
        bsz = ids.shape[0]
        am = inputs.get("attention_mask")
        lengths = am.sum(1).tolist() if am is not None else [ids.shape[1]] * bsz
        vis = (ids == self.image_token_id).sum(1).tolist() if self.image_token_id is not None else [0] * bsz
        cuts: list[int] = []                  # the plan's cut layers (0 = before the LLM) and kept counts per cut
        kept_cuts: list[list[int]] = []
        method_seconds = 0.0
        if self.handle is not None:
            rep = self.handle.report()
            prompts = int(rep.get("prompts", 0) or 0)
            if prompts > self._prompts_seen and "visual_tokens_per_sample" in rep:
                vis = list(rep["visual_tokens_per_sample"])
                cuts = list(rep["cut_layers"])
                kept_cuts = [list(k) for k in rep["kept_per_cut_per_sample"]]
            self._prompts_seen = prompts
            total = float(rep.get("method_seconds", 0.0) or 0.0)
            method_seconds, self._method_seconds_seen = max(0.0, total - self._method_seconds_seen), total
        for b, (task, doc_id) in enumerate(meta):
            per_layer = [vis[b]] * self.n_layers
            for layer, kept in zip(cuts, kept_cuts):
                per_layer[layer:] = [kept[b]] * (self.n_layers - layer)
            equal_token = per_layer[1:] + per_layer[-1:]  # the papers' count: a layer before a cut counts its output
            text = lengths[b] - vis[b]
            dense = prefill_flops(self.text_config, [lengths[b]] * self.n_layers)
            pruned = prefill_flops(self.text_config, [text + t for t in per_layer])
            self.records.append({
                "task": task, "doc_id": int(doc_id), "method": self.label,
                "visual_tokens": int(vis[b]), "visual_tokens_in": float(per_layer[0]),
                "equivalent_budget": sum(per_layer) / self.n_layers,
                "equal_token_budget": sum(equal_token) / self.n_layers,
                "prefill_tflops": pruned / 1e12, "prefill_tflops_dense": dense / 1e12,
                "seconds": seconds / bsz, "method_seconds": method_seconds / bsz,
            })

    def summary(self, task: str | None = None) -> dict[str, Any]:
        """Means over the recorded requests (of one task, or all): tokens, budget, FLOPs; total time."""
        recs = [r for r in self.records if task is None or r["task"] == task]
        if not recs:
            return {"requests": 0}
        n = len(recs)

        def mean(key: str) -> float:
            return sum(r[key] for r in recs) / n

        return {
            "requests": n,
            "visual_tokens": mean("visual_tokens"),
            "visual_tokens_in": mean("visual_tokens_in"),
            "equivalent_budget": mean("equivalent_budget"),
            "equal_token_budget": mean("equal_token_budget"),
            "prefill_tflops": mean("prefill_tflops"),
            "prefill_tflops_dense": mean("prefill_tflops_dense"),
            "seconds": sum(r["seconds"] for r in recs),
            "seconds_per_request": mean("seconds"),
            "method_seconds": sum(r["method_seconds"] for r in recs),
        }

    # ------------------------------------------------------------------ batching
    def _batches(self, requests: list[Instance], key_fn: Any) -> Iterable[list[tuple[int, tuple]]]:
        groups: dict[Any, list[tuple[int, tuple]]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[key_fn(req.args)].append((i, req.args))
        bs = self.batch_size_per_gpu
        for items in groups.values():
            for s in range(0, len(items), bs):
                yield items[s:s + bs]

    def _run(self, fn: Any, inputs: dict[str, torch.Tensor], has_images: bool) -> Any:
        """Call ``fn(inputs)``; a batch without images runs with the methods lifted (they need images)."""
        if self.handle is None or has_images:
            return fn(inputs)
        specs = list(self.method_specs)
        self.remove_methods()
        try:
            return fn(inputs)
        finally:
            self.set_methods(specs)

    def _pbar(self, total: int, what: str) -> Any:
        if tqdm is None or not self.progress or self.rank != 0:
            return None
        return tqdm(total=total, desc=f"mmeff {what} [{self.label}]", leave=False)

    # ------------------------------------------------------------------ generate_until
    def generate_until(self, requests: list[Instance]) -> list[str]:
        with self._fatal_on_error():
            return self._generate_until(requests)

    def _generate_until(self, requests: list[Instance]) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        pbar = self._pbar(len(requests), "generate")

        def key(args: tuple) -> tuple:
            return (args[4], args[5], json.dumps(args[1], sort_keys=True, default=str))

        for batch in self._batches(requests, key):
            contexts, prompts, images, meta = [], [], [], []
            for _, (context, gen_kwargs, doc_to_visual, doc_id, task, split) in batch:
                vis = self._visuals(doc_to_visual, task, split, doc_id)
                contexts.append(context)
                prompts.append(self._prompt(context, len(vis)))
                images.extend(vis)
                meta.append((task, doc_id))
            gen_kwargs = dict(batch[0][1][1] or {})
            until = gen_kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            gen = self._generation_args(gen_kwargs)
            self._sync()
            t0 = time.perf_counter()
            inputs = self._encode(prompts, images)
            with torch.inference_mode():
                out = self._run(lambda x, g=gen: self.model.generate(**x, **g), inputs, bool(images))
            self._sync()
            seconds = time.perf_counter() - t0
            self._account(inputs, meta, seconds)
            new_tokens = out[:, inputs["input_ids"].shape[1]:]
            texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for (i, args), text in zip(batch, texts):
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop)[0]
                text = text.strip()
                results[i] = text
                self.cache_hook.add_partial("generate_until", (args[0], args[1]), text)
            if pbar is not None:
                pbar.update(len(batch))
        if pbar is not None:
            pbar.close()
        return [r if r is not None else "" for r in results]

    def _generation_args(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        max_new = gen_kwargs.get("max_new_tokens") or self.max_new_tokens or 128
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
        gen: dict[str, Any] = {"max_new_tokens": int(max_new), "do_sample": do_sample,
                               "num_beams": int(gen_kwargs.get("num_beams", 1) or 1)}
        if do_sample:
            gen["temperature"] = temperature if temperature > 0 else 1.0
            if gen_kwargs.get("top_p") is not None:
                gen["top_p"] = float(gen_kwargs["top_p"])
        else:  # silence "temperature is set but do_sample=False" from checkpoint generation configs
            gen.update(temperature=None, top_p=None, top_k=None)
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        gen["pad_token_id"] = pad if pad is not None else eos
        if eos is not None:
            gen["eos_token_id"] = eos
        return gen

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        with self._fatal_on_error():
            return self._loglikelihood(requests)

    def _loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """log P(continuation | image, chat prompt) and whether it is the greedy continuation.

        The continuation is appended after the assistant prompt; its tokens are the last ones of the
        sequence, so the logits line up from the right even when a method prunes visual tokens.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = self._pbar(len(requests), "loglikelihood")
        for batch in self._batches(requests, lambda a: (a[4], a[5])):
            full, images, meta, n_cont = [], [], [], []
            for _, (context, continuation, doc_to_visual, doc_id, task, split) in batch:
                vis = self._visuals(doc_to_visual, task, split, doc_id)
                prompt = self._prompt(context, len(vis))
                text = prompt + continuation
                n = (len(self.tokenizer(text, add_special_tokens=False).input_ids)
                     - len(self.tokenizer(prompt, add_special_tokens=False).input_ids))
                if n < 1:
                    raise ConfigError(f"empty continuation for doc {doc_id} of task {task!r}")
                full.append(text)
                images.extend(vis)
                meta.append((task, doc_id))
                n_cont.append(n)
            self._sync()
            t0 = time.perf_counter()
            inputs = self._encode(full, images)
            with torch.inference_mode():
                logits = self._run(lambda x: self.model(**x, use_cache=False).logits, inputs, bool(images))
            self._sync()
            self._account(inputs, meta, time.perf_counter() - t0)
            ids = inputs["input_ids"]
            for b, ((i, args), n) in enumerate(zip(batch, n_cont)):
                logp = torch.log_softmax(logits[b, -n - 1:-1].float(), dim=-1)
                target = ids[b, -n:]
                score = float(logp.gather(-1, target[:, None]).sum())
                greedy = bool((logp.argmax(-1) == target).all())
                results[i] = (score, greedy)
                self.cache_hook.add_partial("loglikelihood", (args[0], args[1]), (score, greedy))
            if pbar is not None:
                pbar.update(len(batch))
        if pbar is not None:
            pbar.close()
        return [r if r is not None else (float("-inf"), False) for r in results]


MANIFEST = ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
"""Entry point payload (``[project.entry-points."lmms_eval.models"] mmeff = ...:MANIFEST``)."""

__all__ = ["MANIFEST", "MmeffLMM", "parse_method_arg"]

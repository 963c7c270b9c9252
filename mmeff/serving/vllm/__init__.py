"""mmeff's pre-LLM visual-token pruners inside an unmodified vLLM (a ``vllm.general_plugins`` plugin).

Serve a pruned model by choosing an ``Mmeff*`` architecture and a spec string (the same spelling as
``mmeff.apply``)::

    vllm serve <llava-folder> --hf-overrides \
      '{"architectures": ["MmeffLlavaForConditionalGeneration"], "mmeff_prune": "random:budget=64,positions=reindex"}'

Qwen2-VL: ``MmeffQwen2VLForConditionalGeneration`` (original M-RoPE positions), served with
``--worker-cls mmeff.serving.vllm.worker.MmeffCPUWorker``. vLLM is imported only by :mod:`.llava`,
:mod:`.qwen2_vl` and :mod:`.worker` (loaded by vLLM itself), so ``import mmeff`` works without it.
See docs/serving-vllm.md for what works and what does not.
"""
from .spec import SPEC_KEY, kept_per_image, parse_serving_spec

__all__ = ["SPEC_KEY", "parse_serving_spec", "kept_per_image"]

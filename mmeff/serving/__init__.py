"""Serving integrations: mmeff methods inside inference servers (today: a vLLM plugin, ``mmeff.serving.vllm``)."""

"""Evaluation of mmeff methods with lmms-eval.

- :mod:`mmeff.eval.tasks`: local lmms-eval tasks over the shapes world (``mmeff_world`` group).
- :mod:`mmeff.eval.data`: deterministic JSONL data + generated task YAMLs in a cache dir.
- :mod:`mmeff.eval.lmms_plugin`: the lmms-eval model ``mmeff`` (zoo or HF VLM + mmeff methods).
- :mod:`mmeff.eval.runner`: dense vs method runs through ``lmms_eval.evaluator.simple_evaluate``.
- :mod:`mmeff.eval.report` / :mod:`mmeff.eval.plots`: tables, JSON and retention-vs-budget plots.

Nothing here imports lmms-eval at package import time (it takes seconds).
"""

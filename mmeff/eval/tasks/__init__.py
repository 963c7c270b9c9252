"""Local lmms-eval tasks over the shapes world (no hub, no image files).

One task per question family of :mod:`mmeff.zoo.world.questions` (existence split into the three
POPE settings), grouped as ``mmeff_world`` (and ``mmeff_pope`` for the three POPE tasks).

The static parts of each task live next to this file as YAML templates whose names start with
``_`` (so lmms-eval never registers them as tasks on their own):

- ``_mmeff_default.yaml``: split, output type, ``doc_to_*`` and ``process_results`` (all in
  :mod:`mmeff.eval.tasks.utils`, referenced by absolute module path);
- ``_mmeff_pope.yaml`` / ``_mmeff_qa.yaml`` / ``_mmeff_caption.yaml``: metrics and generation
  settings per kind of task.

lmms-eval needs absolute local ``data_files`` paths, which depend on where the data was generated,
so the per-task YAMLs (a few lines: task name, ``include:`` of a template by absolute path, the
JSONL path) are written at run time next to the data by :func:`mmeff.eval.data.prepare_tasks`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent
PREFIX = "mmeff_"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One local task: which world rows it holds and which template it uses."""

    name: str
    family: str                 # question family in mmeff.zoo.world.FAMILIES
    template: str               # "pope" | "qa" | "caption"
    pope: str | None = None     # POPE negative setting for existence tasks
    primary: str = "exact_match"  # the metric used for retention plots
    weak: bool = False          # rows from weak-evidence scenes (mmeff.zoo.world.weak), the hallucination bench

    @property
    def template_path(self) -> Path:
        return TEMPLATE_DIR / f"_mmeff_{self.template}.yaml"


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("mmeff_pope_random", "existence", "pope", pope="random"),
    TaskSpec("mmeff_pope_popular", "existence", "pope", pope="popular"),
    TaskSpec("mmeff_pope_adversarial", "existence", "pope", pope="adversarial"),
    TaskSpec("mmeff_colour", "colour", "qa"),
    TaskSpec("mmeff_size", "size", "qa"),
    TaskSpec("mmeff_count", "count", "qa"),
    TaskSpec("mmeff_position", "position", "qa"),
    TaskSpec("mmeff_reading", "reading", "qa"),
    TaskSpec("mmeff_caption", "caption", "caption", primary="chair_i"),
    TaskSpec("mmeff_halluc_caption", "caption", "caption", primary="chair_s", weak=True),
    TaskSpec("mmeff_halluc_pope", "existence", "pope", pope="adversarial", weak=True),
)}
"""Task name -> spec."""

GROUPS: dict[str, tuple[str, ...]] = {
    "mmeff_world": tuple(t for t, spec in TASKS.items() if not spec.weak),
    "mmeff_halluc": tuple(t for t, spec in TASKS.items() if spec.weak),
    "mmeff_pope": ("mmeff_pope_random", "mmeff_pope_popular", "mmeff_pope_adversarial"),
}
"""Group name -> member tasks."""

LOWER_IS_BETTER = frozenset({"chair_s", "chair_i"})
"""Metrics where smaller is better (hallucination rates)."""

NOT_QUALITY = frozenset({"yes_ratio"})
"""Metrics that describe behaviour, not quality (no retention is computed for them)."""


def is_local(name: str) -> bool:
    """True for an mmeff task or group name (everything else goes to lmms-eval's own tasks)."""
    return name in TASKS or name in GROUPS


def expand(names: list[str] | tuple[str, ...]) -> list[str]:
    """Local task names with groups expanded (order kept, duplicates dropped; others skipped)."""
    out: list[str] = []
    for n in names:
        for t in GROUPS.get(n, (n,)):
            if t in TASKS and t not in out:
                out.append(t)
    return out


__all__ = ["GROUPS", "LOWER_IS_BETTER", "NOT_QUALITY", "TASKS", "TEMPLATE_DIR", "TaskSpec", "expand", "is_local"]

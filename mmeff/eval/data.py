"""Deterministic data for the mmeff world tasks, plus the lmms-eval task YAMLs that point at it.

``prepare_tasks(n=50)`` writes, under ``~/.cache/mmeff/tasks/<split>-n<n>-<fingerprint>/``::

    mmeff_pope_random.jsonl   ... one JSONL per task, exactly n rows (fewer only if the split runs out)
    mmeff_pope_random.yaml    ... `task`, `include: <package>/_mmeff_pope.yaml`, absolute data_files
    mmeff_world.yaml          ... group of all tasks; mmeff_pope.yaml: group of the three POPE tasks
    _manifest.json            ... split, n, fingerprint, rows per task

and returns that directory (pass it to ``TaskManager(include_path=...)`` or ``--include_path``).

Why generated YAMLs: lmms-eval loads local data through ``datasets.load_dataset("json",
data_files=...)`` and needs paths that exist on this machine; the data size (``n``) is chosen at
run time. The YAMLs hold only those paths; everything else is in the package's templates.

Rows come from scenes of a world split in seed order (``test`` by default: seeds 1_100_000...),
each family's questions from ``random.Random(f"questions-{seed}")``; a task takes the first ``n``
questions of its family (and POPE setting) over consecutive scenes. So the data is a pure function
of (split, n, seed_offset, world code), and the first k rows for any n >= k are the same rows.
The fingerprint hashes the world generator's source, so a changed world gets fresh data.

CLI: ``python -m mmeff.eval.data --limit 50 [--split test] [--out DIR]`` prints the directory.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..cli_args import positive_int
from .tasks import GROUPS, TASKS, TEMPLATE_DIR, TaskSpec

DATA_VERSION = 1
DEFAULT_N = 500
"""Rows per task when no limit is given."""
DEFAULT_SPLIT = "test"
MAX_SCENES_PER_ROW = 200
"""Give up on a task after n * this many scenes (adversarial POPE needs ~5 scenes per row)."""


def cache_root() -> Path:
    """``$MMEFF_CACHE/tasks`` or ``~/.cache/mmeff/tasks``."""
    base = os.environ.get("MMEFF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mmeff")
    return Path(base) / "tasks"


def fingerprint(split: str, n: int, seed_offset: int) -> str:
    """Hash of the data parameters and the code that generates the rows."""
    from mmeff.zoo import world

    h = hashlib.sha256(f"{DATA_VERSION}|{split}|{n}|{seed_offset}|{sorted(TASKS)}".encode())
    for src in sorted(Path(world.__file__).parent.glob("*.py")):
        h.update(src.read_bytes())
    h.update(Path(__file__).read_bytes())
    h.update(Path(__file__).with_name("halluc_bench.py").read_bytes())  # the bench's POPE pairs
    for tmpl in sorted(TEMPLATE_DIR.glob("_mmeff_*.yaml")):
        h.update(tmpl.read_bytes())
    return h.hexdigest()[:12]


def _matches(spec: TaskSpec, row: dict[str, Any]) -> bool:
    return not spec.weak and row["family"] == spec.family and (spec.pope is None or row["meta"].get("pope") == spec.pope)


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """A row with a fixed schema (nested dicts as JSON strings, so pyarrow never guesses)."""
    meta = row["meta"]
    return {
        "id": row["id"],
        "seed": int(row["seed"]),
        "family": row["family"],
        "question": row["question"],
        "answer": row["answer"],
        "pope": str(meta.get("pope") or ""),
        "biased": bool(meta.get("biased", False)),
        "meta": json.dumps(meta, sort_keys=True),
        "scene": json.dumps(row["scene"], sort_keys=True),
    }


def task_rows(n: int, split: str = DEFAULT_SPLIT, seed_offset: int = 0,
              tasks: list[str] | None = None, chunk: int = 64) -> dict[str, list[dict[str, Any]]]:
    """The first ``n`` rows of each task (all tasks by default), deterministic."""
    from mmeff.zoo.world import SPLITS, build_split

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    names = list(tasks) if tasks is not None else list(TASKS)
    specs = [TASKS[t] for t in names]
    out: dict[str, list[dict[str, Any]]] = {t: [] for t in names}
    start, end = SPLITS[split]
    available = end - start - seed_offset
    max_scenes = min(available, n * MAX_SCENES_PER_ROW)
    done = 0
    while done < max_scenes and any(len(out[s.name]) < n for s in specs):
        k = min(chunk, max_scenes - done)
        # all families, so a row's id (scene seed + question index) never depends on the tasks asked for
        rows = build_split(split, k, seed_offset + done, with_scene=True)
        done += k
        for row in rows:
            for s in specs:
                if len(out[s.name]) < n and _matches(s, row):
                    out[s.name].append(_flat(row))
    for s in specs:
        if s.weak:
            out[s.name] = weak_rows(s, n, seed_offset)
    return out


def weak_rows(spec: TaskSpec, n: int, seed_offset: int = 0) -> list[dict[str, Any]]:
    """The first ``n`` rows of a hallucination-bench task: weak-evidence scenes (held-out test seeds)."""
    from mmeff.eval.halluc_bench import pope_pairs
    from mmeff.zoo.world import make_caption
    from mmeff.zoo.world.questions import CAPTION_PROMPT
    from mmeff.zoo.world.weak import weak_scene, weak_seeds

    rows: list[dict[str, Any]] = []
    for seed in weak_seeds(n, seed_offset):
        scene = weak_scene(seed)
        if spec.family == "caption":
            qas = [(CAPTION_PROMPT, make_caption(scene), {"weak": True})]
        else:
            qas = [(q, a, {"weak": True, "pope": "adversarial", "biased": a == "no",
                           "shape": q.removeprefix("Is there a ").removesuffix(" in the image?")})
                   for q, a in pope_pairs(scene)]
        for j, (q, a, meta) in enumerate(qas):
            row = {"id": f"weak-{seed}-{j:02d}", "seed": seed, "family": spec.family, "question": q, "answer": a,
                   "meta": meta, "scene": scene.to_dict()}
            rows.append(_flat(row))
            if len(rows) == n:
                return rows
    return rows


def _task_yaml(spec: TaskSpec, jsonl: Path) -> str:
    # JSON is valid YAML; the paths are quoted so any character in them is safe.
    return (
        f"# generated by mmeff.eval.data; template: {spec.template_path.name}\n"
        f"task: {spec.name}\n"
        f"include: {json.dumps(str(spec.template_path))}\n"
        f"dataset_path: json\n"
        f"dataset_kwargs:\n"
        f"  data_files:\n"
        f"    test: {json.dumps(str(jsonl))}\n"
    )


def _group_yaml(name: str, members: tuple[str, ...]) -> str:
    lines = ["# generated by mmeff.eval.data", f"group: {name}", "task:"]
    lines += [f"  - {m}" for m in members]
    lines += [
        "aggregate_metric_list:",
        "  - metric: exact_match",
        "    aggregation: mean",
        "    weight_by_size: true",
        "metadata:",
        "  version: 1.0",
    ]
    return "\n".join(lines) + "\n"


def prepare_tasks(n: int | None = None, split: str = DEFAULT_SPLIT, seed_offset: int = 0,
                  out_dir: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
    """Write (or reuse) the data and task YAMLs for ``n`` rows per task; returns the include dir."""
    n = int(n or DEFAULT_N)
    fp = fingerprint(split, n, seed_offset)
    target = Path(out_dir) if out_dir is not None else cache_root() / f"{split}-n{n}-{fp}"
    manifest = target / "_manifest.json"
    if not force and manifest.is_file():
        try:
            if json.loads(manifest.read_text()).get("fingerprint") == fp:
                return target.resolve()
        except (OSError, ValueError):
            pass
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        rows = task_rows(n, split, seed_offset)
        final = target.resolve()
        for name, spec in TASKS.items():
            with (tmp / f"{name}.jsonl").open("w", encoding="utf-8") as f:
                for r in rows[name]:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            (tmp / f"{name}.yaml").write_text(_task_yaml(spec, final / f"{name}.jsonl"))
        for group, members in GROUPS.items():
            (tmp / f"{group}.yaml").write_text(_group_yaml(group, members))
        (tmp / "_manifest.json").write_text(json.dumps({
            "fingerprint": fp, "split": split, "n": n, "seed_offset": seed_offset,
            "data_version": DATA_VERSION, "rows": {k: len(v) for k, v in rows.items()},
        }, indent=2))
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race with identical content
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target.resolve()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmeff.eval.data", description=__doc__.split("\n")[0])
    p.add_argument("--limit", "-n", type=positive_int, default=None, help=f"rows per task (default {DEFAULT_N})")
    p.add_argument("--split", default=DEFAULT_SPLIT)
    p.add_argument("--seed-offset", type=int, default=0)
    p.add_argument("--out", default=None, help="directory (default: the cache dir)")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    print(prepare_tasks(a.limit, a.split, a.seed_offset, a.out, a.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

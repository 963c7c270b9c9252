"""``mmeff info``: versions, registered methods, host adapters, zoo models, local eval tasks."""
from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("info", help="versions, registered methods, host adapters, zoo models, eval tasks")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)
    return p


def zoo_models() -> dict[str, dict[str, Any]]:
    """Every shipped zoo model: its kind, folder, whether it is built and trained, and how to load it."""
    from mmeff.zoo.load import MODELS_DIR, ZOO_MODELS, training_info
    from mmeff.zoo.load_pipeline import PIPELINES
    from mmeff.zoo.load_video import VIDEO_PIPELINES

    entries = {name: ("vlm", "config.json", "mmeff.zoo.load") for name in ZOO_MODELS}
    entries.update({name: ("image pipeline", "model_index.json", "mmeff.zoo.load_pipeline.load_pipeline")
                    for name in PIPELINES if name != "tiny-clip-judge"})
    entries.update({name: ("video pipeline", "model_index.json", "mmeff.zoo.load_video.load_video_pipeline")
                    for name in VIDEO_PIPELINES})
    if "tiny-clip-judge" in PIPELINES:
        entries["tiny-clip-judge"] = ("judge", None, "mmeff.zoo.load_pipeline.load_pipeline")
    zoo: dict[str, Any] = {}
    for name, (kind, marker, loader) in entries.items():
        path = MODELS_DIR / name
        built = (path / marker).is_file() if marker else path.is_dir() and any(path.iterdir())
        info = training_info(str(path)) if built else None
        zoo[name] = {"kind": kind, "path": str(path), "built": built, "loader": loader,
                     "trained": bool(info and info.get("trained")) if built else False}
    return zoo


def collect() -> dict[str, Any]:
    from importlib.metadata import entry_points

    import mmeff
    from mmeff.core import registry
    from mmeff.eval.report import versions
    from mmeff.eval.tasks import GROUPS, TASKS

    methods = {}
    for name in mmeff.method_names():
        cls = mmeff.get_method(name)
        methods[name] = {"kind": cls.kind, "stage": getattr(cls, "stage", None), "class": cls.__qualname__}
    registry._ensure_builtin()
    hosts = {h.family: list(getattr(h, "model_classes", ()) or ()) for h in registry._HOSTS}

    zoo = zoo_models()

    plugin = [e.value for e in entry_points(group="lmms_eval.models") if e.name == "mmeff"]
    return {
        "versions": versions(),
        "methods": methods,
        "hosts": hosts,
        "zoo_models": zoo,
        "eval_tasks": list(TASKS),
        "eval_groups": {g: list(m) for g, m in GROUPS.items()},
        "lmms_eval_plugin": plugin[0] if plugin else None,
    }


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    v = info["versions"]
    print("mmeff " + str(v.pop("mmeff")))
    print("versions: " + ", ".join(f"{k} {val or '-'}" for k, val in v.items()))
    print("methods:")
    for name, m in info["methods"].items():
        stage = f", stage {m['stage']}" if m["stage"] else ""
        print(f"  {name:<16} {m['kind']}{stage}")
    print("hosts:")
    for fam, classes in info["hosts"].items():
        print(f"  {fam:<16} {', '.join(classes) or '-'}")
    print("zoo models:")
    for name, z in info["zoo_models"].items():
        state = "trained" if z["trained"] else ("untrained placeholder" if z["built"] else "not built")
        print(f"  {name:<16} {z['kind']:<15} {state}  ({z['path']})")
    print("eval tasks: " + ", ".join(info["eval_tasks"]))
    print("eval groups: " + ", ".join(info["eval_groups"]))
    plugin = info["lmms_eval_plugin"]
    print("lmms-eval model 'mmeff': " + (plugin or "NOT registered (run `pip install -e .` again)"))
    return 0

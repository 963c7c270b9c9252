"""The commands users copy, run as written in subprocesses: the README's main job, lmms-eval's own CLI with
the mmeff model, the plugin docstring's examples, and data parallel (2 processes == 1)."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, MMEFF_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(cmd: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def readme_main_command() -> list[str]:
    """The README's main-job command, after its set-up step."""
    text = (ROOT / "README.md").read_text()
    line = next(l for l in text.splitlines() if l.startswith("bash scripts/setup.sh && ") and " eval " in l)
    return shlex.split(line.split("&&", 1)[1])


def test_readme_main_command_runs_as_written(tmp_path):
    argv = readme_main_command()
    assert argv[0] == ".venv/bin/mmeff"
    argv[0] = str(BIN / "mmeff")
    i = argv.index("--limit")
    argv[i + 1] = "3"  # the README's command on a smaller limit
    argv[argv.index("--out") + 1] = str(tmp_path / "main.json")
    proc = _run(argv + ["--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "main.json").read_text())
    methods = [a for j, a in enumerate(argv) if j and argv[j - 1] == "--method"]
    assert [r["label"] for r in payload["runs"]] == ["dense", *methods]
    tasks = argv[argv.index("--tasks") + 1].split(",")
    for run in payload["runs"]:
        assert run["status"] == "ok" and set(run["tasks"]) == set(tasks)
        assert all(t["efficiency"]["requests"] == 3 for t in run["tasks"].values())
    assert "retention" in proc.stdout


def _lmms_eval(model_args: str, tmp_path: Path, *extra: str, launcher: list[str] | None = None):
    include = subprocess.run([sys.executable, "-m", "mmeff.eval.data", "--limit", "6"], env=_env(tmp_path),
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    cmd = (launcher or [sys.executable]) + ["-m", "lmms_eval", "--model", "mmeff", "--model_args", model_args,
                                            "--tasks", "mmeff_colour,mmeff_count", "--include_path", include,
                                            "--limit", "6", "--batch_size", "2", *extra]
    return _run(cmd, tmp_path)


def _scores(stdout: str) -> dict[str, float]:
    rows = re.findall(r"\|(mmeff_\w+)\s*\|[^|]*\|[^|]*\|exact_match\|[^|]*\|\s*([0-9.]+)\s*\|", stdout)
    return {task: float(v) for task, v in rows}


def test_lmms_eval_cli_runs_the_mmeff_model(tmp_path):
    proc = _lmms_eval("pretrained=tiny-llava,method=fastv:keep=64|layer=2", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = _scores(proc.stdout)
    assert set(scores) == {"mmeff_colour", "mmeff_count"} and all(0 <= v <= 1 for v in scores.values())


def test_lmms_eval_cli_exits_non_zero_with_one_line_when_a_method_cannot_run(tmp_path):
    proc = _lmms_eval("pretrained=tiny-llava,method=fastv:budget=64", tmp_path)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.startswith("mmeff: error:")]
    assert len(lines) == 1 and "budget" in lines[0] and "keep=" in lines[0]
    assert "Traceback" not in proc.stderr


def plugin_docstring_examples() -> tuple[list[str], list[str]]:
    """(the first shell example, every ``method=`` value) of the lmms-eval plugin's docstring."""
    from mmeff.eval import lmms_plugin

    doc = lmms_plugin.__doc__
    block = re.search(r"::\n\n((?:    .*\n)+)", doc).group(1)
    command = block.replace("\\\n", " ").split()
    methods = re.findall(r"``method=([^`\s\"]+)``", doc) + re.findall(r'``method=("[^"]+")``', doc)
    return command, methods


def test_plugin_docstring_examples_run_as_written(tmp_path):
    command, methods = plugin_docstring_examples()
    assert command[:4] == ["python", "-m", "lmms_eval", "--model"] and len(methods) >= 4
    shell = " ".join(command).replace("python ", f"{sys.executable} ", 2)
    proc = subprocess.run(["bash", "-c", shell], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mmeff_pope_random" in _scores(proc.stdout)

    from mmeff.eval.lmms_plugin import MmeffLMM

    for m in methods:  # every method= spelling of the docstring builds and runs on the zoo model
        lm = MmeffLMM.create_from_arg_string(f"pretrained=tiny-llava,method={m}", {"device": "cpu"})
        assert lm.handle is not None or m == "none", m
        lm.remove_methods()


@pytest.mark.parametrize("via", ["mmeff", "torchrun"])
def test_two_processes_give_the_same_scores_as_one(tmp_path, via):
    if via == "mmeff":
        common = [str(BIN / "mmeff"), "eval", "--model", "tiny-llava", "--method", "fastv:keep=64",
                  "--tasks", "mmeff_colour,mmeff_count", "--limit", "6", "--batch-size", "2", "--quiet"]
        one = _run(common + ["--out", str(tmp_path / "one.json")], tmp_path)
        two = _run(common + ["--processes", "2", "--out", str(tmp_path / "two.json")], tmp_path)
        assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
        a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
        assert a["processes"] == 1 and b["processes"] == 2
        for ra, rb in zip(a["runs"], b["runs"]):
            for task in ("mmeff_colour", "mmeff_count"):
                ta, tb = ra["tasks"][task], rb["tasks"][task]
                assert ta["metrics"] == tb["metrics"]
                assert ta["efficiency"]["requests"] == tb["efficiency"]["requests"] == 6  # gathered from both
                assert ta["efficiency"]["equivalent_budget"] == pytest.approx(tb["efficiency"]["equivalent_budget"])
    else:
        one = _lmms_eval("pretrained=tiny-llava,method=fastv:keep=64", tmp_path)
        two = _lmms_eval("pretrained=tiny-llava,method=fastv:keep=64", tmp_path,
                         launcher=[str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"])
        assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
        assert _scores(one.stdout) == _scores(two.stdout) and len(_scores(one.stdout)) == 2

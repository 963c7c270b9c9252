"""Plugin tests: they need vLLM, so they live outside tests/ and run in .venv-vllm
(`bash scripts/setup_vllm.sh`, then `.venv-vllm/bin/python -m pytest tests_vllm`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tests_vllm.pruners_for_tests  # noqa: F401  (registers the test pruners in this process too)

ROOT = Path(__file__).resolve().parent.parent
TEST_PRUNERS = "tests_vllm.pruners_for_tests"


def run_vllm(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run tests_vllm.run_vllm in its own process (engine start ~15 s on the 2-core CPU)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["MMEFF_VLLM_IMPORTS"] = TEST_PRUNERS  # the test pruners, in every vLLM process
    return subprocess.run([sys.executable, "-m", "tests_vllm.run_vllm", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def vllm_answers(*args: str) -> dict:
    """The JSON a successful run prints; fails the test with vLLM's stderr tail otherwise."""
    proc = run_vllm(*args)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"vLLM run {args} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])

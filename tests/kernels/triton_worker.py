"""Run a test module's Triton cases in a subprocess (so TRITON_INTERPRET never leaks into other tests).

Triton decides at kernel-import time whether to compile for the GPU or build the CPU interpreter, so
the Triton side of each comparison runs in a child process with TRITON_INTERPRET=1 (on CPU machines)
and MMEFF_FORCE_TRITON=1; the child saves its outputs and the parent compares them with the naive twin.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_worker(test_file: str, out_path: Path) -> dict:
    """Execute ``python test_file --worker out_path`` under the interpreter settings; load its results."""
    env = dict(os.environ)
    env["MMEFF_FORCE_TRITON"] = "1"
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, str(Path(test_file).resolve()), "--worker", str(out_path)],
        env=env, cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=600, check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"Triton worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return torch.load(out_path, weights_only=False)

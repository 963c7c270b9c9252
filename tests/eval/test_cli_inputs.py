"""``mmeff eval`` / ``mmeff calibrate`` on bad input: one line on stderr, a non-zero status, nothing run,
nothing lost, no stray files (in-process, on the shipped tiny-llava)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mmeff.cli import main

TASK = ["--tasks", "mmeff_colour", "--limit", "1", "--batch-size", "1", "--threads", "1", "--quiet",
        "--verbosity", "ERROR"]


@pytest.fixture(autouse=True)
def _task_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMEFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def _one_error_line(capsys, *words: str) -> str:
    captured = capsys.readouterr()
    lines = [l for l in captured.err.splitlines() if "error:" in l]
    assert len(lines) == 1, captured.err
    for w in words:
        assert w in lines[0], lines[0]
    assert "error:" not in captured.out
    return lines[0]


@pytest.mark.parametrize("argv, words", [
    (["eval", "--limit", "0"], ["--limit", ">= 1"]),
    (["eval", "--limit", "-3"], ["--limit", ">= 1"]),
    (["eval", "--batch-size", "0"], ["--batch-size"]),
    (["calibrate", "entropyprune", "--samples", "0", "--out", "x.json"], ["--samples", ">= 1"]),
])
def test_counts_below_one_are_refused_by_the_parser(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    _one_error_line(capsys, *words)


@pytest.mark.parametrize("model, words", [
    ("no-such-model", ["unknown model", "not a zoo model"]),
    ("tiny-sd3", ["diffusion zoo model", "VLMs"]),
])
def test_unknown_model_fails_before_any_data_is_built(model, words, tmp_path, capsys):
    t0 = time.perf_counter()
    assert main(["eval", "--model", model, "--method", "random:budget=64", *TASK]) == 2
    assert time.perf_counter() - t0 < 5
    _one_error_line(capsys, *words)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


def test_unknown_local_task_fails_before_any_data_is_built(tmp_path, capsys):
    assert main(["eval", "--tasks", "mmeff_nope", "--limit", "1", "--quiet"]) == 2
    _one_error_line(capsys, "mmeff_nope", "mmeff_colour")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("out", ["/proc/mmeff-eval.json", "a_file/x.json"])
def test_unwritable_out_is_refused_before_anything_runs(out, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["eval", "--method", "random:budget=64", "--out", out, *TASK]) == 2
    _one_error_line(capsys, "--out", "writable")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no data, no stray files
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_out_folder_means_a_new_file_inside_it(tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    assert main(["eval", "--out", str(folder), *TASK]) == 0
    files = list(folder.iterdir())
    assert len(files) == 1 and files[0].suffix == ".json" and files[0].name.startswith("eval-tiny-llava-")
    assert json.loads(files[0].read_text())["runs"][0]["label"] == "dense"
    assert not list(tmp_path.glob("**/*.tmp"))


@pytest.mark.parametrize("spec, words", [
    ("softpag:heads=1.1,u=0.5", ["softpag", "VLM"]),
    ("fastv:budget=64", ["BudgetError", "keep="]),
])
def test_a_method_that_cannot_run_fails_before_the_dense_run(spec, words, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--method", "random:budget=64", "--method", spec, "--out", str(out), *TASK]) == 2
    captured = capsys.readouterr()
    assert "dense wall" not in captured.out and not out.exists()
    line = [l for l in captured.err.splitlines() if "error:" in l]
    assert len(line) == 1 and all(w in line[0] for w in words) and "random:budget=64 (" not in line[0]


def test_a_run_skipped_mid_evaluation_exits_non_zero_and_keeps_the_others(tmp_path, monkeypatch, capsys):
    from mmeff.eval import preflight

    monkeypatch.setattr(preflight, "check_methods", lambda *a, **k: None)  # let the bad budget reach the run
    out = tmp_path / "r.json"
    assert main(["eval", "--method", "random:budget=64", "--method", "fastv:budget=64", "--out", str(out), *TASK]) == 3
    line = _one_error_line(capsys, "1 of 2", "fastv:budget=64", "BudgetError", str(out))
    payload = json.loads(out.read_text())
    assert [r["status"] for r in payload["runs"]] == ["ok", "ok", "skipped"], line


def test_results_are_rescued_when_the_json_cannot_be_written_at_the_end(tmp_path, monkeypatch, capsys):
    from mmeff.eval import preflight

    monkeypatch.setattr(preflight, "check_writable", lambda *a, **k: None)  # the path breaks after the check
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    assert main(["eval", "--out", "/proc/mmeff-eval.json", *TASK]) == 3
    line = _one_error_line(capsys, "/proc/mmeff-eval.json", "saved to")
    rescued = list((tmp_path / "tmp").glob("eval-tiny-llava-*.json"))
    assert len(rescued) == 1 and str(rescued[0]) in line
    assert json.loads(rescued[0].read_text())["runs"][0]["status"] == "ok"


def test_calibrate_refuses_an_unwritable_out_before_loading(capsys):
    assert main(["calibrate", "entropyprune", "--samples", "1", "--out", "/proc/ecl.json"]) == 2
    _one_error_line(capsys, "--out", "writable")


def test_info_lists_every_zoo_model(capsys):
    assert main(["info", "--json"]) == 0
    zoo = json.loads(capsys.readouterr().out)["zoo_models"]
    assert set(zoo) == {"tiny-llava", "tiny-qwen2-vl", "tiny-llava-tokendrop", "tiny-qwen2-vl-tokendrop", "tiny-sd3",
                        "tiny-wan", "tiny-clip-judge"}
    assert {z["kind"] for z in zoo.values()} == {"vlm", "image pipeline", "video pipeline", "judge"}
    assert all(Path(z["path"]).is_dir() and z["built"] for z in zoo.values())

"""mmeff.eval: world task data, scoring, method-arg parsing, the lmms-eval plugin end to end, the CLI.

The end-to-end tests load the zoo's ``tiny-llava`` (or, when it is not built, a tiny random LLaVA
with the zoo processor saved to a temp dir) and run 2 documents of one task on CPU, 1 thread.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mmeff.eval import data as data_mod
from mmeff.eval.tasks import GROUPS, TASKS, expand, is_local
from mmeff.eval.tasks import utils as tu
from mmeff.zoo.world import make_caption, render
from mmeff.zoo.world.scene import Scene

N = 6


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return data_mod.task_rows(N)


# --------------------------------------------------------------------------- data


def test_rows_are_deterministic_and_prefix_stable(rows):
    again = data_mod.task_rows(N)
    assert again == rows
    fewer = data_mod.task_rows(3, tasks=["mmeff_pope_adversarial", "mmeff_reading"])
    assert fewer["mmeff_pope_adversarial"] == rows["mmeff_pope_adversarial"][:3]
    assert fewer["mmeff_reading"] == rows["mmeff_reading"][:3]
    assert set(rows) == set(TASKS)
    assert all(len(v) == N for v in rows.values())
    other = data_mod.task_rows(2, seed_offset=5000)
    assert other["mmeff_colour"][0]["seed"] != rows["mmeff_colour"][0]["seed"]


def _expected(row: dict, scene: Scene) -> str | None:
    meta = json.loads(row["meta"])
    fam = row["family"]
    if fam == "existence":
        return "yes" if meta["shape"] in scene.shapes() else "no"
    if fam in ("colour", "size"):
        return getattr(scene.objects[meta["target"]], fam)
    if fam == "count":
        return str(len(scene.objects) if meta["shape"] is None else scene.count(meta["shape"]))
    if fam == "reading":
        return scene.word
    if fam == "caption":
        return make_caption(scene)
    if fam == "position":
        a, b = scene.objects[meta["a"]], scene.objects[meta["b"]]
        rel = ("left" if a.x < b.x else "right") if meta["axis"] == "x" else ("above" if a.y < b.y else "below")
        if row["answer"] in ("yes", "no"):
            asked = "left" if "left of" in row["question"] else "above"
            return "yes" if rel == asked else "no"
        return rel
    return None


def test_answers_match_the_world(rows):
    for name, task_rows in rows.items():
        spec = TASKS[name]
        for row in task_rows:
            assert row["family"] == spec.family
            if spec.pope:
                assert row["pope"] == spec.pope
            scene = tu.scene(row)
            assert scene.seed == row["seed"]
            assert _expected(row, scene) == row["answer"], (name, row["question"])
    pope = rows["mmeff_pope_random"]
    assert {r["answer"] for r in pope} == {"yes", "no"}


def test_doc_to_visual_renders_the_scene(rows):
    row = rows["mmeff_colour"][0]
    (img,) = tu.doc_to_visual(row)
    ref = render(Scene.from_dict(json.loads(row["scene"])))
    assert img.size == (336, 336) and img.mode == "RGB"
    assert img.tobytes() == ref.convert("RGB").tobytes()
    assert tu.doc_to_text(row, {"pre_prompt": "Q: ", "post_prompt": "!"}) == f"Q: {row['question']}!"


def test_prepare_tasks_writes_yaml_with_absolute_paths(tmp_path):
    d = data_mod.prepare_tasks(n=2, out_dir=tmp_path / "t")
    for name, spec in TASKS.items():
        text = (d / f"{name}.yaml").read_text()
        assert f"task: {name}" in text and str(spec.template_path) in text
        jsonl = d / f"{name}.jsonl"
        assert json.dumps(str(jsonl)) in text and jsonl.is_file()
        assert len(jsonl.read_text().splitlines()) == 2
    for group, members in GROUPS.items():
        assert all(f"  - {m}" in (d / f"{group}.yaml").read_text() for m in members)
    stamp = (d / "_manifest.json").stat().st_mtime_ns
    assert data_mod.prepare_tasks(n=2, out_dir=tmp_path / "t") == d        # reused, not rewritten
    assert (d / "_manifest.json").stat().st_mtime_ns == stamp
    assert is_local("mmeff_world") and is_local("mmeff_count") and not is_local("pope")
    assert expand(["mmeff_pope", "mmeff_pope_random", "mme"]) == list(GROUPS["mmeff_pope"])


# --------------------------------------------------------------------------- scoring


def test_scoring_helpers():
    assert tu.is_match("Yes.", "yes") and tu.is_match("three", "3") and tu.is_match("3 circles", "3")
    assert not tu.is_match("no", "yes") and not tu.is_match("", "red")
    assert tu.says_yes("Yes, there is") and not tu.says_yes("No.") and not tu.says_yes("There is not")
    items = [{"pred": True, "gold": True}, {"pred": True, "gold": False}, {"pred": False, "gold": True}]
    assert tu.pope_precision(items) == 0.5 and tu.pope_recall(items) == 0.5 and tu.pope_f1(items) == 0.5
    scene = Scene.from_dict({"objects": [{"shape": "circle", "colour": "red", "size": "small", "x": 0.3, "y": 0.3}],
                             "background": "white", "seed": 1})
    sj = json.dumps({"objects": [{"shape": "circle", "colour": "red", "size": "small", "x": 0.3, "y": 0.3,
                                  "word": None}], "background": "white", "seed": 1})
    caps = [{"caption": "a small red circle", "scene": sj}, {"caption": "a red circle and a blue star", "scene": sj}]
    assert tu.chair_s(caps) == 0.5 and tu.chair_i(caps) == pytest.approx(1 / 3) and tu.object_recall(caps) == 1.0
    res = tu.process_results({"family": "caption", "scene": sj, "answer": make_caption(scene)}, ["a red circle"])
    assert set(res) == {"chair_s", "chair_i", "object_recall"}
    res = tu.process_results({"family": "existence", "answer": "no"}, ["No"])
    assert res["exact_match"] == 1.0 and res["yes_ratio"] == 0.0


# --------------------------------------------------------------------------- method specs


def test_parse_method_arg():
    import mmeff
    from mmeff.eval.lmms_plugin import parse_method_arg
    from mmeff.eval.runner import with_budget

    assert parse_method_arg(None) == [] and parse_method_arg("none") == [] and parse_method_arg("dense") == []
    assert parse_method_arg("fastv:budget=64;layer=3") == ["fastv:budget=64,layer=3"]
    assert parse_method_arg("fastv:budget=64|layer=3") == ["fastv:budget=64,layer=3"]
    assert parse_method_arg('"fastv:budget=64,layer=3"') == ["fastv:budget=64,layer=3"]
    assert parse_method_arg("fastv:budget=64+random:ratio=0.5") == ["fastv:budget=64", "random:ratio=0.5"]
    assert parse_method_arg("x:heads=1;2;3;layer=4") == ["x:heads=1;2;3,layer=4"]     # tuple items continue
    assert parse_method_arg("random") == ["random"]
    cfg = mmeff.parse_method(parse_method_arg("entropyprune:budget=64;layer=2")[0])
    assert (cfg.name, cfg.budget, cfg.layer) == ("entropyprune", 64, 2)
    assert with_budget("random:ratio=0.5", 32) == "random:budget=32"
    assert with_budget("fastv:budget=64,layer=3", 128) == "fastv:budget=128,layer=3"
    with pytest.raises(mmeff.MmeffError):
        parse_method_arg("fastv:budget=1+")
    # lmms-eval's own --model_args parsing keeps our separators inside one value
    from lmms_eval.utils import simple_parse_args_string

    args = simple_parse_args_string("pretrained=tiny-llava,method=fastv:budget=64;layer=3,batch_size=2")
    assert args == {"pretrained": "tiny-llava", "method": "fastv:budget=64;layer=3", "batch_size": 2}


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """``tiny-llava`` from the zoo, or a tiny random LLaVA with the zoo processor saved locally."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)                         # tiny model: one thread is fastest on a shared CPU
    try:
        yield _vlm_path(tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def _vlm_path(tmp_path_factory) -> str:
    import torch

    try:
        from mmeff.zoo.load import zoo_path

        if (zoo_path("tiny-llava") / "config.json").is_file():
            return "tiny-llava"
    except ImportError:
        pass
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from mmeff.zoo.processors import build_processor

    proc = build_processor("llava")
    tok = proc.tokenizer
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=336, patch_size=14)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = LlavaForConditionalGeneration(cfg).eval()
    out = tmp_path_factory.mktemp("standin") / "tiny-llava"
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return str(out)


def test_plugin_runs_a_local_task_through_lmms_eval(vlm, tmp_path):
    from lmms_eval.api.instance import Instance
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    from mmeff.eval.lmms_plugin import MmeffLMM

    cls = get_model("mmeff")                          # registered through the entry point
    assert cls is MmeffLMM
    lm = cls.create_from_arg_string(f"pretrained={vlm},method=random:budget=64;positions=reindex",
                                    {"batch_size": 2, "device": "cpu"})
    assert lm.method_specs == ["random:budget=64,positions=reindex"]
    include = data_mod.prepare_tasks(n=2, out_dir=tmp_path / "tasks")
    tm = TaskManager(include_path=str(include), include_defaults=False, verbosity="ERROR")
    res = simple_evaluate(model=lm, tasks=["mmeff_pope_random"], task_manager=tm, limit=2,
                          bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    metrics = res["results"]["mmeff_pope_random"]
    for m in ("exact_match,none", "f1,none", "yes_ratio,none"):
        assert 0.0 <= metrics[m] <= 1.0
    assert len(res["samples"]["mmeff_pope_random"]) == 2
    s = lm.summary("mmeff_pope_random")
    assert s["requests"] == 2 and s["visual_tokens_in"] == 64 < s["visual_tokens"]
    assert s["equivalent_budget"] == 64 and s["prefill_tflops"] < s["prefill_tflops_dense"]
    assert lm.model is not None                      # clean() keeps the model for the next run

    # loglikelihood: finite, and a batch of 2 equals the same requests one by one
    docs = lm.task_dict["mmeff_pope_random"]["test"]
    reqs = [Instance("loglikelihood", (docs[i]["question"], docs[i]["answer"], tu.doc_to_visual, i,
                                       "mmeff_pope_random", "test"), idx=0,
                     metadata={"task": "mmeff_pope_random", "doc_id": i, "repeats": 1}) for i in range(2)]
    both = lm.loglikelihood(reqs)
    lm.batch_size_per_gpu = 1
    alone = [lm.loglikelihood([r])[0] for r in reqs]
    for (a, ga), (b, gb) in zip(both, alone):
        assert math.isfinite(a) and a <= 0 and a == pytest.approx(b, abs=1e-3) and ga == gb
    lm.remove_methods()
    assert lm.label == "dense"


def _n_llm_layers(vlm: str) -> int:
    from mmeff.zoo.load import ZOO_MODELS, zoo_path

    folder = zoo_path(vlm) if vlm in ZOO_MODELS else Path(vlm)
    return int(json.loads((folder / "config.json").read_text())["text_config"]["num_hidden_layers"])


def test_cli_sweep_writes_json_and_png(vlm, tmp_path, monkeypatch, capsys):
    from mmeff.cli import main

    monkeypatch.setenv("MMEFF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs" / "sweep.json"
    # FastV prunes after layer 1 here: an average budget b needs L * b >= 576 (checked before the dense run)
    n_layers = _n_llm_layers(vlm)
    if n_layers * 64 < 576:
        pytest.skip(f"the stand-in LLM has {n_layers} layers; FastV at layer 1 cannot average 64 tokens")
    rc = main(["eval", "--model", vlm, "--method", "random:budget=64", "--method", "fastv:budget=64,layer=1",
               "--tasks", "mmeff_pope_random", "--limit", "2", "--batch-size", "2", "--sweep",
               "--budgets", "128,64", "--out", str(out), "--threads", "1", "--quiet", "--verbosity", "ERROR"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "random:budget=128 vs dense" in printed and "retention" in printed
    payload = json.loads(out.read_text())
    assert {"torch", "transformers", "lmms_eval", "mmeff"} <= set(payload["versions"])
    assert payload["machine"]["cpu_count"] >= 1 and payload["config"]["limit"] == 2
    labels = [r["label"] for r in payload["runs"]]
    assert labels == ["dense", "random:budget=128", "random:budget=64", "fastv:budget=128,layer=1",
                      "fastv:budget=64,layer=1"]
    assert all(r["status"] == "ok" for r in payload["runs"])
    dense, r128, r64, f128, f64 = payload["runs"]
    assert dense["tasks"]["mmeff_pope_random"]["efficiency"]["requests"] == 2
    assert r64["tasks"]["mmeff_pope_random"]["efficiency"]["visual_tokens_in"] == 64
    assert r128["tasks"]["mmeff_pope_random"]["efficiency"]["equivalent_budget"] == 128
    for run, b in ((f128, 128), (f64, 64)):  # the layer average of (576 before layer 1, keep after) is the budget
        assert run["tasks"]["mmeff_pope_random"]["efficiency"]["equivalent_budget"] == pytest.approx(b, abs=1)
    rows = payload["comparisons"][0]["rows"]
    assert {r["metric"] for r in rows} >= {"exact_match", "f1", "yes_ratio"}
    assert all(r["retention"] is None or r["retention"] >= 0 for r in rows)
    sweep = payload["sweep"]["random"]
    assert sweep["budgets"] == [128, 64] and len(sweep["mean"]) == 2
    assert payload["sweep"]["fastv:layer=1"]["budgets"] == [128, 64]
    png = Path(payload["plot"])
    assert png == out.with_suffix(".png") and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_info(capsys):
    from mmeff.cli import main

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"fastv", "random"} <= set(info["methods"]) and "mmeff_world" in info["eval_groups"]
    assert "llava" in info["hosts"] and info["versions"]["mmeff"]

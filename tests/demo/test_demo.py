"""The gradio demo's functions on the shipped models, and the app itself served locally (offline)."""
from __future__ import annotations

import os
import urllib.request

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_vlm_comparison_on_a_scene():
    from mmeff.core.handle import active_handle
    from mmeff.demo.vlm_compare import compare, load_model, scene_questions

    model, processor = load_model("tiny-qwen2-vl")
    image, qas = scene_questions(11)
    colour = next(q for q in qas if q.family == "colour")
    r = compare(model, processor, image, colour.question, "random:budget=36", expected=colour.answer)
    assert r.correct(r.dense_answer)  # the shipped model reads colours (0.995 on 500 held-out scenes)
    assert r.report["kept_after_layer_per_sample"] == [36] and r.report["visual_tokens_per_sample"] == [144]
    assert len(r.kept_maps) == 1 and r.kept_maps[0].size == (336, 336)
    rows = r.rows()
    assert rows[0][0] == "dense" and rows[1][0] == "random:budget=36" and rows[1][4] < 0.5
    assert active_handle(model) is None  # the method was removed


def test_vlm_callback_reports_errors_in_the_page():
    from mmeff.demo.app import on_vlm_run, question_choices

    image, labels = question_choices(3)
    summary, rows, kept, error = on_vlm_run("tiny-qwen2-vl", "fastv:budget=999", image, labels[0], "")
    assert "BudgetError" in error and "budget" in error and rows == [] and kept is None
    assert "give an image" in on_vlm_run("tiny-qwen2-vl", "fastv:budget=64", None, labels[0], "")[3]
    summary, rows, kept, error = on_vlm_run("tiny-llava", "fastv:budget=64,layer=1", image, labels[0], "")
    assert error == "" and "true answer" in summary and kept is not None and len(rows) == 2


def test_free_question_has_no_true_answer():
    from mmeff.demo.app import split_choice

    assert split_choice("Is there a star?  ->  no") == ("Is there a star?", "no")
    assert split_choice("What is left of the circle?") == ("What is left of the circle?", None)


def test_guidance_and_video_pairs():
    from mmeff.demo.diffusion_compare import guidance_pair, load_diffusion, video_pair

    g = guidance_pair(load_diffusion("tiny-sd3"), "a red square on a white background", 1, steps=2, repeats=1)
    assert g.baseline.size == g.guided.size == (256, 256) and g.baseline.tobytes() != g.guided.tobytes()
    v = video_pair(load_diffusion("tiny-wan"), "a red square on a white background", 1, steps=3, repeats=1,
                   method="rectified_spaattn:drop=0.75,tau=0.2,block=16,preset=none,warmup_steps=1,dense_layers=0")
    assert len(v.dense_frames) == len(v.sparse_frames) == 4
    assert 15.0 < v.psnr_db < 100.0 and 0.0 < v.ssim < 1.0  # sparse differs from dense, but not by much
    assert v.report["per_method"]["rectified_spaattn"]["calls"]["sparse"] > 0


def test_app_serves_locally_and_answers_through_its_api(tmp_path):
    """The page is served on localhost, and the VLM tab's button is wired to the comparison (HTTP API round trip)."""
    from gradio_client import Client, handle_file

    from mmeff.demo.app import build_app, question_choices

    app = build_app()
    try:
        app.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
        html = urllib.request.urlopen(app.local_url, timeout=30).read().decode()
        assert "mmeff" in html
        image, labels = question_choices(7)
        image.save(tmp_path / "scene.png")
        client = Client(app.local_url, verbose=False)
        summary, table, kept, error = client.predict("tiny-qwen2-vl", "random:budget=36", handle_file(str(tmp_path / "scene.png")),
                                                     labels[0], "", api_name="/on_vlm_run")
        assert error == "" and "true answer" in summary and kept
        assert [row[0] for row in table["data"]] == ["dense", "random:budget=36"] and table["data"][1][3] == 36
    finally:
        app.close()


def test_cli_has_the_demo_subcommand():
    from mmeff.cli import build_parser

    args = build_parser().parse_args(["demo", "--port", "7999"])
    assert args.port == 7999 and args.host == "127.0.0.1" and not args.share


def test_demo_timings_are_warm_medians():
    """One untimed warm-up, then the median of the timed runs: a slow first call does not count."""
    import time

    from mmeff.demo.timing import warm_median

    calls = []

    def fn() -> int:
        calls.append(1)
        time.sleep(0.3 if len(calls) == 1 else 0.01)
        return len(calls)

    result, seconds = warm_median(fn, repeats=3)
    assert len(calls) == 4 and result == 4 and seconds < 0.15


@pytest.mark.parametrize("spec", ["vmoba", "vmoba:topk=1", "vmoba:warmup_steps=1"])
def test_video_tab_runs_vmoba_with_tiny_wans_preset(spec):
    """`vmoba` as typed in the demo runs on tiny-wan (the published presets are for 480p-720p grids)."""
    from mmeff.demo.app import on_video_run
    from mmeff.demo.diffusion_compare import for_tiny_wan

    assert for_tiny_wan(spec).startswith("vmoba:preset=tiny-wan")
    assert for_tiny_wan("vmoba:preset=wan2.1-1.3b-480p") == "vmoba:preset=wan2.1-1.3b-480p"
    import mmeff

    assert mmeff.parse_method("vmoba:preset=tiny-wan,topk=2").topk == (2, 2, 2)  # one value for every layer kind
    dense, sparse, info = on_video_run("a red square on a white background", 1, spec, 2)
    assert len(dense) == len(sparse) == 4 and "PSNR" in info, info


def test_hallucination_example_marks_the_hallucinated_objects():
    from mmeff.demo.app import on_halluc_run
    from mmeff.demo.halluc_compare import MARK, mark
    from mmeff.zoo.world import Mention

    text = mark("a small yellow star, a red circle and two blue squares",
                [Mention("star", "yellow"), Mention("square", None)])
    assert text == (f"a {MARK.format('small yellow star')}, a red circle and two {MARK.format('blue squares')}")
    assert mark("a red circle and a blue circle", [Mention("circle", "blue")]) == \
        f"a red circle and a {MARK.format('blue circle')}"
    image, page = on_halluc_run("tiny-llava", "vhr", 1150003)
    assert image is not None and "**dense**" in page and "**vhr**" in page and "true objects" in page
    _, err = on_halluc_run("tiny-llava", "vhr:alpha=-1", 1150003)
    assert err.startswith("**error:** ConfigError")

"""The gradio demo: dense vs mmeff methods on the shipped tiny models, offline.

Three tabs, each a thin layout over a plain function tested on its own:

- **VLM token pruning** (:func:`on_vlm_run`): a shapes-world scene (or an uploaded image), a question, a
  pruner spec; shows both answers against the true one, the table of tokens / FLOPs / seconds and the
  kept-token map;
- **Perturbation guidance** (:func:`on_guidance_run`): tiny-sd3 with CFG alone and with SoftPAG;
- **Video sparse attention** (:func:`on_video_run`): tiny-wan dense and sparse, with PSNR / SSIM.

Run with ``mmeff demo`` (``--host``, ``--port``; never shares publicly unless ``--share``). Any local
LLaVA / Qwen-VL folder or cached hub id can be typed in the model box instead of a zoo name.
"""
from __future__ import annotations

import os
from typing import Any

from PIL import Image

from .diffusion_compare import (
    DEFAULT_GUIDANCE,
    DEFAULT_VIDEO,
    VIDEO_CHOICES,
    for_tiny_wan,
    guidance_pair,
    load_diffusion,
    video_pair,
)
from .vlm_compare import VLMComparison, compare, load_model, scene_questions

VLM_MODELS = ["tiny-llava", "tiny-qwen2-vl"]
DEFAULT_PRUNER = {"tiny-llava": "fastv:budget=64,layer=1", "tiny-qwen2-vl": "entropyprune:budget=64"}


def question_choices(seed: int) -> tuple[Image.Image, list[str]]:
    """The scene image and its questions as ``"question  ->  answer"`` labels."""
    image, qas = scene_questions(int(seed))
    return image, [f"{qa.question}  ->  {qa.answer}" for qa in qas]


def split_choice(choice: str | None) -> tuple[str, str | None]:
    """``"question  ->  answer"`` back to (question, answer); free text has no known answer."""
    if choice and "  ->  " in choice:
        q, a = choice.split("  ->  ", 1)
        return q, a
    return (choice or ""), None


def on_new_scene(seed: float) -> tuple[Image.Image, Any]:
    import gradio as gr

    image, labels = question_choices(int(seed))
    return image, gr.update(choices=labels, value=labels[0] if labels else None)


def on_vlm_run(model_name: str, method: str, image: Image.Image | None, choice: str | None,
               free_question: str) -> tuple[str, list[list[Any]], Image.Image | None, str]:
    """(summary markdown, table rows, kept-token map, error text)."""
    question, expected = (free_question.strip(), None) if free_question and free_question.strip() else split_choice(choice)
    try:
        model, processor = load_model(model_name.strip())
        result = compare(model, processor, image, question, method.strip(), expected=expected)
    except Exception as e:  # shown in the page: wrong spec, budget too large, no image, unknown model
        return "", [], None, f"**{type(e).__name__}**: {e}"
    return _summary(result), result.rows(), (result.kept_maps[0] if result.kept_maps else None), ""


def _summary(r: VLMComparison) -> str:
    truth = f" (true answer: **{r.expected}**)" if r.expected is not None else ""
    kept = r.report.get("kept_after_layer_per_sample", ["?"])[0]
    total = r.report.get("visual_tokens_per_sample", ["?"])[0]
    return (f"**{r.question}**{truth}\n\n- dense: **{r.dense_answer}**\n- {r.method}: **{r.pruned_answer}**\n\n"
            f"{kept} of {total} visual tokens kept from layer {r.report.get('layer')} on.")


def on_guidance_run(prompt: str, seed: float, method: str, steps: float) -> tuple[Any, Any, str]:
    try:
        pair = guidance_pair(load_diffusion("tiny-sd3"), prompt, int(seed), method.strip(), steps=int(steps))
    except Exception as e:
        return None, None, f"**{type(e).__name__}**: {e}"
    return pair.baseline, pair.guided, (f"CFG {pair.baseline_seconds:.2f} s, CFG + {pair.method} "
                                        f"{pair.guided_seconds:.2f} s")


def on_video_run(prompt: str, seed: float, method: str, steps: float) -> tuple[list[Any], list[Any], str]:
    try:
        pair = video_pair(load_diffusion("tiny-wan"), prompt, int(seed), for_tiny_wan(method), steps=int(steps))
    except Exception as e:
        return [], [], f"**{type(e).__name__}**: {e}"
    return pair.dense_frames, pair.sparse_frames, (
        f"PSNR **{pair.psnr_db:.1f} dB**, SSIM **{pair.ssim:.3f}** vs dense; dense {pair.dense_seconds:.2f} s, "
        f"sparse {pair.sparse_seconds:.2f} s (tiny model on CPU: speed is measured by `benchmarks/` on a GPU)")


def on_halluc_run(model_name: str, method: str, seed: float) -> tuple[Any, str]:
    """Dense vs mitigated captions of a weak scene; hallucinated objects are marked (errors shown in the page)."""
    from .halluc_compare import caption_compare

    try:
        model, processor = load_model(model_name)
        r = caption_compare(model, processor, int(seed), method.strip() or "vhr")
    except Exception as exc:  # noqa: BLE001 - shown to the user instead of a gradio traceback
        return None, f"**error:** {type(exc).__name__}: {exc}"
    return r.image, r.markdown()


def default_prompt(model: str = "tiny-sd3", seed: int = 5) -> str:
    """The tab's first prompt: scene ``seed`` in the prompt family ``model`` was trained on (a video model's
    layout prompt names the directions too)."""
    from ..zoo.load_pipeline import MODELS_DIR
    from ..zoo.prompt_family import (
        folder_family,
        prompt_of,
        scene_of_seed,
        video_prompt_of,
    )

    family = folder_family(MODELS_DIR / model)
    scene = scene_of_seed(family, seed)
    return video_prompt_of(family, scene) if model == "tiny-wan" else prompt_of(family, scene)


def build_app() -> Any:
    """The gradio Blocks (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    with gr.Blocks(title="mmeff demo") as app:
        gr.Markdown("# mmeff: dense vs efficient, on mmeff's own tiny trained models (offline)")
        with gr.Tab("VLM token pruning"):
            with gr.Row():
                model = gr.Dropdown(VLM_MODELS, value="tiny-qwen2-vl", allow_custom_value=True,
                                    label="model (zoo name, local folder or hub id)")
                method = gr.Textbox(DEFAULT_PRUNER["tiny-qwen2-vl"], label="pruner spec")
                seed = gr.Number(7, precision=0, label="scene seed")
            image0, labels0 = question_choices(7)
            with gr.Row():
                image = gr.Image(image0, type="pil", label="image (a scene, or upload your own)")
                kept = gr.Image(type="pil", label="kept visual tokens (dropped ones darkened)")
            choice = gr.Dropdown(labels0, value=labels0[0], label="question about the scene (-> true answer)")
            free = gr.Textbox("", label="or ask your own question (overrides the list)")
            with gr.Row():
                new_scene = gr.Button("new scene")
                run = gr.Button("compare", variant="primary")
            summary, error = gr.Markdown(), gr.Markdown()
            table = gr.Dataframe(headers=VLMComparison.HEADERS, label="dense vs pruned")
            model.change(lambda m: DEFAULT_PRUNER.get(m, "fastv:budget=64"), model, method)
            new_scene.click(on_new_scene, seed, [image, choice])
            run.click(on_vlm_run, [model, method, image, choice, free], [summary, table, kept, error])
        with gr.Tab("Hallucination (weak-evidence scenes)"):
            with gr.Row():
                h_model = gr.Dropdown(VLM_MODELS, value="tiny-llava", allow_custom_value=True, label="model")
                h_method = gr.Textbox("vhr", label="mitigator spec (vhr, gift, entropyprune:keep=64+vhr)")
                h_seed = gr.Number(1150023, precision=0, label="weak scene seed (held-out test seeds)")
            h_run = gr.Button("caption", variant="primary")
            with gr.Row():
                h_image = gr.Image(type="pil", label="weak-evidence scene")
                h_text = gr.Markdown()
            h_run.click(on_halluc_run, [h_model, h_method, h_seed], [h_image, h_text])
        with gr.Tab("Perturbation guidance (tiny-sd3)"):
            prompt = gr.Textbox(default_prompt(), label="prompt")
            with gr.Row():
                g_seed = gr.Number(5, precision=0, label="seed")
                g_method = gr.Textbox(DEFAULT_GUIDANCE, label="guidance spec (heads found by HeadHunter)")
                g_steps = gr.Slider(2, 30, value=10, step=1, label="steps")
            g_run = gr.Button("generate", variant="primary")
            with gr.Row():
                g_base, g_guided = gr.Image(label="CFG"), gr.Image(label="CFG + method")
            g_info = gr.Markdown()
            g_run.click(on_guidance_run, [prompt, g_seed, g_method, g_steps], [g_base, g_guided, g_info])
        with gr.Tab("Video sparse attention (tiny-wan)"):
            v_prompt = gr.Textbox(default_prompt("tiny-wan"), label="prompt")
            with gr.Row():
                v_seed = gr.Number(5, precision=0, label="seed")
                v_method = gr.Dropdown(list(VIDEO_CHOICES), value=DEFAULT_VIDEO, allow_custom_value=True,
                                       label="method spec (rectified_spaattn or vmoba; `vmoba` alone uses tiny-wan's preset)")
                v_steps = gr.Slider(2, 30, value=10, step=1, label="steps")
            v_run = gr.Button("generate", variant="primary")
            v_dense = gr.Gallery(label="dense frames", columns=4)
            v_sparse = gr.Gallery(label="sparse frames", columns=4)
            v_info = gr.Markdown()
            v_run.click(on_video_run, [v_prompt, v_seed, v_method, v_steps], [v_dense, v_sparse, v_info])
    return app

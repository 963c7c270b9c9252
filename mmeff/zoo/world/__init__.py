"""The shapes world: a procedurally generated, deliberately biased world of coloured
shapes that mmeff's own small VLMs and diffusion models are trained and evaluated on.

- :mod:`.scene`: vocabulary, the bias table :data:`BIASES`, :func:`generate_scene`.
- :mod:`.render`: :func:`render` (any size) and :func:`render_video` (bouncing motion).
- :mod:`.questions`: question families with exact answers, captions, diffusion prompts.
- :mod:`.chair`: CHAIR-style hallucination metrics for captions.
- :mod:`.dataset`: seed-disjoint splits, JSONL rows and image files.

Example::

    from mmeff.zoo.world import generate_scene, render, make_questions
    scene = generate_scene(7)
    image = render(scene)            # 336x336 RGB
    qas = make_questions(scene, rng=0)
"""

from .chair import Mention, chair_scores, hallucinated, parse_mentions
from .dataset import (
    SPLITS,
    build_scenes,
    build_split,
    read_jsonl,
    save_images,
    scene_of,
    split_seeds,
    write_jsonl,
)
from .questions import (
    FAMILIES,
    POPE_SETTINGS,
    QA,
    describe_object,
    grounding_drill,
    make_caption,
    make_prompt,
    make_questions,
    refer,
)
from .render import object_velocities, render, render_video, video_scenes
from .scene import (
    BACKGROUNDS,
    BIASES,
    COLOURS,
    COOCCUR,
    POPULAR,
    SHAPES,
    SIZES,
    WORDS,
    Bias,
    Obj,
    Scene,
    cooccur_partners,
    generate_scene,
    shape_presence_probs,
)

__all__ = [
    "BACKGROUNDS",
    "BIASES",
    "COLOURS",
    "COOCCUR",
    "FAMILIES",
    "POPE_SETTINGS",
    "POPULAR",
    "QA",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "WORDS",
    "Bias",
    "Mention",
    "Obj",
    "Scene",
    "build_scenes",
    "build_split",
    "chair_scores",
    "cooccur_partners",
    "describe_object",
    "generate_scene",
    "grounding_drill",
    "hallucinated",
    "make_caption",
    "make_prompt",
    "make_questions",
    "object_velocities",
    "parse_mentions",
    "read_jsonl",
    "refer",
    "render",
    "render_video",
    "save_images",
    "scene_of",
    "shape_presence_probs",
    "split_seeds",
    "video_scenes",
    "write_jsonl",
]

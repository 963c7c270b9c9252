"""Real Hugging Face processors for mmeff's zoo VLMs, built offline (nothing is downloaded).

- :func:`build_tokenizer`: a word-level ``PreTrainedTokenizerFast`` whose vocabulary covers
  every word the shapes world's questions, answers and captions can produce, digits,
  punctuation, and the special tokens of both model families.
- :func:`llava_processor`: ``LlavaProcessor`` = ``CLIPImageProcessor`` (336 px, patch 14 ->
  576 visual tokens with the ``"default"`` strategy dropping CLS) + tokenizer + chat template.
- :func:`qwen2_vl_processor`: ``Qwen2VLProcessor`` = ``Qwen2VLImageProcessor`` with
  ``min_pixels = max_pixels = 336*336`` so every image becomes a 24x24 grid of 14 px patches,
  i.e. **144** visual tokens after the 2x2 merge (as Qwen2-VL does at that resolution).

Tokenization: words are split on spaces with a SentencePiece-style ``"▁"`` marking a word
that follows a space, punctuation is isolated and digits are single tokens ("42" -> "4",
"2"), so decoding reproduces the original text exactly (``"a red circle, a blue square"``).
The vocabulary holds every world word both with and without the ``"▁"`` prefix.

Chat format (both families; the image marker differs)::

    <s><|user|>{image}{question}<|end|><|assistant|>{answer}<|end|>

``<|end|>`` is the EOS token, so generation stops at the end of the assistant turn.
"""
from __future__ import annotations

from typing import Any

from .world import questions as _q
from .world import scene as _s

SPACE = "\u2581"
BOS, EOS, PAD, UNK = "<s>", "<|end|>", "<pad>", "<unk>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
LLAVA_IMAGE = "<image>"
QWEN_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, *ROLES, LLAVA_IMAGE, *QWEN_TOKENS)

IMAGE_SIZE = 336
PATCH_SIZE = 14
LLAVA_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576
QWEN_MERGE = 2
QWEN_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE // QWEN_MERGE) ** 2  # 144

# Words of the question/answer/caption templates (everything not taken from the world tables).
_TEMPLATE_WORDS = (
    "is there a an the in image what colour size how many are objects object to left right of or "
    "above below word written describe labelled and yes no on background with it this that "
    "i see can you answer question color please one two three four five six seven eight nine "
    "zero ten none"
).split()
PUNCTUATION = tuple(".,?!\"':;-()/")
DIGITS = tuple("0123456789")


def world_words() -> list[str]:
    """Every lower-case word the shapes world's texts can contain (sorted, unique)."""
    words = set(_TEMPLATE_WORDS)
    words.update(_s.SHAPES)
    words.update(_s.PLURALS.values())
    words.update(_s.COLOURS)
    words.update(_s.SIZES)
    words.update(_s.BACKGROUNDS)
    words.update(w for w in _s.WORDS if not w.isdigit())
    words.update(_q.FAMILIES)
    words.update(_q.POPE_SETTINGS)
    for text in (_q.CAPTION_PROMPT, _q.READING_PROMPT):
        words.update(w.strip(".?,").lower() for w in text.split())
    return sorted(w for w in words if w)


def vocabulary() -> dict[str, int]:
    """Token -> id: special tokens first, then ``"▁"``, digits, punctuation, words, ``"▁"``+words."""
    tokens: list[str] = list(SPECIAL_TOKENS) + [SPACE]
    for piece in (*DIGITS, *PUNCTUATION):
        tokens += [piece, SPACE + piece]
    for w in world_words():
        for form in (w, w.capitalize()):
            tokens += [form, SPACE + form]
    seen: dict[str, int] = {}
    for t in tokens:
        if t not in seen:
            seen[t] = len(seen)
    return seen


CHAT_TEMPLATE_LLAVA = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT_TEMPLATE_QWEN = CHAT_TEMPLATE_LLAVA.replace(
    "<image>", "<|vision_start|><|image_pad|><|vision_end|>"
).replace(
    "{% elif item['type'] == 'text' %}",
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}",
)


def build_tokenizer(family: str = "llava") -> Any:
    """The word-level fast tokenizer (``family`` sets the chat template and image token)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token=UNK))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(SPACE, behavior="merged_with_next"),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok.decoder = decoders.Replace(SPACE, " ")
    # Register the special tokens on the backend so they are matched before pre-tokenization
    # (they already have ids in the vocabulary, which they keep).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    template = CHAT_TEMPLATE_LLAVA if family == "llava" else CHAT_TEMPLATE_QWEN
    extra: dict[str, Any] = {}
    if family == "llava":
        extra["extra_special_tokens"] = {"image_token": LLAVA_IMAGE}
    else:
        extra["extra_special_tokens"] = {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        }
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=template,
        padding_side="left",
        model_max_length=2048,
        **extra,
    )
    return fast


def llava_processor() -> Any:
    """``LlavaProcessor``: 336x336 CLIP preprocessing, patch 14 -> 576 ``<image>`` tokens."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer("llava"),
        chat_template=CHAT_TEMPLATE_LLAVA,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def qwen2_vl_processor() -> Any:
    """``Qwen2VLProcessor``: every image resized to ~336x336 -> 24x24 patches -> 144 tokens."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    pixels = IMAGE_SIZE * IMAGE_SIZE
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=PATCH_SIZE,
        merge_size=QWEN_MERGE,
        temporal_patch_size=2,
    )
    video_processor = None
    try:
        from transformers import Qwen2VLVideoProcessor

        video_processor = Qwen2VLVideoProcessor(
            size={"shortest_edge": 4 * 28 * 28, "longest_edge": pixels},
            patch_size=PATCH_SIZE,
            merge_size=QWEN_MERGE,
            temporal_patch_size=2,
        )
    except Exception:  # pragma: no cover - video processing needs torchvision
        video_processor = None
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer("qwen"),
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE_QWEN,
    )


def build_processor(family: str) -> Any:
    """``"llava"`` or ``"qwen2_vl"`` -> the matching processor."""
    if family == "llava":
        return llava_processor()
    if family in ("qwen", "qwen2_vl"):
        return qwen2_vl_processor()
    raise ValueError(f"unknown processor family {family!r}; choose 'llava' or 'qwen2_vl'")


def chat(question: str, answer: str | None = None, *, image: bool = True) -> list[dict[str, Any]]:
    """Messages for one question (and optionally its answer) about one image."""
    content: list[dict[str, Any]] = ([{"type": "image"}] if image else []) + [
        {"type": "text", "text": question}
    ]
    msgs: list[dict[str, Any]] = [{"role": "user", "content": content}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs

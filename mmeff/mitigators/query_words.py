"""Which question tokens are *informative* for GIFT's saliency (the paper keeps NOUN, PROPN, VERB, ADJ, ADV, NUM).

spaCy with ``en_core_web_sm`` is used when both import offline. spaCy is not a dependency of mmeff and its
English model cannot be installed from the package registry here, so the documented fallback is a
*closed-class stop-list tagger*: a word is informative unless it is a function word (determiner, pronoun,
preposition, conjunction, auxiliary / copula, wh-word, particle) or punctuation. Open-class words (nouns,
verbs, adjectives, adverbs, numbers) are exactly what remains, and the shapes world's vocabulary (shapes,
colours, sizes, counts) is all open-class. NLTK's tagger is not an option: its model is a separate download.
:func:`tagger_name` reports which tagger ran.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

INFORMATIVE_POS = {"NOUN", "PROPN", "VERB", "ADJ", "ADV", "NUM"}

FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no all both either neither another such what which whose
i me my mine you your yours he him his she her hers it its we us our ours they them their theirs myself yourself
itself themselves one ones
in on at of to from by with without about above below under over into onto out off up down through between
among near behind beside besides across along around after before during since until toward towards upon within
and or but nor so yet if then than because while although though whether as
is are was were be been being am do does did done have has had having can could will would shall should may
might must
who whom how when where why
not n't 's 'm 're 've 'd 'll there here please
""".split())

_WORD = re.compile(r"[A-Za-z0-9']+")


def _fallback_informative(word: str) -> bool:
    return bool(_WORD.fullmatch(word)) and word.lower() not in FUNCTION_WORDS


@functools.lru_cache(maxsize=1)
def _spacy() -> Any | None:
    try:  # optional: only when spaCy and its English model are installed
        import spacy  # type: ignore[import-not-found]

        return spacy.load("en_core_web_sm", disable=["parser", "ner", "lemmatizer"])
    except Exception:  # noqa: BLE001 - any failure means "not available offline"
        return None


def tagger_name() -> str:
    """``"spacy:en_core_web_sm"`` when available, else ``"fallback:closed-class-stoplist"``."""
    return "spacy:en_core_web_sm" if _spacy() is not None else "fallback:closed-class-stoplist"


def informative_words(words: Sequence[str]) -> list[bool]:
    """Per word: is it a content word (NOUN/PROPN/VERB/ADJ/ADV/NUM)?"""
    nlp = _spacy()
    if nlp is None:
        return [_fallback_informative(w) for w in words]
    from spacy.tokens import Doc  # type: ignore[import-not-found]

    doc = nlp(Doc(nlp.vocab, words=list(words)))
    return [t.pos_ in INFORMATIVE_POS for t in doc]


def group_words(pieces: Sequence[str]) -> list[int]:
    """Word index of each token piece: a piece starting with a word marker ('▁', 'Ġ', space) or made of
    punctuation starts a new word (SentencePiece / byte-level BPE conventions)."""
    out, word, prev_punct = [], -1, True
    for p in pieces:
        starts = p[:1] in ("▁", "Ġ", " ") or not p.strip("▁Ġ ").isalnum() or prev_punct
        if starts or word < 0:
            word += 1
        out.append(word)
        prev_punct = not p.strip("▁Ġ ").isalnum()
    return out


def informative_tokens(token_ids: Sequence[int], convert: Callable[[list[int]], list[str]]) -> list[bool]:
    """Per token of a question: does it belong to an informative word? ``convert`` maps ids to token pieces."""
    pieces = convert(list(token_ids))
    words_of = group_words(pieces)
    n_words = (max(words_of) + 1) if words_of else 0
    words = ["".join(p for p, w in zip(pieces, words_of) if w == k).lstrip("▁Ġ ") for k in range(n_words)]
    flags = informative_words(words)
    return [flags[w] for w in words_of]

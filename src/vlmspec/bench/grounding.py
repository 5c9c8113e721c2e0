"""Which emitted tokens of an answer are image-grounded (the split of the bench's acceptance table).

Definitions (docs/benchmarks.md, "Acceptance on image-grounded tokens"):

- **word**: a maximal run of letters or digits in the decoded answer, compared lower-cased.
- **ground-truth words** of a sample: the words of its `reference` that name what the image shows in the testbed's
  vocabulary (`GROUNDED_VOCABULARY`: colours, shapes and their plurals, count words and digits, position words, OCR
  words), and only for samples with at least one image: a text-only answer has nothing to ground.
- **grounded token**: an emitted token whose characters overlap a word of the answer that is one of the sample's
  ground-truth words. A token spanning two words is grounded if either is.

Where each emitted token came from is the engine's `GenerationStats.token_sources` (d >= 1: a draft token accepted
at depth d; 0: the target's own token, the prefill's or a step's bonus).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from vlmspec.testbed.data import NUMBER_WORDS
from vlmspec.testbed.render import COLORS, OCR_WORDS, POSITIONS, SHAPES

WORD = re.compile(r"[A-Za-z0-9]+")
GROUNDED_VOCABULARY = frozenset(
    [*COLORS, *SHAPES, *(shape + "s" for shape in SHAPES), *NUMBER_WORDS, *(str(n) for n in range(10)),
     *(word for position in POSITIONS for word in position.split()), *OCR_WORDS])


def ground_truth_words(reference: str | None, has_images: bool) -> frozenset[str]:
    """The sample's ground-truth words (see the module docstring); empty without images or a reference."""
    if not reference or not has_images:
        return frozenset()
    return frozenset(w for w in (m.group().lower() for m in WORD.finditer(reference)) if w in GROUNDED_VOCABULARY)


def grounded_mask(tokenizer: Any, token_ids: Sequence[int], words: frozenset[str]) -> list[int]:
    """1 for each grounded token of `token_ids`, else 0. A token's characters are what decoding the prefix up to it
    adds to the text (special tokens skipped), so byte-pieces of one character land on the token completing it."""
    if not words:
        return [0] * len(token_ids)
    spans, previous = [], ""
    for end in range(1, len(token_ids) + 1):
        text = tokenizer.decode(list(token_ids[:end]), skip_special_tokens=True)
        if not text.startswith(previous):                  # a detokenizer that rewrites earlier text: re-anchor
            previous = text[: len(previous)]
        spans.append((len(previous), len(text)))
        previous = text
    hits = [(m.start(), m.end()) for m in WORD.finditer(previous) if m.group().lower() in words]
    return [int(any(start < hit_end and hit_start < stop for hit_start, hit_end in hits)) for start, stop in spans]

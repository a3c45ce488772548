"""Real English text that ships with every CPython: the prose of the Python reference (pydoc topics).

Used for reference statistics of exported versions, parity checks, tests and benchmarks, so none of
them needs a dataset download. Deterministic: the same sentences in the same order on every machine.
"""

import pydoc_data.topics
import re
from functools import cache


@cache
def _paragraphs() -> tuple[str, ...]:
    paragraphs = []
    for _, topic in sorted(pydoc_data.topics.topics.items()):
        for block in re.split(r"\n\s*\n", topic):
            text = " ".join(block.split())
            # Prose only: code samples and option tables don't start with a capital or end with a full stop.
            if text and text[0].isupper() and text.endswith(".") and ">>>" not in text:
                paragraphs.append(text)
    return tuple(dict.fromkeys(paragraphs))


@cache
def sentences() -> tuple[str, ...]:
    """About 1,500 distinct English sentences of 30–200 characters (~8–45 tokens)."""
    found = []
    for paragraph in _paragraphs():
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph):
            if 30 <= len(sentence) <= 200 and sentence.endswith("."):
                found.append(sentence)
    return tuple(dict.fromkeys(found))


@cache
def paragraphs(min_chars: int = 350, max_chars: int = 700) -> tuple[str, ...]:
    """Distinct English paragraphs of ``min_chars``–``max_chars`` characters (~80–150 tokens)."""
    return tuple(p for p in _paragraphs() if min_chars <= len(p) <= max_chars)

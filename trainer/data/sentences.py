"""A document cut into sentences, for inverse-cloze views: a simple rule-based splitter.

A sentence ends at ``.``, ``!`` or ``?`` (and any closing quotes or brackets) followed by white space
and a capital letter, a digit or an opening quote or bracket, unless the word ending there is a
common abbreviation (``e.g.``, ``Dr.``) or a single capital initial (``J. Smith``). Line breaks
always end a unit; when a document has several lines, its first line is its title.
"""

import re

_BOUNDARY = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])")
_ABBREVIATIONS = frozenset(
    [
        "e.g.",
        "i.e.",
        "etc.",
        "vs.",
        "cf.",
        "al.",
        "approx.",
        "fig.",
        "no.",
        "dr.",
        "mr.",
        "mrs.",
        "ms.",
        "prof.",
        "st.",
        "jr.",
        "sr.",
        "inc.",
        "ltd.",
        "co.",
    ]
)


def split_sentences(text: str) -> list[str]:
    """The sentences of one line of text, stripped, in order; none for blank text."""
    sentences, start = [], 0
    for boundary in _BOUNDARY.finditer(text):
        last_word = text[start : boundary.start()].rsplit(maxsplit=1)[-1]
        if last_word.lower() in _ABBREVIATIONS or re.fullmatch(r"[A-Z]\.", last_word):
            continue
        sentences.append(text[start : boundary.end()])
        start = boundary.end()
    sentences.append(text[start:])
    return [sentence.strip() for sentence in sentences if sentence.strip()]


def split_document(text: str) -> list[str]:
    """``text`` as units, in order: each line's sentences, with the first line kept whole (the title)
    when there are several non-blank lines."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if len(lines) > 1:
        return [lines[0], *(sentence for line in lines[1:] for sentence in split_sentences(line))]
    return split_sentences(lines[0]) if lines else []

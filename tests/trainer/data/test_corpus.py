"""Corpus preparation, a document at a time: reading, normalisation, PII scrubbing, de-duplication,
fingerprint, split."""

import hashlib
import json
from pathlib import Path

import pytest

from trainer.data.corpus import (
    CorpusError,
    PreparationReport,
    SeenTexts,
    fingerprint,
    is_validation,
    normalise,
    prepare_texts,
    read_corpus,
)
from trainer.data.pii import PII_KINDS
from trainer.data.sample_text import sentences

SENTENCES = [
    "The river rose overnight and flooded the lower fields.",
    "She packed two sandwiches, an apple and a flask of tea.",
    "Our library opens at nine on weekdays and at ten on Saturdays.",
    "The committee postponed its decision until the spring meeting.",
    "He repaired the bicycle chain with a borrowed set of pliers.",
    "A light rain fell as the last train left the station.",
]


# -- reading ---------------------------------------------------------------------------------------


def test_a_txt_file_is_one_document_per_line(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    # A BOM, Windows line ends, an empty line, and a U+2028 that is not a line end in this format.
    path.write_bytes("\ufeff".encode() + b"first line\r\n\r\nsecond\xe2\x80\xa8still second\nthird")
    assert list(read_corpus(path)) == ["first line", "", "second\u2028still second", "third"]


def test_a_jsonl_file_reads_the_configured_field_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "tickets.jsonl"
    records = [{"body": SENTENCES[0], "id": 1}, {"body": "line\u2028separator inside a string", "id": 2}]
    path.write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1], ensure_ascii=False) + "\n")
    assert list(read_corpus(path, text_field="body")) == [SENTENCES[0], "line\u2028separator inside a string"]


def test_a_folder_is_read_recursively_in_sorted_path_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text(SENTENCES[2] + "\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "z.jsonl").write_text(json.dumps({"text": SENTENCES[1]}) + "\n")
    (tmp_path / "a" / "c.txt").write_text(SENTENCES[0] + "\n")
    (tmp_path / "a" / "README.md").write_text("not part of the corpus\n")
    assert list(read_corpus(tmp_path)) == SENTENCES[:3]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "fine"}\n{"text": "broken\n', r"bad\.jsonl:2: not valid JSON"),
        ('{"text": "fine"}\n\n{"body": "x"}\n', r"bad\.jsonl:3: no field 'text' \(fields: body\)"),
        ('{"text": 42}\n', r"bad\.jsonl:1: field 'text' holds int, not a string"),
        ('["text"]\n', r"bad\.jsonl:1: expected a JSON object, got list"),
    ],
)
def test_bad_jsonl_names_the_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(CorpusError, match=message):
        list(read_corpus(tmp_path))


def test_other_unreadable_corpora_are_named(tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes(b"caf\xc3\xa9\nna\xefve\n")
    with pytest.raises(CorpusError, match=r"latin1\.txt:2: not valid UTF-8"):
        list(read_corpus(tmp_path / "latin1.txt"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match=r"data\.csv: unsupported corpus file"):
        list(read_corpus(tmp_path / "data.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match=r"holds no \.txt or \.jsonl files"):
        list(read_corpus(tmp_path / "empty"))
    with pytest.raises(CorpusError, match="no such file or folder"):
        list(read_corpus(tmp_path / "missing.txt"))


# -- normalisation ----------------------------------------------------------------------------------


def test_normalise_applies_nfkc_and_collapses_whitespace() -> None:
    assert normalise("  The\u00a0ﬁrst\tＡpple \n\n was  red.  ") == "The first Apple was red."
    assert normalise(" \t\n ") == ""


# -- preparation -----------------------------------------------------------------------------------


def prepared(documents: list[str], folder: Path, **options: object) -> tuple[list[str], PreparationReport]:
    report = PreparationReport()
    with SeenTexts(folder / "seen.sqlite") as seen:
        texts = list(prepare_texts(documents, report, seen, **options))  # type: ignore[arg-type]
    return texts, report


def test_preparation_normalises_scrubs_dedupes_and_reports(tmp_path: Path) -> None:
    documents = [
        "  The river rose overnight and  flooded the lower fields. ",
        "The river rose overnight and flooded the lower fields.",  # duplicate after normalisation
        "",
        "Too short.",
        "Questions go to ann@example.com before Friday.",
        "Questions go to bob@example.org before Friday.",  # duplicate once scrubbed
        "Ｆull-width letters become ordinary ones here.",
        "Call (415) 555-2671 or 415-555-2672 about the order.",
    ]
    texts, report = prepared(documents, tmp_path, min_chars=12)
    assert texts == [
        "The river rose overnight and flooded the lower fields.",
        "Questions go to [EMAIL] before Friday.",
        "Full-width letters become ordinary ones here.",
        "Call [PHONE] or [PHONE] about the order.",
    ]
    assert (report.documents_read, report.empty_or_short_dropped, report.duplicates_dropped, report.kept) == (
        8,
        2,
        2,
        4,
    )
    # Placeholders in kept texts only: the dropped duplicate's email is not counted.
    assert report.pii_replaced == {"email": 1, "phone": 2, "ip": 0, "card": 0}
    assert set(report.pii_replaced) == set(PII_KINDS)


def test_preparation_keeps_the_first_occurrence_and_can_skip_scrubbing(tmp_path: Path) -> None:
    texts, report = prepared(["b text", "a text", "b  text", "mail x@example.com"], tmp_path, scrub=False)
    assert texts == ["b text", "a text", "mail x@example.com"]
    assert report.duplicates_dropped == 1 and report.pii_replaced == dict.fromkeys(PII_KINDS, 0)


def test_fingerprint_is_sha256_of_texts_each_ended_by_a_newline() -> None:
    expected = hashlib.sha256("".join(f"{text}\n" for text in SENTENCES).encode("utf-8")).hexdigest()
    assert fingerprint(SENTENCES) == expected
    assert fingerprint(reversed(SENTENCES)) != expected
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"])
    assert fingerprint(["café"]) == hashlib.sha256("café\n".encode()).hexdigest()


def split(texts: list[str], fraction: float, seed: str) -> tuple[list[str], list[str]]:
    held_out = [is_validation(text, fraction, seed) for text in texts]
    return [t for t, v in zip(texts, held_out, strict=True) if not v], [
        t for t, v in zip(texts, held_out, strict=True) if v
    ]


def test_the_seen_set_on_disk_tells_new_texts_from_seen_ones(tmp_path: Path) -> None:
    texts = list(sentences()[:500])
    with SeenTexts(tmp_path / "seen.sqlite") as seen:
        assert all(seen.add(text) for text in texts)
        assert not any(seen.add(text) for text in texts)
        assert seen.add(texts[0] + " ")
    assert (tmp_path / "seen.sqlite").stat().st_size > 0  # on disk, not in this process


def test_split_depends_on_text_and_seed_only() -> None:
    texts = list(sentences()[:1000])
    train, validation = split(texts, 0.1, "seed-a")
    assert 60 <= len(validation) <= 140 and len(train) + len(validation) == len(texts)
    assert not set(train) & set(validation)
    # Order does not matter, and each part keeps input order.
    assert split(texts[::-1], 0.1, "seed-a") == (train[::-1], validation[::-1])
    # Adding documents does not move the ones already there.
    more_train, more_validation = split(texts + list(sentences()[1000:1200]), 0.1, "seed-a")
    assert more_train[: len(train)] == train and more_validation[: len(validation)] == validation
    assert split(texts, 0.1, "seed-b")[1] != validation
    assert split(texts, 0.0, "seed-a") == (texts, [])
    with pytest.raises(ValueError, match="validation_fraction"):
        is_validation(texts[0], 1.0, "seed-a")

"""The sentence splitter behind inverse-cloze views."""

from trainer.data.sample_text import paragraphs
from trainer.data.sentences import split_document, split_sentences


def test_sentences_end_at_terminal_punctuation_before_a_capital_or_digit() -> None:
    text = 'The build failed. Why? It ran out of disk! "Clean it." 3 runs later it passed.'
    assert split_sentences(text) == [
        "The build failed.",
        "Why?",
        "It ran out of disk!",
        '"Clean it."',
        "3 runs later it passed.",
    ]


def test_abbreviations_initials_and_decimals_do_not_end_a_sentence() -> None:
    text = "Dr. Smith uses e.g. Python 3.11 with J. Doe. Then it works."
    assert split_sentences(text) == ["Dr. Smith uses e.g. Python 3.11 with J. Doe.", "Then it works."]


def test_a_lowercase_continuation_stays_in_the_sentence() -> None:
    assert split_sentences("See section 2. the rest follows.") == ["See section 2. the rest follows."]


def test_blank_text_has_no_sentences() -> None:
    assert split_sentences("   ") == [] and split_document("\n \n") == []


def test_the_first_of_several_lines_is_the_title_kept_whole() -> None:
    text = "Disk full. Build broken\n\nThe runner ran out of space. Cleaning fixed it.\nIt passed."
    assert split_document(text) == [
        "Disk full. Build broken",
        "The runner ran out of space.",
        "Cleaning fixed it.",
        "It passed.",
    ]


def test_one_line_has_no_title() -> None:
    assert split_document("One. Two.") == ["One.", "Two."]


def test_splitting_real_prose_loses_no_words() -> None:
    for paragraph in paragraphs()[:200]:
        sentences = split_sentences(paragraph)
        assert " ".join(sentences).split() == paragraph.split()
        assert all(sentence == sentence.strip() and sentence for sentence in sentences)

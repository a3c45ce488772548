"""The gate's self-supervised dev set: cut from held-out documents only, deterministic, bounded; documents of
one sentence give no pair."""

from pathlib import Path

from tests.trainer.conftest import tiny_config
from trainer.data.sample_text import paragraphs, sentences
from trainer.data.sentences import split_document
from trainer.release.dev_set import labeled_dev_set, self_supervised_dev_set
from trainer.release.evaluate import LabeledPair
from trainer.run_inputs import load_corpus


def test_pairs_come_from_held_out_documents_only_one_per_document(tmp_path: Path) -> None:
    # Documents of several sentences and documents of one: only the first kind can give a (sentence, rest) pair.
    (tmp_path / "corpus.txt").write_text("\n".join([*paragraphs(), *sentences()[:400]]))
    corpus = load_corpus(tiny_config(tmp_path / "corpus.txt", tmp_path, corpus__validation_fraction=0.3))
    dev_set = self_supervised_dev_set(corpus.validation, size=10_000, seed=0)

    multi = [text for text in corpus.validation if len(split_document(text)) >= 2]
    assert 10 < len(dev_set.queries) <= len(multi) < len(corpus.validation)  # single sentences gave nothing
    assert dev_set.source == "self-supervised" and dev_set.relevant == list(range(len(dev_set.queries)))
    held_out = set(corpus.validation)  # prepare's split keeps these out of the training shards (its own tests)
    for query, target in zip(dev_set.queries, dev_set.targets, strict=True):
        source = next(text for text in multi if query in split_document(text))  # a sentence of a held-out document
        assert source in held_out
        units = split_document(source)
        assert target == " ".join(unit for unit in units if unit != query)  # its document, the query cut out
        assert query not in split_document(target) and len(query.split()) >= 4
    assert len(set(dev_set.targets)) == len(dev_set.targets)  # one pair per document


def test_the_same_documents_and_seed_give_the_same_set_and_the_size_is_bounded() -> None:
    documents = list(paragraphs())
    first, again = self_supervised_dev_set(documents, 50, seed=1), self_supervised_dev_set(documents, 50, seed=1)
    assert (first.queries, first.targets, first.sha256) == (again.queries, again.targets, again.sha256)
    other = self_supervised_dev_set(documents, 50, seed=2)
    assert other.sha256 != first.sha256 and other.queries != first.queries
    assert len(first.queries) == 50 and len(self_supervised_dev_set(documents, 10_000, 1).queries) <= len(documents)
    record = first.record()
    assert (record.source, record.queries, record.targets, record.seed) == ("self-supervised", 50, 50, 1)
    assert record.sha256 == first.sha256 and len(record.sha256) == 64


def test_documents_of_one_sentence_give_no_pair() -> None:
    one_sentence = ["A document of one sentence only, however long it is.", "Another single sentence here."]
    assert self_supervised_dev_set(one_sentence, 10, seed=0).queries == []
    two = ["The first sentence says something. The second sentence says something else."]
    dev_set = self_supervised_dev_set(one_sentence + two, 10, seed=0)
    assert len(dev_set.queries) == 1
    assert {dev_set.queries[0], dev_set.targets[0]} == {
        "The first sentence says something.",
        "The second sentence says something else.",
    }


def test_a_labeled_file_ranks_each_query_against_every_distinct_document() -> None:
    pairs = [LabeledPair("q1", "d1"), LabeledPair("q2", "d2"), LabeledPair("q3", "d1")]
    dev_set = labeled_dev_set(pairs)
    assert (dev_set.targets, dev_set.relevant, dev_set.source) == (["d1", "d2"], [0, 1, 0], "eval_file")

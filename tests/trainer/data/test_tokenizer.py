"""The scratch WordPiece tokenizer: the same texts give byte-identical files in any process, and the merges
follow the rules its docstring states (most frequent pair first, ties to the lower ids, a frequency floor)."""

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer

from trainer.data.tokenizer import SPECIAL_TOKENS, train_wordpiece
from trainer.data.wordpiece import learn_vocabulary

TRAIN_IN_A_NEW_PROCESS = """
import sys
from pathlib import Path
from trainer.data.sample_text import paragraphs, sentences
from trainer.data.tokenizer import train_wordpiece
train_wordpiece([*paragraphs(), *sentences()], 1500, Path(sys.argv[1]))
"""


def test_two_processes_train_the_same_tokenizer_from_the_same_texts(tmp_path: Path) -> None:
    folders = [tmp_path / "first", tmp_path / "second"]
    for hash_seed, folder in enumerate(folders, start=1):
        environment = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
        subprocess.run([sys.executable, "-c", TRAIN_IN_A_NEW_PROCESS, str(folder)], check=True, env=environment)
    for name in ("vocab.txt", "tokenizer.json"):
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name
    assert len((folders[0] / "vocab.txt").read_text().splitlines()) == 1500


def test_merges_take_the_most_frequent_pair_and_ties_go_to_the_lower_ids() -> None:
    words = Counter({"hug": 10, "pug": 5, "pun": 12, "bun": 4, "hugs": 5})
    vocabulary = learn_vocabulary(words, 100, SPECIAL_TOKENS, min_frequency=5)
    learnt = sorted(vocabulary, key=vocabulary.__getitem__)[len(SPECIAL_TOKENS) :]
    # Pair counts: ##u ##g 20, ##u ##n 16, then h ##ug 15, p ##un 12; p ##ug and hug ##s tie at 5 and p's id is
    # lower; b ##un (4) is under the floor of 5.
    characters = ["b", "g", "h", "n", "p", "s", "u", "##g", "##n", "##s", "##u"]
    assert learnt == [*characters, "##ug", "##un", "hug", "pun", "pug", "hugs"]
    assert learn_vocabulary(words, len(SPECIAL_TOKENS) + len(characters) + 2, SPECIAL_TOKENS, 1) == {
        token: index for index, token in enumerate([*SPECIAL_TOKENS, *characters, "##ug", "##un"])
    }


def test_the_trained_tokenizer_cuts_unseen_words_into_learnt_pieces(tmp_path: Path) -> None:
    texts = ["Hugging hugs, pugs and puns."] * 3 + ["A hug for the pug!"] * 2
    tokenizer = Tokenizer.from_file(str(train_wordpiece(texts, 200, tmp_path)))
    assert tokenizer.encode("Hugs for pugs").tokens == ["[CLS]", "hugs", "for", "pugs", "[SEP]"]
    assert tokenizer.encode("hugger").tokens == ["[CLS]", "hug", "##g", "##e", "##r", "[SEP]"]
    assert tokenizer.encode("zebra").tokens == ["[CLS]", "[UNK]", "[SEP]"]

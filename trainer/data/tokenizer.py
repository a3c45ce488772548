"""A WordPiece tokenizer trained on the corpus (for encoders trained from scratch), BERT-style: the same texts
give the same files."""

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from trainer.data.wordpiece import count_words, learn_vocabulary

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: Iterable[str], vocab_size: int, output: Path) -> Path:
    """Train an uncased WordPiece vocabulary on ``texts`` (read once, as a stream); write ``tokenizer.json``
    and ``vocab.txt``."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    vocabulary = learn_vocabulary(count_words(texts, normalizer, pre_tokenizer), vocab_size, SPECIAL_TOKENS, 2)
    tokenizer = Tokenizer(models.WordPiece(vocabulary, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    output.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output / "tokenizer.json"))
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    (output / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab))
    return output / "tokenizer.json"


def write_tokenizer(texts: Iterable[str], vocab_size: int, tokenizer_dir: Path) -> None:
    """Train the scratch WordPiece tokenizer into a temporary folder and rename it into place: a reader sees
    no tokenizer or a whole one, never a half-written file."""
    tokenizer_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=tokenizer_dir.parent, prefix=f".{tokenizer_dir.name}."))
    try:
        train_wordpiece(texts, vocab_size, temporary)
        if tokenizer_dir.exists():  # a folder without tokenizer.json: left by a run killed before this existed
            shutil.rmtree(tokenizer_dir)
        os.replace(temporary, tokenizer_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise

"""Two small tokenizers trained deterministically from tests/data/align_corpus.txt (tests of alignment).

- `bpe_tokenizer()`: Llama-style BPE (prepended "▁", spaces as "▁", byte fallback to <0xNN> tokens).
- `wordpiece_tokenizer()`: greedy longest-match WordPiece (no "##" prefix) over "▁"-marked words; it
  knows the emoji, tab and newline of one extra training line, so it never needs byte fallback.
Both trainers are deterministic (the Unigram trainer is not: its scores vary between processes).
"""

import functools
import json
from pathlib import Path

CORPUS = Path(__file__).parent / "data" / "align_corpus.txt"
EXTRA_LINE = "a smile 😀 a tab\there a new line\nhere"


def corpus_lines() -> list[str]:
    return CORPUS.read_text(encoding="utf-8").splitlines()


@functools.cache
def bpe_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.train_from_iterator(corpus_lines(), trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return Tokenizer.from_str(json.dumps(spec))


@functools.cache
def wordpiece_tokenizer(vocab_size: int = 200):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="<unk>", continuing_subword_prefix="", max_input_chars_per_word=100))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>"], continuing_subword_prefix="", show_progress=False
    )
    tok.train_from_iterator([*corpus_lines(), EXTRA_LINE], trainer)
    return tok

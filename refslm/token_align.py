"""Cross-tokenizer alignment: which teacher token supervises each student token of the same text.

The paper's code needs one shared tokenizer; this module aligns two. Both tokenizers encode the
same text; their character offsets say which characters each token covers. SPEC.md section 7 is
normative; in short:

1. Units. Tokens of one tokenizer that start at the same character form one unit: the byte-fallback
   pieces of one character (`<0xF0><0x9F><0x98><0x80>`, or ByteLevel's partial-character pieces), or a
   SentencePiece "▁" that the normaliser prepended (it shares the offset of the next token). A unit
   covers the characters from its start to the next unit's start (the first unit starts at 0, the
   last ends at len(text)), so characters a tokenizer skips (e.g. whitespace) join the unit before.
2. Blocks. The unit starts both tokenizers share cut the text into blocks; inside a block the two
   segmentations cover exactly the same characters.
3. In each block, dynamic time warping over the token strings with the Levenshtein distance as cost
   (MinED, as in FuseLLM) matches student tokens to teacher tokens. A token's string is the bytes it
   stands for: SentencePiece "▁" read as a space, `<0xNN>` as that byte, ByteLevel characters as
   their bytes. A student token is supervised by the closest teacher token the path matches it with
   (ties: the first). It is "1:1" when the path matches it with that teacher token only, that
   teacher token with no other student token, and both units cover the same characters; otherwise
   "many:1" (several tokens on one side share characters with one on the other). Student tokens in
   no block (zero-width tokens at the end of the text) are "unaligned".

The pure functions (`token_units`, `align_offsets`, `levenshtein`, `dtw_path`, `token_bytes`) need
NumPy only; `tokenizers` is imported inside the functions that encode text, with a clear error when missing.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .ops import check_int

KINDS = ("1:1", "many:1", "unaligned")
BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def require_tokenizers():
    """Import the optional `tokenizers` package or raise ImportError saying how to install it."""
    try:
        import tokenizers
    except ImportError as error:
        raise ImportError(
            "cross-tokenizer alignment needs the optional package 'tokenizers': pip install 'refslm[io]'"
        ) from error
    return tokenizers


def load_tokenizer(tokenizer):
    """A `tokenizers.Tokenizer`, given one or the path of a tokenizer.json file.

    A missing path is FileNotFoundError, a directory IsADirectoryError, and a file `tokenizers` cannot
    read ValueError, each naming the path.
    """
    tokenizers = require_tokenizers()
    if isinstance(tokenizer, (str, Path)):
        path = Path(tokenizer)
        if path.is_dir():
            raise IsADirectoryError(f"tokenizer path {str(path)!r} is a directory, not a tokenizer.json file")
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        try:
            return tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"tokenizer file {str(path)!r} is not a valid tokenizer.json: {error}") from error
    if not isinstance(tokenizer, tokenizers.Tokenizer):
        raise TypeError(f"expected a tokenizers.Tokenizer or a tokenizer.json path, got {type(tokenizer).__name__}")
    return tokenizer


# --------------------------------------------------------------------------------------------------
# pure alignment on offsets


def token_units(offsets: np.ndarray, text_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Group tokens that start at the same character.

    offsets [n, 2] int (start, end) character offsets, 0 <= start <= end <= text_length, starts
    non-decreasing (n may be 0) -> unit_of [n] int64 (unit index of each token), unit_spans [U, 2]
    int64 (characters each unit covers: from its start to the next unit's start; the first unit
    starts at 0, the last ends at text_length).
    """
    text_length = check_int("text_length", text_length, 0)
    offsets = np.asarray(offsets)
    if offsets.shape in ((0,), (0, 2)):  # no tokens ([] or an empty [0, 2] array)
        return np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64)
    if offsets.ndim != 2 or offsets.shape[1] != 2 or offsets.dtype.kind not in "iu":
        raise ValueError(f"token offsets must be an integer array [n, 2], got {offsets.dtype} {offsets.shape}")
    starts, ends = offsets[:, 0], offsets[:, 1]
    if ((starts < 0) | (ends < starts) | (ends > text_length)).any():
        raise ValueError(f"token offsets must satisfy 0 <= start <= end <= {text_length}, got {offsets.tolist()}")
    if (np.diff(starts) < 0).any():
        raise ValueError(f"token start offsets must not decrease, got {starts.tolist()}")
    unit_starts, unit_of = np.unique(starts.astype(np.int64), return_inverse=True)
    unit_starts[0] = 0
    ends = np.append(unit_starts[1:], text_length)
    return unit_of.astype(np.int64), np.stack([unit_starts, ends], axis=1)


def levenshtein(a: Sequence, b: Sequence) -> int:
    """Minimum number of single-element (character or byte) insertions, deletions and substitutions
    turning sequence a into sequence b."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """Monotone warping path through cost [n, m] from (0, 0) to (n-1, m-1) with least total cost.

    Each step advances i, j or both; every row and column is visited. Ties prefer the diagonal,
    then advancing i. Returns the (i, j) pairs in order.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or 0 in cost.shape or not np.isfinite(cost).all():
        raise ValueError(f"dtw_path cost must be a finite [n >= 1, m >= 1] array, got shape {cost.shape}")
    n, m = cost.shape
    total = np.full((n + 1, m + 1), np.inf)
    total[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            total[i, j] = cost[i - 1, j - 1] + min(total[i - 1, j - 1], total[i - 1, j], total[i, j - 1])
    path, i, j = [], n, m
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        steps = ((total[i - 1, j - 1], i - 1, j - 1), (total[i - 1, j], i - 1, j), (total[i, j - 1], i, j - 1))
        _, i, j = min(steps, key=lambda step: step[0])  # min keeps the first of equal totals
    return path[::-1]


@dataclass(frozen=True)
class OffsetAlignment:
    """Result of `align_offsets` for n_s student and n_t teacher tokens.

    teacher_index [n_s] int64: teacher token supervising each student token, -1 when unaligned.
    kind          tuple of n_s strings from KINDS.
    student_spans [n_s, 2], teacher_spans [n_t, 2] int64: characters of each token's unit.
    blocks        tuple of (s_lo, s_hi, t_lo, t_hi): student tokens s_lo..s_hi-1 and teacher tokens
                  t_lo..t_hi-1 cover exactly the same characters.
    """

    teacher_index: np.ndarray
    kind: tuple[str, ...]
    student_spans: np.ndarray
    teacher_spans: np.ndarray
    blocks: tuple[tuple[int, int, int, int], ...]


def align_offsets(
    text: str,
    student_offsets: np.ndarray,
    teacher_offsets: np.ndarray,
    student_surfaces: Sequence[bytes],
    teacher_surfaces: Sequence[bytes],
) -> OffsetAlignment:
    """Align two tokenizations of `text` (see the module docstring).

    text: a non-empty str; *_offsets [n, 2] character offsets from the tokenizer; *_surfaces: the
    bytes each token stands for (`token_bytes`), the strings the edit-distance DP compares.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    s_unit, s_units = token_units(student_offsets, len(text))
    t_unit, t_units = token_units(teacher_offsets, len(text))
    for side, surfaces, count in (("student", student_surfaces, len(s_unit)),
                                  ("teacher", teacher_surfaces, len(t_unit))):
        if len(surfaces) != count or not all(isinstance(s, (bytes, bytearray)) for s in surfaces):
            raise ValueError(f"{side}_surfaces must be {count} bytes strings, one per token, got "
                             f"{[type(s).__name__ for s in surfaces][:8]} ({len(surfaces)})")
    s_spans, t_spans = s_units[s_unit], t_units[t_unit]
    teacher_index = np.full(len(s_unit), -1, dtype=np.int64)
    kind = ["unaligned"] * len(s_unit)
    shared = sorted(set(s_units[:, 0].tolist()) & set(t_units[:, 0].tolist()))
    blocks = []
    for lo, hi in zip(shared, [*shared[1:], len(text)], strict=False):  # no shared start: no block
        s_in = np.flatnonzero((s_spans[:, 0] >= lo) & (s_spans[:, 0] < hi))
        t_in = np.flatnonzero((t_spans[:, 0] >= lo) & (t_spans[:, 0] < hi))
        if lo == hi or not len(s_in) or not len(t_in):  # zero-width tokens at the very end of the text
            continue
        blocks.append((int(s_in[0]), int(s_in[-1]) + 1, int(t_in[0]), int(t_in[-1]) + 1))
        cost = np.array(
            [[levenshtein(student_surfaces[i], teacher_surfaces[j]) for j in t_in] for i in s_in], dtype=np.float64
        )
        path = dtw_path(cost)
        best: dict[int, int] = {}
        for i, j in path:
            if i not in best or cost[i, j] < cost[i, best[i]]:
                best[i] = j
        matches_of_i = np.bincount([i for i, _ in path], minlength=len(s_in))
        matches_of_j = np.bincount([j for _, j in path], minlength=len(t_in))
        for i, j in best.items():
            s, t = s_in[i], t_in[j]
            exact = matches_of_i[i] == 1 and matches_of_j[j] == 1 and np.array_equal(s_spans[s], t_spans[t])
            teacher_index[s], kind[s] = t, "1:1" if exact else "many:1"
    return OffsetAlignment(teacher_index, tuple(kind), s_spans, t_spans, tuple(blocks))


# --------------------------------------------------------------------------------------------------
# with tokenizers


@dataclass(frozen=True)
class TokenAlignment:
    """Two tokenizations of one text and their alignment (`OffsetAlignment` fields plus the tokens)."""

    text: str
    student_ids: np.ndarray
    teacher_ids: np.ndarray
    student_tokens: tuple[str, ...]
    teacher_tokens: tuple[str, ...]
    alignment: OffsetAlignment

    @property
    def teacher_index(self) -> np.ndarray:
        """[n_student] int64: teacher token index supervising each student token (-1: none)."""
        return self.alignment.teacher_index

    @property
    def kind(self) -> tuple[str, ...]:
        """Per student token: "1:1", "many:1" or "unaligned"."""
        return self.alignment.kind


def align_text(text: str, student_tokenizer, teacher_tokenizer) -> TokenAlignment:
    """Tokenise `text` with both tokenizers (no special tokens added) and align the tokens.

    Raises ValueError for empty text, a text either tokenizer encodes to no tokens (e.g. only
    whitespace that it drops), or when the two tokenizers decode to different texts (they would not
    be describing the same characters, e.g. one lowercases or maps characters to <unk>).
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    student_tokenizer, teacher_tokenizer = load_tokenizer(student_tokenizer), load_tokenizer(teacher_tokenizer)
    s_enc = student_tokenizer.encode(text, add_special_tokens=False)
    t_enc = teacher_tokenizer.encode(text, add_special_tokens=False)
    for side, encoding in (("student", s_enc), ("teacher", t_enc)):
        if not encoding.ids:
            raise ValueError(f"the {side} tokenizer encodes {text!r} to no tokens; there is nothing to align")
    s_text = student_tokenizer.decode(s_enc.ids, skip_special_tokens=False)
    t_text = teacher_tokenizer.decode(t_enc.ids, skip_special_tokens=False)
    if s_text != t_text:
        raise ValueError(
            f"the tokenizers decode {text!r} differently: student {s_text!r}, teacher {t_text!r}; "
            "aligned tokens would not cover the same characters"
        )
    return TokenAlignment(
        text=text,
        student_ids=np.asarray(s_enc.ids, dtype=np.int64),
        teacher_ids=np.asarray(t_enc.ids, dtype=np.int64),
        student_tokens=tuple(s_enc.tokens),
        teacher_tokens=tuple(t_enc.tokens),
        alignment=align_offsets(
            text,
            np.asarray(s_enc.offsets),
            np.asarray(t_enc.offsets),
            token_surfaces(student_tokenizer, s_enc.tokens),
            token_surfaces(teacher_tokenizer, t_enc.tokens),
        ),
    )


def teacher_token_of(
    alignments: Sequence[TokenAlignment], decoder_len: int, *, kinds: Sequence[str] = ("1:1", "many:1")
) -> np.ndarray:
    """[B, decoder_len] int64 for `refslm.align.index_map`: alignments[b].teacher_index for the student
    target tokens whose kind is in `kinds`, -1 elsewhere (other kinds, padding). Raises if a student
    target is longer than decoder_len.
    """
    check_int("decoder_len", decoder_len, 1)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"kinds must be taken from {KINDS}, got {sorted(unknown)}")
    out = np.full((len(alignments), decoder_len), -1, dtype=np.int64)
    for b, alignment in enumerate(alignments):
        n = len(alignment.student_ids)
        if n > decoder_len:
            raise ValueError(f"alignments[{b}] has {n} student tokens, more than decoder_len={decoder_len}")
        keep = np.isin(alignment.kind, list(kinds))
        out[b, :n] = np.where(keep, alignment.teacher_index, -1)
    return out


# --------------------------------------------------------------------------------------------------
# vocabulary: token strings as bytes


@functools.cache
def _byte_level_decoding() -> dict[str, int]:
    """The GPT-2 ByteLevel table inverted: printable stand-in character -> byte value."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    table = {chr(b): b for b in kept}
    table.update({chr(256 + k): b for k, b in enumerate(shifted)})
    return table


def _uses_byte_level(tokenizer) -> bool:
    spec = json.loads(tokenizer.to_str())
    found = []

    def walk(node):
        if isinstance(node, dict):
            found.append(node.get("type"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk([spec.get("pre_tokenizer"), spec.get("decoder")])
    return "ByteLevel" in found


def token_bytes(token: str, *, byte_level: bool) -> bytes:
    """The bytes a vocabulary token stands for: `<0xNN>` -> that byte; ByteLevel stand-in characters ->
    their bytes; otherwise UTF-8 with SentencePiece "▁" read as a space."""
    match = BYTE_TOKEN.match(token)
    if match:
        return bytes([int(match.group(1), 16)])
    if byte_level:
        table = _byte_level_decoding()
        if all(ch in table for ch in token):
            return bytes(table[ch] for ch in token)
    return token.replace("▁", " ").encode("utf-8")


def token_surfaces(tokenizer, tokens: Sequence[str]) -> list[bytes]:
    """`token_bytes` of each token of `tokenizer` (ByteLevel read from the tokenizer's settings)."""
    byte_level = _uses_byte_level(tokenizer)
    return [token_bytes(token, byte_level=byte_level) for token in tokens]


def shared_vocab_pairs(student_tokenizer, teacher_tokenizer) -> np.ndarray:
    """[K, 2] int64 (student id, teacher id) of tokens standing for the same bytes, sorted by student
    id; for `refslm.align.vocab_map(id_pairs=...)`. Special (added) tokens pair by their exact text.
    When several tokens of one tokenizer stand for the same bytes, a regular token wins over a
    `<0xNN>` one, then the lowest id.
    """
    keyed = []
    for tokenizer in (load_tokenizer(student_tokenizer), load_tokenizer(teacher_tokenizer)):
        byte_level = _uses_byte_level(tokenizer)
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        chosen: dict[tuple[bool, bytes], tuple[bool, int]] = {}
        for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
            surface = token.encode() if token in special else token_bytes(token, byte_level=byte_level)
            key = (token in special, surface)
            rank = (bool(BYTE_TOKEN.match(token)), token_id)
            chosen[key] = min(chosen.get(key, rank), rank)
        keyed.append({key: rank[1] for key, rank in chosen.items()})
    student, teacher = keyed
    pairs = sorted((student[key], teacher[key]) for key in student.keys() & teacher.keys())
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)

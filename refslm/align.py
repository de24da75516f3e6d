"""Teacher/student sequence alignment for distillation (SPEC.md section 7 is normative).

A decoder-only teacher reads [source; target] as one causal sequence; the encoder-decoder student
encodes the source and decodes the target. Student decoder position t predicts target token t, so it
is supervised by the teacher logit computed after the teacher has seen exactly source + target[:t]:
the teacher position just before target token t. This module builds both batches, the index map
(student position -> teacher position) with its validity mask, gathers the aligned teacher logits,
reconciles the two vocabularies, and samples on-policy targets from the student (the paper's KD).

Ids are int64; a "row" argument is a sequence of 1-D integer sequences (one per batch item).
Nothing here imports an optional package; `refslm.token_align` handles two different tokenizers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .ops import check_int

# --------------------------------------------------------------------------------------------------
# input checking and padding

INT64_END = 2**63  # ids must fit int64: [0, 2**63)


def as_id_rows(rows: Sequence[Sequence[int]], name: str, *, vocab_size: int | None = None) -> list[np.ndarray]:
    """Validate a batch of token-id sequences -> list of 1-D int64 arrays.

    Raises ValueError naming `name` for an empty batch, an empty or non-1-D row, non-integer ids, or
    ids outside [0, vocab_size) ([0, 2**63), what int64 holds, when vocab_size is None; a vocab_size
    that is no int is a TypeError). Values are checked before the cast, so a uint64 id never wraps to
    a negative one.
    """
    limit = INT64_END if vocab_size is None else check_int("vocab_size", vocab_size, 1)
    if not isinstance(rows, Sequence | np.ndarray):
        raise ValueError(f"{name}: expected a sequence of token-id sequences, got {type(rows).__name__}")
    if len(rows) == 0:
        raise ValueError(f"{name}: expected at least one sequence, got an empty batch")
    out = []
    for b, row in enumerate(rows):
        arr = np.asarray(row)
        if arr.ndim != 1:
            raise ValueError(f"{name}[{b}]: expected a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"{name}[{b}]: is empty; every sequence needs at least one token")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name}[{b}]: token ids must be integers, got dtype {arr.dtype}")
        bad = (arr < 0) | (arr >= limit)
        if bad.any():
            bound = "2**63" if vocab_size is None else vocab_size
            raise ValueError(f"{name}[{b}]: token id {int(arr[bad][0])} is outside [0, {bound})")
        out.append(arr.astype(np.int64))
    return out


def _typed_array(name: str, value, kinds: str, expected: str, ndim: int) -> np.ndarray:
    """np.asarray(value); ValueError naming `name` unless its dtype kind is in `kinds` and it has `ndim` axes."""
    arr = np.asarray(value)
    if arr.dtype.kind not in kinds or arr.ndim != ndim:
        raise ValueError(f"{name} must be {expected}, got {arr.dtype} {arr.shape}")
    return arr


def pad_rows(rows: Sequence[np.ndarray], length: int, pad_id: int, *, side: str, name: str) -> np.ndarray:
    """Pad 1-D id rows to [B, length] int64 with pad_id on the "left" or "right".

    Raises ValueError if a row is longer than `length` (truncation is the caller's decision).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    out = np.full((len(rows), length), pad_id, dtype=np.int64)
    for b, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"{name}[{b}] has {len(row)} tokens, more than the length {length}")
        if side == "right":
            out[b, : len(row)] = row
        elif len(row):
            out[b, -len(row) :] = row
    return out


def truncate_sources(sources: Sequence[np.ndarray], encoder_len: int) -> list[np.ndarray]:
    """Keep the first `encoder_len` tokens of each source (public code: Hugging Face truncation_side='right')."""
    check_int("encoder_len", encoder_len, 1)
    return [s[:encoder_len] for s in sources]


def fit_targets(targets: Sequence[np.ndarray], decoder_len: int, *, truncate: bool) -> list[np.ndarray]:
    """Targets longer than `decoder_len`: keep the first decoder_len tokens if `truncate`, else raise."""
    check_int("decoder_len", decoder_len, 1)
    for b, target in enumerate(targets):
        if len(target) > decoder_len and not truncate:
            raise ValueError(
                f"targets[{b}] has {len(target)} tokens, more than decoder_len={decoder_len}; "
                "pass truncate_target=True to keep the first decoder_len tokens"
            )
    return [t[:decoder_len] for t in targets]


# --------------------------------------------------------------------------------------------------
# the paper's layout and the student batch


@dataclass(frozen=True)
class PaperLayout:
    """The paper's fixed-length batches. Defaults: the Phi-3.5 tokenizer's pad 0 and BOS 1.

    encoder_len: source length (student encoder input; teacher prefix, left-padded).
    decoder_len: target length (student decoder; teacher suffix, right-padded).
    pad_id, bos_id: token ids, ints >= 0 (and below vocab_size where a batch is given one).
    truncate_target: keep the first decoder_len tokens of a longer target instead of raising.
    """

    encoder_len: int
    decoder_len: int
    pad_id: int = 0
    bos_id: int = 1
    truncate_target: bool = False

    def __post_init__(self) -> None:
        check_int("encoder_len", self.encoder_len, 1)
        check_int("decoder_len", self.decoder_len, 1)
        check_int("pad_id", self.pad_id, 0)
        check_int("bos_id", self.bos_id, 0)
        if not isinstance(self.truncate_target, bool):
            raise ValueError(f"truncate_target must be True or False, got {self.truncate_target!r}")

    def fit(self, sources, targets, vocab_size: int | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Validated pairs with sources truncated to encoder_len and targets fitted to decoder_len
        (pad_id and bos_id must lie in [0, vocab_size) when vocab_size is given)."""
        src, tgt = _paired(sources, targets, vocab_size)
        check_int("pad_id", self.pad_id, 0, vocab_size)
        check_int("bos_id", self.bos_id, 0, vocab_size)
        tgt = fit_targets(tgt, self.decoder_len, truncate=self.truncate_target)
        return truncate_sources(src, self.encoder_len), tgt


@dataclass(frozen=True)
class StudentBatch:
    """The encoder-decoder student's inputs.

    encoder_input_ids [B, encoder_len] int64: source, right-padded with pad.
    decoder_input_ids [B, decoder_len] int64: [BOS] + target[:-1], right-padded with pad.
    labels            [B, decoder_len] int64: target, right-padded with pad (pad = ignored label).
    target_lengths    [B] int64: number of real target tokens per row.
    """

    encoder_input_ids: np.ndarray
    decoder_input_ids: np.ndarray
    labels: np.ndarray
    target_lengths: np.ndarray


def student_batch(
    sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], layout: PaperLayout, *, vocab_size=None
) -> StudentBatch:
    """Student batch as the public code builds it: sources truncated to their first encoder_len
    tokens and right-padded; labels = target right-padded; decoder input = [BOS] + labels[:-1].
    """
    src, tgt = layout.fit(sources, targets, vocab_size)
    labels = pad_rows(tgt, layout.decoder_len, layout.pad_id, side="right", name="targets")
    decoder_input_ids = np.empty_like(labels)
    decoder_input_ids[:, 0] = layout.bos_id
    decoder_input_ids[:, 1:] = labels[:, :-1]
    return StudentBatch(
        encoder_input_ids=pad_rows(src, layout.encoder_len, layout.pad_id, side="right", name="sources"),
        decoder_input_ids=decoder_input_ids,
        labels=labels,
        target_lengths=np.array([len(t) for t in tgt], dtype=np.int64),
    )


# --------------------------------------------------------------------------------------------------
# teacher batches: paper (left-padded source), right-padded / unpadded, packed


@dataclass(frozen=True)
class TeacherBatch:
    """Teacher rows holding the B (source, target) pairs.

    input_ids      [R, T_teacher] int64.
    attention_mask [R, T_teacher] bool: input_ids != pad (a target token equal to pad is masked too).
    segment_ids    [R, T_teacher] int64: b + 1 on the tokens of pair b, 0 on padding. In a packed row
                   the teacher must attend only within a segment (block-diagonal causal mask).
    position_ids   [R, T_teacher] int64: 0, 1, ... from the first token of each pair, 0 on padding.
                   A decoder-only teacher scores every pair as if alone with
                   `model.logits(input_ids, position_ids=position_ids, segment_ids=segment_ids)`.
    rows           [B] int64: teacher row holding pair b.
    source_ends    [B] int64: teacher position just after the last source token of pair b; target
                   token t of pair b sits at source_ends[b] + t.
    target_lengths [B] int64: target tokens of pair b inside the teacher row.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    segment_ids: np.ndarray
    position_ids: np.ndarray
    rows: np.ndarray
    source_ends: np.ndarray
    target_lengths: np.ndarray


def _paired(sources, targets, vocab_size) -> tuple[list[np.ndarray], list[np.ndarray]]:
    src = as_id_rows(sources, "sources", vocab_size=vocab_size)
    tgt = as_id_rows(targets, "targets", vocab_size=vocab_size)
    if len(src) != len(tgt):
        raise ValueError(f"sources has {len(src)} rows but targets has {len(tgt)}")
    return src, tgt


def _teacher_batch(input_ids: np.ndarray, pad_id: int, rows, starts, src, tgt) -> TeacherBatch:
    """Assemble a TeacherBatch from rows already filled and pair b placed at rows[b], starts[b]."""
    segment_ids = np.zeros_like(input_ids)
    position_ids = np.zeros_like(input_ids)
    for b, (row, start) in enumerate(zip(rows, starts, strict=True)):
        size = len(src[b]) + len(tgt[b])
        segment_ids[row, start : start + size] = b + 1
        position_ids[row, start : start + size] = np.arange(size)
    return TeacherBatch(
        input_ids=input_ids,
        attention_mask=input_ids != pad_id,
        segment_ids=segment_ids,
        position_ids=position_ids,
        rows=np.asarray(rows, dtype=np.int64),
        source_ends=np.array([s + len(x) for s, x in zip(starts, src, strict=True)], dtype=np.int64),
        target_lengths=np.array([len(t) for t in tgt], dtype=np.int64),
    )


def paper_teacher_batch(
    sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], layout: PaperLayout, *, vocab_size=None
) -> TeacherBatch:
    """The public code's teacher input [B, encoder_len + decoder_len]: each source truncated to its
    first encoder_len tokens and LEFT-padded to encoder_len, then the target RIGHT-padded to decoder_len.
    Every source ends at position encoder_len, which is why the public code can use one fixed slice.
    """
    src, tgt = layout.fit(sources, targets, vocab_size)
    input_ids = np.concatenate(
        [
            pad_rows(src, layout.encoder_len, layout.pad_id, side="left", name="sources"),
            pad_rows(tgt, layout.decoder_len, layout.pad_id, side="right", name="targets"),
        ],
        axis=1,
    )
    starts = [layout.encoder_len - len(x) for x in src]
    return _teacher_batch(input_ids, layout.pad_id, range(len(src)), starts, src, tgt)


def right_padded_teacher_batch(
    sources: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    *,
    pad_id: int,
    length: int | None = None,
    vocab_size: int | None = None,
) -> TeacherBatch:
    """Teacher rows [source; target] with no padding between them, right-padded to `length`
    (default: the longest pair, so a batch of one is the unpadded row). Per-row source lengths vary.
    """
    src, tgt = _paired(sources, targets, vocab_size)
    check_int("pad_id", pad_id, 0, vocab_size)
    pairs = [np.concatenate([s, t]) for s, t in zip(src, tgt, strict=True)]
    length = max(len(p) for p in pairs) if length is None else length
    check_int("length", length, 1)
    input_ids = pad_rows(pairs, length, pad_id, side="right", name="[source; target] pairs")
    return _teacher_batch(input_ids, pad_id, range(len(src)), [0] * len(src), src, tgt)


def packed_teacher_batch(
    sources: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    *,
    row_length: int,
    pad_id: int,
    vocab_size: int | None = None,
) -> TeacherBatch:
    """Pack the [source; target] pairs, in order, into rows of `row_length` (a pair goes into the
    current row if it fits, else opens a new row; the last row is right-padded). The teacher must
    use `segment_ids` so that no pair attends to another (block-diagonal causal attention).
    """
    check_int("row_length", row_length, 1)
    src, tgt = _paired(sources, targets, vocab_size)
    check_int("pad_id", pad_id, 0, vocab_size)
    rows, starts, used = [], [], []
    for b, (s, t) in enumerate(zip(src, tgt, strict=True)):
        size = len(s) + len(t)
        if size > row_length:
            raise ValueError(f"pair {b} has {size} tokens, more than row_length={row_length}")
        if not used or used[-1] + size > row_length:
            used.append(0)
        rows.append(len(used) - 1)
        starts.append(used[-1])
        used[-1] += size
    input_ids = np.full((len(used), row_length), pad_id, dtype=np.int64)
    for b, (row, start) in enumerate(zip(rows, starts, strict=True)):
        input_ids[row, start : start + len(src[b]) + len(tgt[b])] = np.concatenate([src[b], tgt[b]])
    return _teacher_batch(input_ids, pad_id, rows, starts, src, tgt)


# --------------------------------------------------------------------------------------------------
# index map and gather


def index_map(
    teacher: TeacherBatch, decoder_len: int, teacher_token_of: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Student decoder position -> teacher position, and which positions are supervised.

    teacher_token_of [B, decoder_len] int64 (optional): index of the teacher target token that
    supervises student target token t (-1: none). Default: t itself (one shared tokenizer);
    `refslm.token_align` builds it for two tokenizers.

    Returns index_map [B, decoder_len] int64 and valid [B, decoder_len] bool with
      index_map[b, t] = source_ends[b] - 1 + j   (j = teacher_token_of[b, t]), the teacher position
                        that has seen exactly source + target[:j]; -1 where j < 0 or that position
                        is past the teacher row (the logit does not exist);
      valid[b, t]     = index_map[b, t] >= 0 and j < target_lengths[b] (padding is not supervised).
    In the paper layout index_map[b, t] = encoder_len - 1 + t for every b and t: the public slice.
    """
    check_int("decoder_len", decoder_len, 1)
    if not isinstance(teacher, TeacherBatch):
        raise ValueError(f"teacher must be a TeacherBatch (paper_teacher_batch, right_padded_teacher_batch, "
                         f"packed_teacher_batch), got {type(teacher).__name__}")
    n_pairs, teacher_len = len(teacher.rows), teacher.input_ids.shape[1]
    if teacher_token_of is None:
        teacher_token_of = np.broadcast_to(np.arange(decoder_len, dtype=np.int64), (n_pairs, decoder_len))
    teacher_token_of = np.asarray(teacher_token_of)
    if teacher_token_of.shape != (n_pairs, decoder_len) or not np.issubdtype(teacher_token_of.dtype, np.integer):
        raise ValueError(
            f"teacher_token_of must be an integer array of shape {(n_pairs, decoder_len)}, "
            f"got {teacher_token_of.dtype} {teacher_token_of.shape}"
        )
    position = teacher.source_ends[:, None] - 1 + teacher_token_of
    exists = (teacher_token_of >= 0) & (position < teacher_len)
    valid = exists & (teacher_token_of < teacher.target_lengths[:, None])
    return np.where(exists, position, -1).astype(np.int64), valid


def gather_teacher_logits(
    teacher_logits: np.ndarray, index_map: np.ndarray, mask: np.ndarray, rows: np.ndarray | None = None
) -> np.ndarray:
    """Aligned teacher logits for the loss: [R, T_teacher, V] -> [B, T_dec, V].

    out[b, t] = teacher_logits[rows[b], index_map[b, t]] where mask[b, t], else 0 (a row the loss
    must weight 0). index_map and rows [B] are integer arrays, mask is bool; rows defaults to
    arange(B) (one teacher row per pair, R == B). Raises if a masked-in position has no teacher logit
    (index -1 or out of range). Output dtype = input dtype.
    """
    teacher_logits = np.asarray(teacher_logits)
    if teacher_logits.ndim != 3:
        raise ValueError(f"teacher_logits must be [R, T_teacher, V], got shape {teacher_logits.shape}")
    index_map = _typed_array("index_map", index_map, "iu", "an integer array [B, T_dec]", 2)
    mask = _typed_array("mask", mask, "b", "a bool array [B, T_dec]", 2)
    if mask.shape != index_map.shape:
        raise ValueError(f"index_map and mask must both be [B, T_dec], got {index_map.shape} and {mask.shape}")
    n_rows, teacher_len, _ = teacher_logits.shape
    if rows is None:
        if n_rows != index_map.shape[0]:
            raise ValueError(f"teacher_logits has {n_rows} rows but index_map {index_map.shape[0]}; pass rows")
        rows = np.arange(n_rows)
    rows = _typed_array("rows", rows, "iu", f"an integer array [B={index_map.shape[0]}]", 1)
    if rows.shape != index_map.shape[:1] or ((rows < 0) | (rows >= n_rows)).any():
        raise ValueError(f"rows must be [B={index_map.shape[0]}] with values in [0, {n_rows}), got {rows}")
    picked = index_map[mask]
    if ((picked < 0) | (picked >= teacher_len)).any():
        raise ValueError(f"index_map has positions outside [0, {teacher_len}) where mask is True")
    out = np.zeros(index_map.shape + teacher_logits.shape[2:], dtype=teacher_logits.dtype)
    b_idx = np.broadcast_to(rows[:, None], index_map.shape)[mask]
    out[mask] = teacher_logits[b_idx, picked]
    return out


# --------------------------------------------------------------------------------------------------
# vocabulary reconciliation


@dataclass(frozen=True)
class VocabMap:
    """K shared vocabulary entries: column k is student id student_ids[k] and teacher id teacher_ids[k]."""

    student_ids: np.ndarray
    teacher_ids: np.ndarray
    student_vocab: int
    teacher_vocab: int

    @property
    def is_prefix(self) -> bool:
        """True when both id lists are 0..K-1 (then `restrict` returns views, no copies)."""
        k = np.arange(len(self.student_ids))
        return bool(np.array_equal(self.student_ids, k) and np.array_equal(self.teacher_ids, k))

    def restrict(self, student_logits: np.ndarray, teacher_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[..., V_student], [..., V_teacher] -> both [..., K], column k comparing the same token."""
        sides = (("student", student_logits, self.student_vocab), ("teacher", teacher_logits, self.teacher_vocab))
        for name, x, size in sides:
            if x.shape[-1] != size:
                raise ValueError(f"{name}_logits last axis must be {size}, got shape {x.shape}")
        if self.is_prefix:
            k = len(self.student_ids)
            return student_logits[..., :k], teacher_logits[..., :k]
        return np.take(student_logits, self.student_ids, axis=-1), np.take(teacher_logits, self.teacher_ids, axis=-1)

    def expand_student_grad(self, grad: np.ndarray) -> np.ndarray:
        """Gradient on the K restricted student columns [..., K] -> [..., V_student] (0 elsewhere)."""
        grad = np.asarray(grad)
        if grad.ndim == 0 or grad.shape[-1] != len(self.student_ids):
            raise ValueError(f"grad last axis must be K={len(self.student_ids)} (the shared columns), got shape "
                             f"{grad.shape}")
        out = np.zeros(grad.shape[:-1] + (self.student_vocab,), dtype=grad.dtype)
        out[..., self.student_ids] = grad
        return out


def vocab_map(
    student_vocab: int, teacher_vocab: int, *, cut_to_min: bool = False, id_pairs: np.ndarray | None = None
) -> VocabMap:
    """How student and teacher logit columns correspond.

    id_pairs [K, 2] int (student id, teacher id), each id at most once per side: explicit map.
    cut_to_min: the public code's rule, ids 0 .. min(V_student, V_teacher)-1 on both sides.
    Neither: the vocabularies must have the same size (identity); otherwise ValueError.
    """
    check_int("student_vocab", student_vocab, 1)
    check_int("teacher_vocab", teacher_vocab, 1)
    if id_pairs is not None and cut_to_min:
        raise ValueError("give either id_pairs or cut_to_min, not both")
    if id_pairs is None:
        if student_vocab != teacher_vocab and not cut_to_min:
            raise ValueError(
                f"student vocabulary ({student_vocab}) and teacher vocabulary ({teacher_vocab}) differ: pass "
                "cut_to_min=True (the public code's rule) or id_pairs mapping student ids to teacher ids"
            )
        k = np.arange(min(student_vocab, teacher_vocab), dtype=np.int64)
        return VocabMap(k, k, student_vocab, teacher_vocab)
    pairs = np.asarray(id_pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] == 0 or not np.issubdtype(pairs.dtype, np.integer):
        raise ValueError(f"id_pairs must be a non-empty integer array [K, 2], got {pairs.dtype} {pairs.shape}")
    for column, (side, size) in enumerate((("student", student_vocab), ("teacher", teacher_vocab))):
        ids = pairs[:, column]
        if ((ids < 0) | (ids >= size)).any():
            raise ValueError(f"id_pairs {side} ids must be in [0, {size})")
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"id_pairs maps a {side} id more than once")
    return VocabMap(pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64), student_vocab, teacher_vocab)


# --------------------------------------------------------------------------------------------------
# on-policy targets and the complete KD batch


def cut_after_eos(ids: np.ndarray, eos_id: int) -> np.ndarray:
    """[n] -> the ids up to and including the first EOS (all of them if there is none)."""
    (ids,) = as_id_rows([ids], "ids")
    hits = np.flatnonzero(ids == check_int("eos_id", eos_id, 0))
    return ids if hits.size == 0 else ids[: hits[0] + 1]


def replace_out_of_vocab(
    ids: np.ndarray, tokenizer_size: int, unk_id: int, *, public_off_by_one: bool = False
) -> np.ndarray:
    """Ids >= tokenizer_size (the student vocabulary may be larger than the tokenizer) -> unk_id.

    public_off_by_one=True reproduces the public code's `ids > len(tokenizer)`, which keeps the one
    id equal to tokenizer_size.
    """
    (ids,) = as_id_rows([ids], "ids")
    check_int("tokenizer_size", tokenizer_size, 1)
    check_int("unk_id", unk_id, 0, tokenizer_size)
    out_of_vocab = ids > tokenizer_size if public_off_by_one else ids >= tokenizer_size
    return np.where(out_of_vocab, unk_id, ids)


def _check_tokenizer_ids(tokenizer_size: int, eos_id: int, unk_id: int) -> None:
    """tokenizer_size an int >= 1 and eos_id, unk_id ints in [0, tokenizer_size) (ops.check_int's errors)."""
    check_int("tokenizer_size", tokenizer_size, 1)
    check_int("eos_id", eos_id, 0, tokenizer_size)
    check_int("unk_id", unk_id, 0, tokenizer_size)


def sample_on_policy_targets(
    student,
    encoder_input_ids: np.ndarray,
    *,
    max_new_tokens: int,
    eos_id: int,
    unk_id: int,
    tokenizer_size: int,
    temperature: float = 0.9,
    top_k: int | None = 128,
    top_p: float | None = None,
    seed: int = 0,
    public_off_by_one: bool = False,
) -> list[np.ndarray]:
    """Targets sampled from the student itself, as the paper trains (temperature 0.9, top-k 128).

    encoder_input_ids [B, S] int64 (right-padded sources) -> B targets (1-D int64, 1..max_new_tokens
    tokens each): `student.generate` output cut after the first EOS (EOS kept), then ids beyond the
    tokenizer replaced by UNK. Deterministic for a given seed. eos_id and unk_id must lie in
    [0, tokenizer_size).
    """
    check_int("max_new_tokens", max_new_tokens, 1)
    _check_tokenizer_ids(tokenizer_size, eos_id, unk_id)
    if not getattr(student, "is_encoder_decoder", False):
        raise ValueError("student must be an encoder-decoder model (the paper's student: sources go to its "
                         "encoder); a decoder-only student would continue right-padded prompts")
    generated = np.asarray(
        student.generate(
            encoder_input_ids, max_new_tokens, greedy=False, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, eos_token_id=eos_id,
        )
    )
    if generated.shape != (encoder_input_ids.shape[0], max_new_tokens):
        expected = (encoder_input_ids.shape[0], max_new_tokens)
        raise ValueError(f"student.generate returned shape {generated.shape}, expected {expected}")
    return [
        replace_out_of_vocab(cut_after_eos(row, eos_id), tokenizer_size, unk_id, public_off_by_one=public_off_by_one)
        for row in generated
    ]


@dataclass(frozen=True)
class KDBatch:
    """Everything one distillation step needs (paper layout, one shared tokenizer).

    encoder_input_ids      [B, encoder_len] int64  student encoder input (source right-padded)
    decoder_input_ids      [B, decoder_len] int64  [BOS] + target[:-1], right-padded
    labels                 [B, decoder_len] int64  target right-padded with pad
    teacher_input_ids      [B, encoder_len + decoder_len] int64  source left-padded ++ target right-padded
    teacher_attention_mask [B, encoder_len + decoder_len] bool   teacher_input_ids != pad
    index_map              [B, decoder_len] int64  teacher position supervising each student position
    valid_mask             [B, decoder_len] bool   True on real target tokens
    """

    encoder_input_ids: np.ndarray
    decoder_input_ids: np.ndarray
    labels: np.ndarray
    teacher_input_ids: np.ndarray
    teacher_attention_mask: np.ndarray
    index_map: np.ndarray
    valid_mask: np.ndarray


def kd_batch_from_targets(
    sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], layout: PaperLayout, *, vocab_size=None
) -> KDBatch:
    """The complete paper-layout KD batch for given targets (see `kd_batch` for on-policy ones)."""
    student = student_batch(sources, targets, layout, vocab_size=vocab_size)
    teacher = paper_teacher_batch(sources, targets, layout, vocab_size=vocab_size)
    positions, valid = index_map(teacher, layout.decoder_len)
    return KDBatch(
        encoder_input_ids=student.encoder_input_ids,
        decoder_input_ids=student.decoder_input_ids,
        labels=student.labels,
        teacher_input_ids=teacher.input_ids,
        teacher_attention_mask=teacher.attention_mask,
        index_map=positions,
        valid_mask=valid,
    )


def kd_batch(
    student,
    sources: Sequence[Sequence[int]],
    layout: PaperLayout,
    *,
    eos_id: int,
    unk_id: int,
    tokenizer_size: int,
    temperature: float = 0.9,
    top_k: int | None = 128,
    seed: int = 0,
    public_off_by_one: bool = False,
) -> KDBatch:
    """The paper's on-policy KD batch: sample targets from `student` given the truncated, right-padded
    sources (max_new_tokens = decoder_len), then build the student and teacher inputs around them.
    """
    _check_tokenizer_ids(tokenizer_size, eos_id, unk_id)
    check_int("layout.pad_id", layout.pad_id, 0, tokenizer_size)
    check_int("layout.bos_id", layout.bos_id, 0, tokenizer_size)
    src = truncate_sources(as_id_rows(sources, "sources", vocab_size=tokenizer_size), layout.encoder_len)
    encoder_input_ids = pad_rows(src, layout.encoder_len, layout.pad_id, side="right", name="sources")
    targets = sample_on_policy_targets(
        student, encoder_input_ids, max_new_tokens=layout.decoder_len, eos_id=eos_id, unk_id=unk_id,
        tokenizer_size=tokenizer_size, temperature=temperature, top_k=top_k, seed=seed,
        public_off_by_one=public_off_by_one,
    )
    return kd_batch_from_targets(src, targets, layout)


# --------------------------------------------------------------------------------------------------
# `refslm align`: a readable table


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table: columns left-aligned to their widest cell, a dashed rule under the header."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _token(tokenizer, token_id: int) -> str:
    """A token id as `id repr(token string)` for the table."""
    return f"{token_id} {tokenizer.id_to_token(int(token_id))!r}"


def shared_tokenizer_table(tokenizer, source: str, target: str, *, encoder_len=None, decoder_len=None, pad_id=0,
                           bos_id=1) -> str:
    """The paper layout for one tokenizer: what each student position reads, predicts, and which teacher
    position (and the last token that position has seen) supervises it."""
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    src = as_id_rows([tokenizer.encode(source, add_special_tokens=False).ids], "sources")
    tgt = as_id_rows([tokenizer.encode(target, add_special_tokens=False).ids], "targets")
    encoder_len = len(src[0]) if encoder_len is None else encoder_len
    decoder_len = len(tgt[0]) if decoder_len is None else decoder_len
    layout = PaperLayout(encoder_len, decoder_len, pad_id=pad_id, bos_id=bos_id)
    kd = kd_batch_from_targets(src, tgt, layout, vocab_size=vocab_size)
    rows = []
    for t in range(decoder_len):
        position = int(kd.index_map[0, t])
        rows.append([
            t, _token(tokenizer, kd.decoder_input_ids[0, t]), _token(tokenizer, kd.labels[0, t]), position,
            _token(tokenizer, kd.teacher_input_ids[0, position]), "yes" if kd.valid_mask[0, t] else "no (padding)",
        ])
    header = ["student t", "decoder input", "label", "teacher pos", "teacher's last seen token", "supervised"]
    title = (f"paper layout: teacher input = source left-padded to {encoder_len} + target right-padded to "
             f"{decoder_len}; teacher position {encoder_len - 1} + t predicts target token t")
    return title + "\n" + format_table(header, rows)


def cross_tokenizer_table(student_tokenizer, teacher_tokenizer, source: str, target: str, *, decoder_len=None) -> str:
    """Two tokenizers: the teacher reads its own tokens of [source; target] unpadded; each student
    target token is supervised through the cross-tokenizer alignment (refslm.token_align)."""
    from . import token_align

    alignment = token_align.align_text(target, student_tokenizer, teacher_tokenizer)
    teacher_source = teacher_tokenizer.encode(source, add_special_tokens=False).ids
    decoder_len = len(alignment.student_ids) if decoder_len is None else decoder_len
    # one unpadded row: pad_id only sets the attention mask, which the table does not show
    teacher = right_padded_teacher_batch([teacher_source], [alignment.teacher_ids], pad_id=0)
    positions, valid = index_map(teacher, decoder_len, token_align.teacher_token_of([alignment], decoder_len))
    rows = []
    for t in range(decoder_len):
        if t >= len(alignment.student_ids):
            rows.append([t, "(padding)", "", "", -1, "", "no"])
            continue
        j, position = int(alignment.teacher_index[t]), int(positions[0, t])
        rows.append([
            t, _token(student_tokenizer, alignment.student_ids[t]), alignment.kind[t], j,
            _token(teacher_tokenizer, alignment.teacher_ids[j]) if j >= 0 else "", position,
            "yes" if valid[0, t] else "no",
        ])
    header = ["student t", "student token", "kind", "teacher token", "teacher token text", "teacher pos", "supervised"]
    title = (f"cross-tokenizer: teacher row = {len(teacher_source)} source + {len(alignment.teacher_ids)} target "
             "tokens, unpadded; teacher position (source length - 1 + j) predicts teacher target token j")
    return title + "\n" + format_table(header, rows)


def align_arguments(parser) -> None:
    """Arguments of `refslm align`."""
    parser.add_argument("--tokenizer", required=True, help="student tokenizer.json (also the teacher's unless given)")
    parser.add_argument("--teacher-tokenizer", help="teacher tokenizer.json, when it differs from the student's")
    parser.add_argument("--source", required=True, help="source text")
    parser.add_argument("--target", required=True, help="target text")
    parser.add_argument("--encoder-len", type=int, help="encoder length (default: the source's token count)")
    parser.add_argument("--decoder-len", type=int, help="decoder length (default: the target's token count)")
    parser.add_argument("--pad-id", type=int, help="pad id (default 0, the paper's tokenizer; paper layout only)")
    parser.add_argument("--bos-id", type=int, help="BOS id (default 1, the paper's tokenizer; paper layout only)")


def align_command(args) -> int:
    """Print which teacher position supervises each student position; 2 with a message on bad input."""
    import sys

    from .token_align import load_tokenizer

    try:
        student_tokenizer = load_tokenizer(args.tokenizer)
        if args.teacher_tokenizer:
            given = [option for option, value in (("--encoder-len", args.encoder_len), ("--pad-id", args.pad_id),
                                                  ("--bos-id", args.bos_id)) if value is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: for the shared-tokenizer (paper) layout only")
            teacher_tokenizer = load_tokenizer(args.teacher_tokenizer)
            table = cross_tokenizer_table(
                student_tokenizer, teacher_tokenizer, args.source, args.target, decoder_len=args.decoder_len
            )
        else:
            table = shared_tokenizer_table(
                student_tokenizer, args.source, args.target, encoder_len=args.encoder_len,
                decoder_len=args.decoder_len, pad_id=0 if args.pad_id is None else args.pad_id,
                bos_id=1 if args.bos_id is None else args.bos_id,
            )
    except (ValueError, OSError, ImportError) as error:
        print(f"refslm align: error: {error}", file=sys.stderr)
        return 2
    print(table)
    return 0

"""Paper alignment: batches checked id by id against hand derivations, the index map against a fake
teacher whose logits encode exactly the tokens it has seen, vocabulary maps and on-policy KD batches."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refslm import align

PAD, BOS, EOS, UNK = 0, 1, 2, 0


# ---------------------------------------------------------------- hand-written batches


def test_paper_batch_every_id():
    # encoder_len 4, decoder_len 3; the second source (5 tokens) loses its LAST token to truncation.
    sources = [[5, 6], [7, 8, 9, 10, 11]]
    targets = [[20, EOS], [21, 22, EOS]]
    kd = align.kd_batch_from_targets(sources, targets, align.PaperLayout(4, 3, pad_id=PAD, bos_id=BOS))
    np.testing.assert_array_equal(kd.encoder_input_ids, [[5, 6, 0, 0], [7, 8, 9, 10]])
    np.testing.assert_array_equal(kd.labels, [[20, 2, 0], [21, 22, 2]])
    np.testing.assert_array_equal(kd.decoder_input_ids, [[1, 20, 2], [1, 21, 22]])
    np.testing.assert_array_equal(kd.teacher_input_ids, [[0, 0, 5, 6, 20, 2, 0], [7, 8, 9, 10, 21, 22, 2]])
    np.testing.assert_array_equal(kd.teacher_attention_mask, [[0, 0, 1, 1, 1, 1, 0], [1] * 7])
    # teacher position 3 (last source token) predicts target token 0, 4 predicts 1, 5 predicts 2
    np.testing.assert_array_equal(kd.index_map, [[3, 4, 5], [3, 4, 5]])
    np.testing.assert_array_equal(kd.valid_mask, [[1, 1, 0], [1, 1, 1]])
    for name in ("encoder_input_ids", "decoder_input_ids", "labels", "teacher_input_ids", "index_map"):
        assert getattr(kd, name).dtype == np.int64, name
    assert kd.teacher_attention_mask.dtype == bool and kd.valid_mask.dtype == bool


def test_paper_teacher_batch_segments_and_source_ends():
    teacher = align.paper_teacher_batch([[5, 6], [7, 8, 9]], [[20], [21, 22]], align.PaperLayout(3, 2, pad_id=PAD))
    np.testing.assert_array_equal(teacher.input_ids, [[0, 5, 6, 20, 0], [7, 8, 9, 21, 22]])
    np.testing.assert_array_equal(teacher.segment_ids, [[0, 1, 1, 1, 0], [2, 2, 2, 2, 2]])
    np.testing.assert_array_equal(teacher.source_ends, [3, 3])
    np.testing.assert_array_equal(teacher.target_lengths, [1, 2])
    np.testing.assert_array_equal(teacher.rows, [0, 1])


def test_public_fixed_slice_is_the_special_case():
    enc, dec, vocab = 5, 4, 7
    teacher = align.paper_teacher_batch(
        [[3], [4, 5, 6, 7, 8, 9]], [[10, 11], [12, 13, 14, 15]], align.PaperLayout(enc, dec, pad_id=PAD)
    )
    positions, valid = align.index_map(teacher, dec)
    np.testing.assert_array_equal(positions, np.broadcast_to(enc - 1 + np.arange(dec), (2, dec)))
    logits = np.random.default_rng(0).standard_normal((2, enc + dec, vocab))
    every = np.ones_like(valid)
    np.testing.assert_array_equal(
        align.gather_teacher_logits(logits, positions, every), logits[:, enc - 1 : enc - 1 + dec, :]
    )
    # with the validity mask, padding rows become 0 and the rest is unchanged
    masked = align.gather_teacher_logits(logits, positions, valid)
    np.testing.assert_array_equal(masked[0, 2:], 0.0)
    np.testing.assert_array_equal(masked[0, :2], logits[0, enc - 1 : enc + 1])


def test_right_padded_rows_every_index():
    teacher = align.right_padded_teacher_batch([[5, 6], [7, 8, 9]], [[20, EOS], [21]], pad_id=PAD)
    np.testing.assert_array_equal(teacher.input_ids, [[5, 6, 20, 2], [7, 8, 9, 21]])
    np.testing.assert_array_equal(teacher.source_ends, [2, 3])
    positions, valid = align.index_map(teacher, 3)
    # row 1: position 3 - 1 + 2 = 4 is past the row (length 4): the logit does not exist
    np.testing.assert_array_equal(positions, [[1, 2, 3], [2, 3, -1]])
    np.testing.assert_array_equal(valid, [[1, 1, 0], [1, 0, 0]])


def test_packed_rows_every_index():
    teacher = align.packed_teacher_batch([[5], [7, 8], [9, 9, 9]], [[20, EOS], [21], [22]], row_length=6, pad_id=PAD)
    np.testing.assert_array_equal(teacher.input_ids, [[5, 20, 2, 7, 8, 21], [9, 9, 9, 22, 0, 0]])
    np.testing.assert_array_equal(teacher.segment_ids, [[1, 1, 1, 2, 2, 2], [3, 3, 3, 3, 0, 0]])
    np.testing.assert_array_equal(teacher.position_ids, [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 0]])
    np.testing.assert_array_equal(teacher.rows, [0, 0, 1])
    np.testing.assert_array_equal(teacher.source_ends, [1, 5, 3])
    positions, valid = align.index_map(teacher, 2)
    np.testing.assert_array_equal(positions, [[0, 1], [4, 5], [2, 3]])
    np.testing.assert_array_equal(valid, [[1, 1], [1, 0], [1, 0]])
    logits = np.arange(2 * 6, dtype=np.float64).reshape(2, 6, 1)  # logit = 6 * row + position
    gathered = align.gather_teacher_logits(logits, positions, valid, rows=teacher.rows)
    np.testing.assert_array_equal(gathered[..., 0], [[0, 1], [4, 0], [8, 0]])


def test_teacher_token_of_maps_and_unaligned():
    teacher = align.right_padded_teacher_batch([[5, 6]], [[20, 21, 22]], pad_id=PAD)
    positions, valid = align.index_map(teacher, 4, teacher_token_of=np.array([[0, 2, -1, 3]]))
    # teacher token j sits at 2 + j and is predicted at 1 + j; token 3 does not exist (3 target tokens)
    np.testing.assert_array_equal(positions, [[1, 3, -1, 4]])
    np.testing.assert_array_equal(valid, [[1, 1, 0, 0]])


# ---------------------------------------------------------------- the prefix property


def prefix_code(tokens) -> float:
    """An exact (float64-representable) hash of a token sequence."""
    code = len(tokens)
    for tok in tokens:
        code = (code * 1_000_003 + int(tok)) % 2_147_483_647
    return float(code)


def fake_teacher_logits(teacher: align.TeacherBatch) -> np.ndarray:
    """[R, T, 1]: at position p, the code of the tokens a causal teacher sees there (mask and segment)."""
    ids, mask, seg = teacher.input_ids, teacher.attention_mask, teacher.segment_ids
    out = np.empty(ids.shape + (1,))
    for r in range(ids.shape[0]):
        for p in range(ids.shape[1]):
            seen = [ids[r, q] for q in range(p + 1) if mask[r, q] and seg[r, q] == seg[r, p]]
            out[r, p, 0] = prefix_code(seen)
    return out


pairs = st.lists(
    st.tuples(
        st.lists(st.integers(1, 40), min_size=1, max_size=6), st.lists(st.integers(1, 40), min_size=1, max_size=5)
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    pairs=pairs,
    layout=st.sampled_from(["paper", "right_padded", "packed"]),
    enc=st.integers(1, 7),
    extra=st.integers(0, 2),
)
def test_aligned_logit_has_seen_exactly_source_and_target_prefix(pairs, layout, enc, extra):
    sources, targets = [p[0] for p in pairs], [p[1] for p in pairs]
    dec = max(len(t) for t in targets) + extra
    if layout == "paper":
        teacher = align.paper_teacher_batch(sources, targets, align.PaperLayout(enc, dec, pad_id=PAD))
        sources = [s[:enc] for s in sources]  # truncation keeps the first encoder_len tokens
    elif layout == "right_padded":
        teacher = align.right_padded_teacher_batch(sources, targets, pad_id=PAD)
    else:
        teacher = align.packed_teacher_batch(sources, targets, row_length=11 + extra, pad_id=PAD)
    positions, valid = align.index_map(teacher, dec)
    gathered = align.gather_teacher_logits(fake_teacher_logits(teacher), positions, valid, rows=teacher.rows)
    for b, (source, target) in enumerate(zip(sources, targets, strict=True)):
        np.testing.assert_array_equal(valid[b], np.arange(dec) < len(target))
        for t in range(len(target)):
            assert gathered[b, t, 0] == prefix_code(list(source) + list(target[:t])), (b, t)


@pytest.mark.parametrize("layout", ["packed", "paper", "right_padded"])
@pytest.mark.parametrize("teacher_layout", ["mu", "llama"])
def test_real_teacher_logits_equal_each_pair_alone(layout, teacher_layout):
    """A refslm decoder-only teacher over packed / paper / right-padded rows, fed the batch's position_ids
    and segment_ids: every gathered logit equals the teacher run on that pair alone."""
    from refslm import models
    from refslm.config import tiny_decoder_only

    cfg = tiny_decoder_only(**({} if teacher_layout == "mu" else {"layout": "llama", "is_interleaved": True}))
    model = models.init(cfg, seed=4, dtype="float64")
    sources, targets = [[5, 6], [7, 8, 9], [10], [11, 12, 13]], [[20, EOS], [21], [22, 23, EOS], [24, 25]]
    if layout == "packed":
        teacher = align.packed_teacher_batch(sources, targets, row_length=9, pad_id=PAD)
        assert teacher.input_ids.shape[0] == 2  # pairs really share rows
    elif layout == "paper":
        teacher = align.paper_teacher_batch(sources, targets, align.PaperLayout(3, 4, pad_id=PAD))
    else:
        teacher = align.right_padded_teacher_batch(sources, targets, pad_id=PAD)
    logits = model.logits(teacher.input_ids, position_ids=teacher.position_ids, segment_ids=teacher.segment_ids)
    positions, valid = align.index_map(teacher, 3)
    gathered = align.gather_teacher_logits(logits, positions, valid, rows=teacher.rows)
    for b, (source, target) in enumerate(zip(sources, targets, strict=True)):
        alone = model.logits(np.array([source + target]))[0]
        for t in range(len(target)):  # target token t is predicted after the source and target[:t]
            np.testing.assert_allclose(gathered[b, t], alone[len(source) - 1 + t], rtol=0,
                                       atol=1e-12 * np.abs(alone).max())


# ---------------------------------------------------------------- vocabulary


def test_vocab_cut_to_min_is_the_public_rule_and_a_view():
    student, teacher = np.zeros((2, 3, 32128)), np.ones((2, 3, 32064))
    vmap = align.vocab_map(32128, 32064, cut_to_min=True)
    s, t = vmap.restrict(student, teacher)
    assert s.shape == t.shape == (2, 3, 32064)
    assert np.shares_memory(s, student) and np.shares_memory(t, teacher)


def test_vocab_sizes_differ_without_rule_is_an_error():
    with pytest.raises(ValueError, match=r"student vocabulary \(10\) and teacher vocabulary \(8\) differ.*cut_to_min"):
        align.vocab_map(10, 8)
    assert len(align.vocab_map(8, 8).student_ids) == 8


def test_vocab_id_pairs_and_gradient_expansion():
    vmap = align.vocab_map(4, 3, id_pairs=np.array([[3, 0], [1, 2]]))
    student = np.array([[10.0, 11.0, 12.0, 13.0]])
    teacher = np.array([[20.0, 21.0, 22.0]])
    s, t = vmap.restrict(student, teacher)
    np.testing.assert_array_equal(s, [[13.0, 11.0]])
    np.testing.assert_array_equal(t, [[20.0, 22.0]])
    np.testing.assert_array_equal(vmap.expand_student_grad(np.array([[0.5, -0.5]])), [[0.0, -0.5, 0.0, 0.5]])
    with pytest.raises(ValueError, match="student id more than once"):
        align.vocab_map(4, 3, id_pairs=np.array([[1, 0], [1, 2]]))
    with pytest.raises(ValueError, match=r"teacher ids must be in \[0, 3\)"):
        align.vocab_map(4, 3, id_pairs=np.array([[1, 3]]))
    with pytest.raises(ValueError, match="last axis must be 4"):
        vmap.restrict(np.zeros((1, 5)), teacher)


# ---------------------------------------------------------------- on-policy targets


class ScriptedStudent:
    """Stands in for an encoder-decoder model: `generate` returns fixed rows and records its arguments."""

    is_encoder_decoder = True

    def __init__(self, rows):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.calls = []

    def generate(self, input_ids, max_new_tokens, **kwargs):
        self.calls.append((input_ids.copy(), max_new_tokens, kwargs))
        return self.rows[:, :max_new_tokens]


def test_on_policy_kd_batch_eos_unk_and_sampling_settings():
    # tokenizer has 50 ids; the student's vocabulary is larger. Row 0 stops at EOS (then keeps
    # emitting EOS); row 1 never emits EOS and samples ids 50 and 57, which become UNK (= PAD = 0).
    student = ScriptedStudent([[30, EOS, EOS, EOS], [50, 31, 57, 32]])
    kd = align.kd_batch(
        student, [[5, 6, 7], [8]], align.PaperLayout(2, 4, pad_id=PAD, bos_id=BOS), eos_id=EOS, unk_id=UNK,
        tokenizer_size=50, seed=7,
    )
    (input_ids, max_new, kwargs), = student.calls
    np.testing.assert_array_equal(input_ids, [[5, 6], [8, 0]])
    assert max_new == 4
    assert kwargs == dict(greedy=False, temperature=0.9, top_k=128, top_p=None, seed=7, eos_token_id=EOS)
    np.testing.assert_array_equal(kd.labels, [[30, 2, 0, 0], [0, 31, 0, 32]])
    np.testing.assert_array_equal(kd.decoder_input_ids, [[1, 30, 2, 0], [1, 0, 31, 0]])
    np.testing.assert_array_equal(kd.teacher_input_ids, [[5, 6, 30, 2, 0, 0], [0, 8, 0, 31, 0, 32]])
    # UNK == PAD, so the replaced tokens are masked out of the teacher's attention (public behaviour)
    np.testing.assert_array_equal(kd.teacher_attention_mask, [[1, 1, 1, 1, 0, 0], [0, 1, 0, 1, 0, 1]])
    np.testing.assert_array_equal(kd.index_map, [[1, 2, 3, 4]] * 2)
    np.testing.assert_array_equal(kd.valid_mask, [[1, 1, 0, 0], [1, 1, 1, 1]])


def test_out_of_vocab_public_off_by_one():
    ids = np.array([49, 50, 51])
    np.testing.assert_array_equal(align.replace_out_of_vocab(ids, 50, 0), [49, 0, 0])
    np.testing.assert_array_equal(align.replace_out_of_vocab(ids, 50, 0, public_off_by_one=True), [49, 50, 0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(unk_id=-1), r"unk_id must be an int in \[0, 50\), got -1"),
    (dict(unk_id=50), r"unk_id must be an int in \[0, 50\), got 50"),
    (dict(eos_id=2.0), r"eos_id must be an int in \[0, 50\), got 2.0"),
    (dict(eos_id=50), r"eos_id must be an int in \[0, 50\), got 50"),
    (dict(tokenizer_size=0), "tokenizer_size must be an int >= 1, got 0"),
])
def test_on_policy_ids_name_the_argument(kwargs, message):
    settings_ = dict(eos_id=EOS, unk_id=UNK, tokenizer_size=50) | kwargs
    student = ScriptedStudent([[30, EOS, EOS, EOS]])
    error = ValueError if all(type(v) is int for v in kwargs.values()) else TypeError  # 2.0 is no int
    with pytest.raises(error, match=message):
        align.kd_batch(student, [[5, 6]], align.PaperLayout(2, 4), **settings_)
    with pytest.raises(error, match=message):
        align.sample_on_policy_targets(student, np.array([[5, 6]]), max_new_tokens=4, **settings_)
    assert student.calls == []  # refused before sampling


def test_generate_with_wrong_shape_is_an_error():
    with pytest.raises(ValueError, match="student.generate returned shape"):
        align.sample_on_policy_targets(
            ScriptedStudent([[3, 4]]), np.array([[5]]), max_new_tokens=4, eos_id=EOS, unk_id=UNK, tokenizer_size=50
        )


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "sources, targets, message",
    [
        ([[]], [[3]], r"sources\[0\]: is empty"),
        ([[3]], [[]], r"targets\[0\]: is empty"),
        ([], [], "sources: expected at least one sequence"),
        ([[3, 99]], [[3]], r"sources\[0\]: token id 99 is outside \[0, 50\)"),
        ([[3]], [[-1]], r"targets\[0\]: token id -1 is outside"),
        ([[3]], [[1.5]], "must be integers"),
        ([[3], [4]], [[5]], "sources has 2 rows but targets has 1"),
        ([[3]], [[4, 5, 6, 7]], r"targets\[0\] has 4 tokens, more than decoder_len=3"),
    ],
)
def test_bad_input_is_a_clear_error(sources, targets, message):
    with pytest.raises(ValueError, match=message):
        align.kd_batch_from_targets(
            sources, targets, align.PaperLayout(2, 3, pad_id=PAD, bos_id=BOS), vocab_size=50
        )


def test_uint64_ids_are_checked_before_the_int64_cast():
    """2**64 - 1 would wrap to -1 in int64; it is refused whether or not a vocab_size is given."""
    big = np.array([5, 2**64 - 1], np.uint64)
    with pytest.raises(ValueError, match=r"sources\[0\]: token id 18446744073709551615 is outside \[0, 2\*\*63\)"):
        align.student_batch([big], [[7]], align.PaperLayout(4, 3))
    with pytest.raises(ValueError, match=r"targets\[0\]: token id 18446744073709551615 is outside \[0, 50\)"):
        align.student_batch([[7]], [big], align.PaperLayout(4, 3), vocab_size=50)
    ok = align.student_batch([np.array([5, 2**63 - 1], np.uint64)], [[7]], align.PaperLayout(4, 3))
    np.testing.assert_array_equal(ok.encoder_input_ids, [[5, 2**63 - 1, 0, 0]])
    with pytest.raises(ValueError, match="vocab_size must be an int >= 1, got 0"):
        align.student_batch([[5]], [[7]], align.PaperLayout(4, 3), vocab_size=0)


@pytest.mark.parametrize("field, value", [("pad_id", 0.5), ("pad_id", -7), ("pad_id", True), ("bos_id", 1.7),
                                          ("bos_id", -1), ("encoder_len", 0), ("decoder_len", 2.0)])
def test_layout_ids_and_lengths_are_checked(field, value):
    low = 1 if field.endswith("_len") else 0
    error = ValueError if type(value) is int else TypeError  # 0.5, 2.0 and True are no ints
    with pytest.raises(error, match=f"{field} must be an int >= {low}, got {value!r}"):
        align.PaperLayout(**{"encoder_len": 4, "decoder_len": 3, field: value})


def test_special_ids_must_lie_inside_the_vocabulary():
    for field in ("pad_id", "bos_id"):
        layout = align.PaperLayout(2, 3, **{field: 50})
        with pytest.raises(ValueError, match=rf"{field} must be an int in \[0, 50\), got 50"):
            align.kd_batch_from_targets([[3]], [[4]], layout, vocab_size=50)
    for bad in (50, -1, 0.0):
        expected = rf"pad_id must be an int in \[0, 50\), got {bad!r}"
        error = ValueError if type(bad) is int else TypeError  # 0.0 is no int
        with pytest.raises(error, match=expected):
            align.right_padded_teacher_batch([[3]], [[4]], pad_id=bad, vocab_size=50)
        with pytest.raises(error, match=expected):
            align.packed_teacher_batch([[3]], [[4]], row_length=4, pad_id=bad, vocab_size=50)


def test_truncate_target_keeps_the_first_tokens():
    kd = align.kd_batch_from_targets(
        [[3]], [[4, 5, 6, 7]], align.PaperLayout(2, 3, pad_id=PAD, bos_id=BOS, truncate_target=True)
    )
    np.testing.assert_array_equal(kd.labels, [[4, 5, 6]])
    np.testing.assert_array_equal(kd.decoder_input_ids, [[1, 4, 5]])
    np.testing.assert_array_equal(kd.teacher_input_ids, [[0, 3, 4, 5, 6]])


def test_gather_rejects_a_mask_on_a_missing_logit():
    with pytest.raises(ValueError, match="outside"):
        align.gather_teacher_logits(np.zeros((1, 3, 2)), np.array([[1, -1]]), np.array([[True, True]]))
    with pytest.raises(ValueError, match="pass rows"):
        align.gather_teacher_logits(np.zeros((1, 3, 2)), np.zeros((2, 2), np.int64), np.ones((2, 2), bool))


def test_gather_arguments_have_their_dtypes():
    logits = np.arange(12.0).reshape(1, 3, 4)
    index, mask = np.array([[0, 2]]), np.array([[True, True]])
    gathered = align.gather_teacher_logits(logits, index, mask, rows=np.array([0]))
    np.testing.assert_array_equal(gathered, logits[:, [0, 2]])
    with pytest.raises(ValueError, match=r"index_map must be an integer array \[B, T_dec\], got float64 \(1, 2\)"):
        align.gather_teacher_logits(logits, index.astype(float), mask)
    for bad_mask in (mask.astype(int), mask.astype(float)):
        with pytest.raises(ValueError, match=r"mask must be a bool array \[B, T_dec\]"):
            align.gather_teacher_logits(logits, index, bad_mask)
    with pytest.raises(ValueError, match=r"rows must be an integer array \[B=1\], got float64 \(1,\)"):
        align.gather_teacher_logits(logits, index, mask, rows=np.array([0.7]))
    with pytest.raises(ValueError, match=r"rows must be \[B=1\] with values in \[0, 1\)"):
        align.gather_teacher_logits(logits, index, mask, rows=np.array([2**64 - 1], np.uint64))


def test_expand_student_grad_needs_the_shared_columns():
    vmap = align.vocab_map(5, 6, cut_to_min=True)
    np.testing.assert_array_equal(vmap.expand_student_grad(np.ones((2, 5))), np.ones((2, 5)))
    for shape in ((2, 1), (2, 6), ()):
        with pytest.raises(ValueError, match="grad last axis must be K=5 .*got shape " + re.escape(str(shape))):
            vmap.expand_student_grad(np.ones(shape))


def test_packed_pair_longer_than_row_is_an_error():
    with pytest.raises(ValueError, match="pair 0 has 5 tokens, more than row_length=4"):
        align.packed_teacher_batch([[3, 3, 3]], [[4, 4]], row_length=4, pad_id=PAD)


# ---------------------------------------------------------------- with real models from refslm.models


def tiny_teacher():
    from refslm import config, models

    return models.init(config.tiny_decoder_only(layout="llama"), seed=0, dtype="float64")


@pytest.mark.parametrize("layout", ["paper", "right_padded"])
def test_real_teacher_gathered_logits_equal_unpadded_prefix_runs(layout):
    teacher = tiny_teacher()
    rng = np.random.default_rng(3)
    sources = [rng.integers(3, 512, size=n) for n in (2, 5, 4)]
    targets = [rng.integers(3, 512, size=n) for n in (3, 1, 4)]
    enc, dec = 4, 5  # the second source is truncated to its first 4 tokens
    if layout == "paper":
        batch = align.paper_teacher_batch(sources, targets, align.PaperLayout(enc, dec, pad_id=PAD))
        sources = [s[:enc] for s in sources]
    else:
        batch = align.right_padded_teacher_batch(sources, targets, pad_id=PAD)
    positions, valid = align.index_map(batch, dec)
    gathered = align.gather_teacher_logits(teacher.logits(batch.input_ids), positions, valid)
    checked = 0
    for b, (source, target) in enumerate(zip(sources, targets, strict=True)):
        for t in range(len(target)):
            prefix = np.concatenate([source, target[:t]])[None, :]
            expected = teacher.logits(prefix)[0, -1]
            np.testing.assert_allclose(gathered[b, t], expected, rtol=1e-12, atol=1e-12)
            checked += 1
        np.testing.assert_array_equal(gathered[b, len(target) :], 0.0)
    assert checked == valid.sum() == 8


def test_on_policy_batch_from_a_real_student_and_teacher():
    from refslm import config, models

    student = models.init(config.tiny_encoder_decoder(), seed=1, dtype="float64")
    sources = [[5, 6, 7, 8, 9], [10, 11]]
    layout = align.PaperLayout(4, 6, pad_id=PAD, bos_id=BOS)
    settings_ = dict(eos_id=EOS, unk_id=UNK, tokenizer_size=300)
    kd = align.kd_batch(student, sources, layout, seed=11, **settings_)
    # independent expectation: call generate the documented way and post-process by hand
    raw = student.generate(
        np.array([[5, 6, 7, 8], [10, 11, 0, 0]]), 6, temperature=0.9, top_k=128, seed=11, eos_token_id=EOS
    )
    for b in range(2):
        row = list(raw[b])
        target = row[: row.index(EOS) + 1] if EOS in row else row
        target = [UNK if tok >= 300 else tok for tok in target]
        np.testing.assert_array_equal(kd.labels[b], target + [PAD] * (6 - len(target)))
        np.testing.assert_array_equal(kd.valid_mask[b], np.arange(6) < len(target))
    assert kd.labels.max() < 300 and (kd.labels[kd.valid_mask] == UNK).any()  # some ids were replaced
    again = align.kd_batch(student, sources, layout, seed=11, **settings_)
    np.testing.assert_array_equal(again.teacher_input_ids, kd.teacher_input_ids)
    # the teacher logits the index map picks are those of the unpadded [source; target[:t]] prefixes
    teacher = tiny_teacher()
    gathered = align.gather_teacher_logits(teacher.logits(kd.teacher_input_ids), kd.index_map, kd.valid_mask)
    for b, source in enumerate([[5, 6, 7, 8], [10, 11]]):
        target = kd.labels[b][kd.valid_mask[b]]
        for t in range(len(target)):
            # UNK = PAD: a replaced token is masked but keeps its position, in the batch and here
            expected = teacher.logits(np.array([[*source, *target[:t]]]))[0, -1]
            np.testing.assert_allclose(gathered[b, t], expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- `refslm align`


def run_cli(capsys, *argv):
    from refslm import cli

    status = cli.main(["align", *argv])
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err


def saved_tokenizers(tmp_path):
    pytest.importorskip("tokenizers")
    from align_tokenizers import bpe_tokenizer, wordpiece_tokenizer

    bpe_tokenizer().save(str(tmp_path / "student.json"))
    wordpiece_tokenizer().save(str(tmp_path / "teacher.json"))
    return str(tmp_path / "student.json"), str(tmp_path / "teacher.json")


def test_cli_shared_tokenizer_table(tmp_path, capsys):
    student, _ = saved_tokenizers(tmp_path)
    status, lines, _ = run_cli(
        capsys, "--tokenizer", student, "--source", "the teacher reads", "--target", "hello world",
        "--encoder-len", "5", "--decoder-len", "4",
    )
    assert status == 0
    assert "teacher position 4 + t predicts target token t" in lines[0]
    rows = [line.split("  ") for line in lines[3:]]
    cells = [[c.strip() for c in row if c.strip()] for row in rows]
    # source "▁the ▁teacher ▁reads" (3 tokens) left-padded to 5; target "▁hello ▁world" right-padded to 4
    assert [c[0] for c in cells] == ["0", "1", "2", "3"]
    assert cells[0][2].endswith("'▁hello'") and cells[0][3] == "4" and cells[0][4].endswith("'▁reads'")
    assert cells[1][2].endswith("'▁world'") and cells[1][3] == "5" and cells[1][4].endswith("'▁hello'")
    assert [c[-1] for c in cells] == ["yes", "yes", "no (padding)", "no (padding)"]


def test_cli_cross_tokenizer_table(tmp_path, capsys):
    student, teacher = saved_tokenizers(tmp_path)
    status, lines, _ = run_cli(
        capsys, "--tokenizer", student, "--teacher-tokenizer", teacher, "--source", "the teacher reads",
        "--target", "x😀y",
    )
    assert status == 0
    kinds = [line.split()[3] for line in lines[3:]]
    positions = [line.split()[-2] for line in lines[3:]]
    # teacher row: 5 source tokens ("▁the" "▁tea" "cher" "▁re" "ads"), then "▁" "x" "😀" "y"
    assert "teacher row = 5 source + 4 target tokens" in lines[0]
    assert kinds == ["1:1", "1:1", "many:1", "many:1", "many:1", "many:1", "1:1"]
    assert positions == ["4", "5", "6", "6", "6", "6", "7"]


def test_cli_bad_input_exits_2_with_a_message(tmp_path, capsys):
    student, teacher = saved_tokenizers(tmp_path)
    status, _, err = run_cli(capsys, "--tokenizer", student, "--source", "", "--target", "x")
    assert status == 2 and "sources[0]: is empty" in err
    status, _, err = run_cli(capsys, "--tokenizer", student, "--source", "a", "--target", "hello world",
                             "--decoder-len", "1")
    assert status == 2 and "more than decoder_len=1" in err
    status, _, err = run_cli(capsys, "--tokenizer", str(tmp_path / "missing.json"), "--source", "a", "--target", "b")
    assert status == 2 and "does not exist" in err
    status, _, err = run_cli(capsys, "--tokenizer", student, "--teacher-tokenizer", teacher, "--source", "a",
                             "--target", " lead")
    assert status == 2 and "decode ' lead' differently" in err


@pytest.mark.parametrize("argv, message", [
    (["--encoder-len", "0"], "encoder_len must be an int >= 1, got 0"),
    (["--decoder-len", "0"], "decoder_len must be an int >= 1, got 0"),
    (["--pad-id", "-5"], "pad_id must be an int >= 0, got -5"),
    (["--bos-id", "99999"], r"bos_id must be an int in \[0, 556\), got 99999"),
])
def test_cli_checks_lengths_and_ids(tmp_path, capsys, argv, message):
    """0 is not "use the default", and ids must exist in the tokenizer (the BPE test tokenizer has 556)."""
    student, teacher = saved_tokenizers(tmp_path)
    status, lines, err = run_cli(capsys, "--tokenizer", student, "--source", "a b", "--target", "hello", *argv)
    assert (status, lines) == (2, []) and re.search(message, err), err
    if argv[0] == "--decoder-len":
        status, _, err = run_cli(capsys, "--tokenizer", student, "--teacher-tokenizer", teacher, "--source", "a",
                                 "--target", "hello", *argv)
        assert status == 2 and message in err, err


def test_cli_paper_layout_options_are_refused_with_a_teacher_tokenizer(tmp_path, capsys):
    student, teacher = saved_tokenizers(tmp_path)
    status, _, err = run_cli(capsys, "--tokenizer", student, "--teacher-tokenizer", teacher, "--source", "a",
                             "--target", "hello", "--encoder-len", "4", "--bos-id", "1")
    assert status == 2 and "--encoder-len, --bos-id: for the shared-tokenizer (paper) layout only" in err, err


def test_cli_unreadable_tokenizer_files_exit_2_naming_the_file(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"not": "a tokenizer"}')
    status, _, err = run_cli(capsys, "--tokenizer", str(broken), "--source", "a", "--target", "b")
    assert status == 2 and f"tokenizer file {str(broken)!r} is not a valid tokenizer.json" in err, err
    status, _, err = run_cli(capsys, "--tokenizer", str(tmp_path), "--source", "a", "--target", "b")
    assert status == 2 and f"{str(tmp_path)!r} is a directory, not a tokenizer.json file" in err, err


def test_cli_target_without_tokens_exits_2(tmp_path, capsys):
    """A tokenizer that drops whitespace encodes "   " to no tokens: a clear error, not a numpy one."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    path = str(tmp_path / "words.json")
    words.save(path)
    status, _, err = run_cli(capsys, "--tokenizer", path, "--teacher-tokenizer", path, "--source", "a",
                             "--target", "   ")
    assert status == 2 and "the student tokenizer encodes '   ' to no tokens" in err, err


def test_on_policy_helpers_check_their_rows_and_student():
    with pytest.raises(ValueError, match=r"ids\[0\]: expected a 1-D sequence of token ids, got shape \(3, 2\)"):
        align.cut_after_eos(np.array([[1, 2], [3, 4], [5, 6]]), 2)
    with pytest.raises(ValueError, match=r"ids\[0\]: token id -5 is outside"):
        align.replace_out_of_vocab(np.array([3, -5]), 8, 0)
    with pytest.raises(ValueError, match=r"unk_id must be an int in \[0, 8\), got 99"):
        align.replace_out_of_vocab(np.array([3, 9]), 8, 99)
    with pytest.raises(ValueError, match="student must be an encoder-decoder model"):
        align.kd_batch(tiny_teacher(), [[5, 6]], align.PaperLayout(4, 3), eos_id=2, unk_id=3, tokenizer_size=512)


def test_truncate_target_must_be_a_bool():
    with pytest.raises(ValueError, match="truncate_target must be True or False, got 'no'"):
        align.PaperLayout(4, 3, truncate_target="no")


def test_batch_builders_name_wrong_containers():
    with pytest.raises(ValueError, match="sources: expected a sequence of token-id sequences, got NoneType"):
        align.student_batch(None, [[1]], align.PaperLayout(4, 3))
    with pytest.raises(ValueError, match="teacher must be a TeacherBatch"):
        align.index_map({}, 3)
    with pytest.raises(ValueError, match=r"layout.pad_id must be an int in \[0, 50\), got 60"):
        align.kd_batch(ScriptedStudent([[3, EOS]]), [[5, 6]], align.PaperLayout(4, 3, pad_id=60), eos_id=EOS,
                       unk_id=UNK, tokenizer_size=50)

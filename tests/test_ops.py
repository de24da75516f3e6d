"""Ops against hand-checkable float64 cases (values derived by hand in the comments)."""

import math

import numpy as np
import pytest

from refslm import ops


def test_rmsnorm_hand_case():
    # x = [3, 4]: mean(x^2) = 12.5, rms = sqrt(12.5 + eps)
    x = np.array([[3.0, 4.0]])
    w = np.array([1.0, 2.0])
    r = math.sqrt(12.5 + 1e-6)
    np.testing.assert_allclose(ops.rmsnorm(x, w, 1e-6), [[3 / r, 8 / r]], rtol=1e-15)
    np.testing.assert_allclose(ops.rmsnorm(x, w, 1e-6, unit_offset=True), [[6 / r, 12 / r]], rtol=1e-15)


def test_rmsnorm_float32_keeps_dtype():
    x = np.array([[3.0, 4.0]], dtype=np.float32)
    assert ops.rmsnorm(x, np.ones(2, np.float32), 1e-6).dtype == np.float32


def test_gelu_values():
    x = np.array([0.0, 1.0, -1.0])
    # exact GELU(1) = 0.5 (1 + erf(1/sqrt 2)) = 0.8413447460685429
    np.testing.assert_allclose(ops.gelu_erf(x), [0.0, 0.8413447460685429, -0.15865525393145707], rtol=1e-15)
    t = math.tanh(math.sqrt(2 / math.pi) * (1 + 0.044715))
    np.testing.assert_allclose(ops.gelu_tanh(x), [0.0, 0.5 * (1 + t), -0.5 * (1 - t)], rtol=1e-15)


def test_silu_and_gated():
    x = np.array([0.0, 2.0, -800.0])
    np.testing.assert_allclose(ops.silu(x), [0.0, 2 / (1 + math.exp(-2)), -0.0], atol=1e-300)
    np.testing.assert_allclose(ops.gated(np.array([2.0]), np.array([3.0]), "silu"), [6 / (1 + math.exp(-2))],
                               rtol=1e-15)


def test_softmax_and_log_softmax_extreme():
    x = np.array([[1e4, 0.0, -np.inf]])
    np.testing.assert_array_equal(ops.softmax(x), [[1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(ops.log_softmax(x)[0, :2], [0.0, -1e4])  # log(1 + e^-1e4) rounds to 0
    assert ops.log_softmax(x)[0, 2] == -np.inf


def test_linear_and_embedding():
    x = np.array([[1.0, 2.0]])
    w = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    np.testing.assert_array_equal(ops.linear(x, w, np.array([0.5, 0.0, 1.0])), [[1.5, 3.0, -1.0]])
    table = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(ops.embedding(np.array([[2, 0]]), table), [[[4.0, 5.0], [0.0, 1.0]]])
    with pytest.raises(ValueError, match=r"token ids holds token id 3 outside the vocabulary \[0, 3\)"):
        ops.embedding(np.array([[3]]), table)
    with pytest.raises(TypeError, match="must be an integer array"):
        ops.embedding(np.array([[1.0]]), table)


def test_rope_rotate_half_hand_case():
    # D = 4: inv_freq = [1, theta^-1/2] = [1, 0.01] for theta = 1e4; position 1 rotates pair (0, 2)
    # by angle 1 and pair (1, 3) by angle 0.01.
    x = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    cos, sin = ops.rope_cos_sin(np.array([[1]]), 4, 1e4)
    y = ops.apply_rope(x, cos, sin).ravel()
    a, b = 1.0, 0.01
    expected = [1 * math.cos(a) - 3 * math.sin(a), 2 * math.cos(b) - 4 * math.sin(b),
                3 * math.cos(a) + 1 * math.sin(a), 4 * math.cos(b) + 2 * math.sin(b)]
    np.testing.assert_allclose(y, expected, rtol=1e-15)


def test_rope_interleaved_hand_case():
    x = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    cos, sin = ops.rope_cos_sin(np.array([[1]]), 4, 1e4, layout="interleaved")
    y = ops.apply_rope(x, cos, sin, "interleaved").ravel()
    a, b = 1.0, 0.01
    expected = [1 * math.cos(a) - 2 * math.sin(a), 2 * math.cos(a) + 1 * math.sin(a),
                3 * math.cos(b) - 4 * math.sin(b), 4 * math.cos(b) + 3 * math.sin(b)]
    np.testing.assert_allclose(y, expected, rtol=1e-15)


def test_centred_positions_and_ntk():
    np.testing.assert_array_equal(ops.centred_positions(5), [-2, -1, 0, 1, 2])
    np.testing.assert_array_equal(ops.centred_positions(4), [-1, 0, 1, 2])
    assert ops.rope_theta_for_length(1e4, 64, 4096, 1.0, 1024) == 1e4
    assert ops.rope_theta_for_length(1e4, 64, 512, 2.0, 1024) == 1e4
    # factor 2, L = 2048, block 1024: (2*2 - 1)^(64/62)
    assert ops.rope_theta_for_length(1e4, 64, 2048, 2.0, 1024) == pytest.approx(1e4 * 3 ** (64 / 62), rel=1e-15)


def test_repeat_kv_orders():
    kv = np.arange(2.0).reshape(1, 2, 1, 1)  # kv heads [0, 1]
    assert ops.repeat_kv(kv, 2, interleaved=False).ravel().tolist() == [0, 1, 0, 1]
    assert ops.repeat_kv(kv, 2, interleaved=True).ravel().tolist() == [0, 0, 1, 1]


def test_attention_hand_case_and_masks():
    # one query, two keys with scores q.k = [0, 2 ln 3 * sqrt(D)/...]: choose D = 1, q = 1, k = [0, ln 3]
    q = np.ones((1, 1, 1, 1))
    k = np.array([0.0, math.log(3.0)]).reshape(1, 1, 2, 1)
    v = np.array([10.0, 20.0]).reshape(1, 1, 2, 1)
    # weights = softmax([0, ln 3]) = [1/4, 3/4]
    np.testing.assert_allclose(ops.attention(q, k, v).ravel(), [12.5 + 5.0], rtol=1e-15)
    masked = ops.attention(q, k, v, key_mask=np.array([[True, False]]))
    np.testing.assert_allclose(masked.ravel(), [10.0], rtol=1e-15)
    # fully masked row: finite_min gives the uniform average, -inf gives zeros
    none = np.array([[False, False]])
    np.testing.assert_allclose(ops.attention(q, k, v, key_mask=none).ravel(), [15.0], rtol=1e-15)
    np.testing.assert_array_equal(ops.attention(q, k, v, key_mask=none, mask_fill="-inf").ravel(), [0.0])


def test_attention_causal_with_offset():
    q = np.ones((1, 1, 1, 1))
    k = np.zeros((1, 1, 3, 1))
    v = np.array([1.0, 2.0, 6.0]).reshape(1, 1, 3, 1)
    # query at absolute position 1 sees keys 0 and 1 equally
    out = ops.attention(q, k, v, causal=True, q_start=1)
    np.testing.assert_allclose(out.ravel(), [1.5], rtol=1e-15)



@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("lengths,pad", [([1], 0), ([3, 5], 2), ([4, 1, 6, 2], 3), ([9], 1)])
def test_attention_segments_equal_each_sequence_alone(lengths, pad, interleaved):
    """Packed rows: with segment_ids (and causal) every token's output is that of its sequence run alone."""
    rng = np.random.default_rng(sum(lengths) * 31 + pad)
    t = sum(lengths) + pad
    q, k, v = rng.standard_normal((1, 4, t, 8)), rng.standard_normal((1, 2, t, 8)), rng.standard_normal((1, 2, t, 8))
    segment_ids = np.array([[s + 1 for s, n in enumerate(lengths) for _ in range(n)] + [0] * pad])
    packed = ops.attention(q, k, v, key_mask=segment_ids > 0, causal=True, interleaved=interleaved,
                           segment_ids=segment_ids)
    start = 0
    for n in lengths:
        span = slice(start, start + n)
        alone = ops.attention(q[:, :, span], k[:, :, span], v[:, :, span], causal=True, interleaved=interleaved)
        np.testing.assert_allclose(packed[:, :, span], alone, rtol=1e-13, atol=1e-14)
        start += n
    if len(lengths) > 1:  # the segments matter: plain causal attention sees the earlier sequences
        plain = ops.attention(q, k, v, key_mask=segment_ids > 0, causal=True, interleaved=interleaved)
        assert np.abs(plain - packed)[:, :, lengths[0]:sum(lengths)].max() > 1e-3


def test_attention_segment_ids_errors_name_the_argument():
    q = np.zeros((1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"segment_ids must be an integer array of shape \(1, 3\), got float64"):
        ops.attention(q, q, q, segment_ids=np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"segment_ids must be an integer array of shape \(1, 3\), got int64 \(1, 4\)"):
        ops.attention(q, q, q, segment_ids=np.zeros((1, 4), np.int64))
    k = np.zeros((1, 2, 4, 4))
    with pytest.raises(ValueError, match="segment_ids need self-attention"):
        ops.attention(q, k, k, q_start=2, segment_ids=np.zeros((1, 4), np.int64))


# ---------------------------------------------------------------- bad input: a clear error, never a wrong number


FLOAT_OPS = {
    "rmsnorm": lambda x: ops.rmsnorm(x, np.ones(4, x.dtype), 1e-6),
    "gelu_tanh": ops.gelu_tanh, "gelu_erf": ops.gelu_erf, "silu": ops.silu, "sigmoid": ops.sigmoid,
    "gated": lambda x: ops.gated(x, x, "silu"), "softmax": ops.softmax, "log_softmax": ops.log_softmax,
    "linear": lambda x: ops.linear(x, np.ones((2, 4), x.dtype)),
    "embedding": lambda x: ops.embedding(np.zeros((1, 1), np.int64), x),
    "apply_rope": lambda x: ops.apply_rope(x.reshape(1, 1, 1, 4)[..., :2], np.ones((1, 1, 2)), np.ones((1, 1, 2))),
    "attention": lambda x: ops.attention(*(x.reshape(1, 1, 1, 4),) * 3),
}


@pytest.mark.parametrize("dtype", [np.int64, np.float16, bool])
@pytest.mark.parametrize("op", sorted(FLOAT_OPS))
def test_float_ops_reject_other_dtypes(op, dtype):
    """int, bool and float16 input used to give silently wrong numbers (silu([1, 2]) -> [0, 0]) or float16 math."""
    x = np.arange(1, 5).reshape(1, 4).astype(dtype)
    with pytest.raises(TypeError, match=f"must be a float32 or float64 ndarray, got {np.dtype(dtype)}"):
        FLOAT_OPS[op](x)


def test_operands_must_share_one_dtype():
    x32, w64 = np.ones((2, 3), np.float32), np.ones((4, 3))
    with pytest.raises(TypeError, match=r"linear weight must have the dtype of the other operands \(float32\), "
                                        r"got float64"):
        ops.linear(x32, w64)
    with pytest.raises(TypeError, match="linear bias must have the dtype"):
        ops.linear(x32, w64.astype(np.float32), np.ones(4))
    with pytest.raises(TypeError, match="rmsnorm weight must have the dtype"):
        ops.rmsnorm(x32, np.ones(3), 1e-6)
    with pytest.raises(TypeError, match="gated up must have the dtype"):
        ops.gated(x32, np.ones((2, 3)), "silu")
    q = np.ones((1, 1, 2, 4))
    with pytest.raises(TypeError, match="attention v must have the dtype"):
        ops.attention(q, q, q.astype(np.float32))


@pytest.mark.parametrize("eps", [-1.0, 0.0, float("nan"), float("inf"), 10**400])
def test_rmsnorm_rejects_eps_outside_the_positive_finite_numbers(eps):
    """eps -1 or NaN gave NaN rows."""
    with pytest.raises(ValueError, match="rmsnorm eps must be a finite number > 0"):
        ops.rmsnorm(np.ones((2, 3)), np.ones(3), eps)
    with pytest.raises(TypeError, match="rmsnorm eps must be a real number, got str"):
        ops.rmsnorm(np.ones((2, 3)), np.ones(3), "1e-6")


@pytest.mark.parametrize("shape", [(1,), (2,), (1, 3), ()])
def test_rmsnorm_weight_must_have_shape_c(shape):
    """A weight of shape (1,) broadcast silently."""
    with pytest.raises(ValueError, match=r"rmsnorm weight must have shape \(C,\) for x \[\.\.\., C\]"):
        ops.rmsnorm(np.ones((2, 3)), np.ones(shape), 1e-6)


def test_rmsnorm_eps_type_does_not_change_the_float32_math():
    """A NumPy float64 eps (a strong scalar) used to promote the float32 normalisation to float64."""
    x = np.random.default_rng(0).standard_normal((4, 33)).astype(np.float32)
    w = np.ones(33, np.float32)
    np.testing.assert_array_equal(ops.rmsnorm(x, w, np.float64(1e-6)), ops.rmsnorm(x, w, 1e-6))


@pytest.mark.parametrize("head_dim", [7, 1, 0, -2, 8.0, True])
def test_rope_tables_need_an_even_head_dim(head_dim):
    """rope_cos_sin(positions, 7, ...) gave tables [T, 8], one column more than head_dim."""
    with pytest.raises(ValueError, match="rope needs an even head_dim >= 2"):
        ops.rope_cos_sin(np.arange(3), head_dim, 1e4)
    with pytest.raises(ValueError, match="rope needs an even head_dim >= 2"):
        ops.rope_inv_freq(head_dim, 1e4)


@pytest.mark.parametrize("name,kwargs", [
    ("theta", dict(theta=0.0)), ("theta", dict(theta=-1e4)), ("theta", dict(theta=float("nan"))),
    ("linear_factor", dict(linear_factor=0.0)), ("linear_factor", dict(linear_factor=float("inf"))),
    ("scale", dict(scale=0.0)), ("scale", dict(scale=float("nan"))),
])
def test_rope_tables_reject_non_positive_numbers(name, kwargs):
    """theta <= 0 or linear_factor 0 gave NaN tables."""
    args = dict(positions=np.arange(3), head_dim=8, theta=1e4) | kwargs
    with pytest.raises(ValueError, match=f"rope {name} must be a finite number > 0"):
        ops.rope_cos_sin(**args)


def test_rope_tables_reject_bad_positions_and_factors():
    with pytest.raises(TypeError, match="rope positions must be integers"):
        ops.rope_cos_sin(np.array([True, False]), 8, 1e4)
    with pytest.raises(ValueError, match="rope positions must be finite"):
        ops.rope_cos_sin(np.array([0.0, np.nan]), 8, 1e4)
    with pytest.raises(ValueError, match="ext_factors must be finite and > 0"):
        ops.rope_cos_sin(np.arange(3), 4, 1e4, ext_factors=np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="dynamic NTK RoPE needs head_dim > 2"):
        ops.rope_theta_for_length(1e4, 2, 4096, 2.0, 1024)
    # float positions are allowed (finite): the same tables as the integers
    np.testing.assert_array_equal(ops.rope_cos_sin(np.arange(3.0), 8, 1e4), ops.rope_cos_sin(np.arange(3), 8, 1e4))


def test_rope_layout_must_be_known():
    """apply_rope(..., layout='foo') silently used the interleaved rotation."""
    x, c = np.ones((1, 1, 2, 4)), np.ones((1, 2, 4))
    for call in (lambda: ops.apply_rope(x, c, c, "foo"), lambda: ops.rotate(x, "foo"),
                 lambda: ops.rope_cos_sin(np.arange(2), 4, 1e4, "foo")):
        with pytest.raises(ValueError, match=r"rope layout must be one of \('rotate_half', 'interleaved'\), got 'foo'"):
            call()


@pytest.mark.parametrize("x_shape,cos_shape,match", [
    ((1, 1, 2, 7), (1, 2, 7), "rope needs an even head_dim >= 2, got 7"),
    ((1, 2, 8), (1, 2, 8), r"rope x must have shape \[B, H, T, D\], got \(1, 2, 8\)"),
    ((1, 1, 2, 4), (1, 3, 4), r"rope cos/sin must have shape \[1 or 1, 2, 4\], got \(1, 3, 4\)"),
    ((2, 1, 2, 4), (3, 2, 4), r"rope cos/sin must have shape \[1 or 2, 2, 4\]"),
    ((1, 1, 2, 4), (2, 4), r"rope cos/sin must have shape"),
])
def test_apply_rope_rejects_bad_shapes(x_shape, cos_shape, match):
    with pytest.raises(ValueError, match=match):
        ops.apply_rope(np.ones(x_shape), np.ones(cos_shape), np.ones(cos_shape))


def test_shape_errors_name_the_argument():
    """These surfaced as low-level NumPy errors (reshape, broadcast, zero-size reduction)."""
    with pytest.raises(ValueError, match=r"split_heads x must have shape \[B, T, n_head\*D\] with n_head=4"):
        ops.split_heads(np.ones((1, 2, 6)), 4)
    with pytest.raises(ValueError, match="split_heads x must have shape"):
        ops.split_heads(np.ones((2, 8)), 2)
    with pytest.raises(ValueError, match="split_heads n_head must be an int >= 1"):
        ops.split_heads(np.ones((1, 2, 6)), 0)
    with pytest.raises(ValueError, match=r"merge_heads x must have shape \[B, H, T, D\]"):
        ops.merge_heads(np.ones((1, 2, 6)))
    with pytest.raises(ValueError, match="repeat_kv n_rep must be an int >= 1"):
        ops.repeat_kv(np.ones((1, 2, 3, 4)), 0, False)
    with pytest.raises(ValueError, match=r"linear needs x \[\.\.\., in >= 1\], weight \[out, in\] and bias \[out\], "
                                         r"got x \(2, 3\), weight \(4, 5\)"):
        ops.linear(np.ones((2, 3)), np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"linear needs x \[\.\.\., in >= 1\]"):  # opencl left K = 0 unwritten
        ops.linear(np.ones((2, 0)), np.ones((4, 0)))
    with pytest.raises(ValueError, match=r"linear needs .* bias \(3,\)"):
        ops.linear(np.ones((2, 3)), np.ones((4, 3)), np.ones(3))
    with pytest.raises(ValueError, match=r"gated up must have gate's shape \(2, 3\), got \(3,\)"):
        ops.gated(np.ones((2, 3)), np.ones(3), "silu")
    with pytest.raises(ValueError, match=r"embedding table must have shape \[V, C\]"):
        ops.embedding(np.zeros((1, 1), np.int64), np.ones(3))
    for fn in (ops.softmax, ops.log_softmax):
        with pytest.raises(ValueError, match=r"softmax x needs an axis in \[-2, 2\) with at least one entry"):
            fn(np.ones((2, 0)))
        with pytest.raises(ValueError, match="with at least one entry, got axis 2"):
            fn(np.ones((2, 3)), axis=2)


def _qkv(b=1, hq=2, tq=3, hkv=1, tk=3, d=4):
    rng = np.random.default_rng(b + 10 * hq + 100 * tq + 1000 * tk)
    return tuple(rng.standard_normal(shape) for shape in ((b, hq, tq, d), (b, hkv, tk, d), (b, hkv, tk, d)))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(mask_fill="zero"), ValueError, r"mask_fill must be one of \('finite_min', '-inf'\), got 'zero'"),
    (dict(q_start=-1, causal=True), ValueError, "attention q_start must be an int >= 0, got -1"),
    (dict(q_start=1.0), TypeError, r"attention q_start must be an int >= 0, got 1.0 \(float\)"),
    (dict(q_start=True), TypeError, r"attention q_start must be an int >= 0, got True \(bool\)"),
    (dict(key_mask=np.array([[0.5, 1, 1]])), TypeError, "key_mask must be a bool array .* got dtype float64"),
    (dict(key_mask=np.array([[256, 1, 1]])), ValueError, "key_mask must hold only 0 and 1"),
    (dict(key_mask=np.ones((1, 4), bool)), ValueError, r"key_mask must have shape \(1, 3\), got \(1, 4\)"),
    (dict(key_mask=np.ones(3, bool)), ValueError, r"key_mask must have shape \(1, 3\), got \(3,\)"),
])
def test_attention_rejects_bad_arguments(kwargs, error, match):
    """mask_fill 'zero' gave all NaN; key_mask 0.5 meant True here and False in numba; q_start < 0 gave NaN in numba."""
    with pytest.raises(error, match=match):
        ops.attention(*_qkv(), **kwargs)
    if "key_mask" in kwargs:
        with pytest.raises(error, match=match):
            ops.attention_mask(kwargs["key_mask"], False, 1, 3, 3)


@pytest.mark.parametrize("shapes,match", [
    (dict(hq=3, hkv=2), r"k/v head count must divide q's \(query heads a multiple of key/value heads >= 1\), "
                        r"got Hq 3, Hkv 2"),
    (dict(hkv=0), "got Hq 2, Hkv 0"),
    (dict(tk=0), r"attention needs at least one key \(Tk >= 1\)"),
])
def test_attention_rejects_bad_head_and_key_counts(shapes, match):
    """Hq % Hkv != 0 gave 'cannot reshape array'; Tk = 0 'zero-size array to reduction operation maximum'."""
    with pytest.raises(ValueError, match=match):
        ops.attention(*_qkv(**shapes))


def test_attention_rejects_mismatched_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"attention k and v must both have shape \[B, Hkv, Tk, D\] with q's B = 1 and "
                                         r"D = 4, got k \(1, 1, 3, 5\)"):
        ops.attention(q, np.ones((1, 1, 3, 5)), np.ones((1, 1, 3, 5)))
    with pytest.raises(ValueError, match="with q's B = 1"):
        ops.attention(q, np.ones((2, 1, 3, 4)), np.ones((2, 1, 3, 4)))
    with pytest.raises(ValueError, match="got k \\(1, 1, 3, 4\\), v \\(1, 1, 2, 4\\)"):
        ops.attention(q, k, v[:, :, :2])
    with pytest.raises(ValueError, match=r"attention k must have shape \[B, H, T, D\], got \(1, 3, 4\)"):
        ops.attention(q, k[0], v)
    with pytest.raises(TypeError, match="attention q must be a float32 or float64 ndarray, got int64"):
        ops.attention(q.astype(np.int64), k, v)


def test_attention_integer_key_mask_is_the_bool_mask():
    q, k, v = _qkv(b=2, tk=5, tq=2)
    ints = np.array([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]])
    for dtype in (np.int64, np.uint8, np.int8):
        np.testing.assert_array_equal(ops.attention(q, k, v, key_mask=ints.astype(dtype)),
                                      ops.attention(q, k, v, key_mask=ints.astype(bool)))


def test_attention_q_start_past_the_keys_sees_every_key():
    """A causal query at position >= Tk - 1 sees every key: q_start 2**40 (which overflowed an int32 in opencl)
    gives the non-causal result, as q_start = Tk does."""
    q, k, v = _qkv(tq=2, tk=4)
    plain = ops.attention(q, k, v)
    for q_start in (3, 4, 2**40, np.int64(2**62), 2**80):
        np.testing.assert_array_equal(ops.attention(q, k, v, causal=True, q_start=q_start), plain)
    assert ops.check_q_start(2**80, 4) == 4


def test_attention_mask_checks_segment_ids_like_attention():
    with pytest.raises(ValueError, match=r"segment_ids need self-attention .* q_start 3 \+ Tq 2 > Tk 4"):
        ops.attention_mask(None, True, 1, 2, 4, 3, np.array([[1, 1, 2, 2]]))
    with pytest.raises(ValueError, match=r"segment_ids must be an integer array of shape \(1, 4\)"):
        ops.attention_mask(None, True, 1, 2, 4, 0, np.array([[1.0, 1, 2, 2]]))


def test_split_and_merge_heads_need_float_arrays():
    with pytest.raises(TypeError, match="split_heads x must be a float32 or float64 ndarray, got int64"):
        ops.split_heads(np.ones((1, 2, 4), np.int64), 2)
    with pytest.raises(TypeError, match="merge_heads x must be a float32 or float64 ndarray, got int64"):
        ops.merge_heads(np.ones((1, 2, 2, 2), np.int64))


def test_rope_length_helpers_name_bad_lengths():
    with pytest.raises(ValueError, match="NTK block_size must be an int >= 1, got 0"):
        ops.rope_theta_for_length(1e4, 8, 10, 2.0, 0)
    with pytest.raises(ValueError, match="longrope original_max_position must be an int >= 2, got 1"):
        ops.longrope_attention_factor(4.0, 1)
    with pytest.raises(ValueError, match="centred_positions length must be an int >= 0, got -3"):
        ops.centred_positions(-3)

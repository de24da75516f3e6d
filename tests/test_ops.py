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

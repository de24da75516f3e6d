"""Losses: hand cases, infinite cases, properties, finite differences, forms, bad input (NumPy only)."""

import math
import re
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refslm import losses
from refslm.backends import available_backends, get_backend
from refslm.bench import peak_extra_bytes

SETTINGS = settings(deadline=None, max_examples=25, derandomize=True)
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl")
REDUCTIONS = ("none", "sum", "mean", "batchmean")
INF = np.inf
EPS32 = float(np.finfo(np.float32).eps)


def logits(seed, shape, scale=3.0, dtype=np.float64):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(dtype)


def rows(kind, s, t=None, y=None, w=None, T=1.0, beta=0.3, eps=0.0):
    """loss_rows with defaults: -> (values, grad)."""
    w = np.ones(s.shape[0]) if w is None else w
    return losses.loss_rows(kind, s, t, y, w, temperature=T, beta=beta, label_smoothing=eps)


def spy_on_loss_rows(monkeypatch, name):
    """-> list that gets the kind of every later call of backend `name`'s loss_rows.

    get_backend caches one instance per name and the public losses resolve backend= through it, so
    wrapping that instance's method sees every kernel call they make with backend=name.
    """
    backend = get_backend(name)
    assert backend.name == name  # the registry resolved the name to that backend's class
    kinds = []
    original = backend.loss_rows

    def loss_rows(kind, *args, **kwargs):
        kinds.append(kind)
        return original(kind, *args, **kwargs)

    monkeypatch.setattr(backend, "loss_rows", loss_rows)
    return kinds


def any_loss(name, student, teacher, targets, **options):
    """Call a divergence, cross_entropy or kd_loss by name with its natural inputs."""
    if name == "cross_entropy":
        return losses.cross_entropy(student, targets, **options)
    if name == "kd_loss":
        return losses.kd_loss(student, teacher, targets, **options)
    return losses.divergence(name, student, teacher, **options)


# ---------------------------------------------------------------- hand cases


def test_cross_entropy_hand_case():
    # logits [0, 0]: q = [1/2, 1/2]; target 0: -log(1/2) = log 2; grad = q - onehot = [-1/2, 1/2]
    v, g = rows("cross_entropy", np.zeros((1, 2)), y=np.array([0]))
    np.testing.assert_allclose(v, [math.log(2)], rtol=1e-15)
    np.testing.assert_allclose(g, [[-0.5, 0.5]], rtol=1e-15)
    # label smoothing 0.2 on 2 classes: w = [0.9, 0.1]; value = -(0.9 + 0.1) log(1/2) = log 2; grad q - w
    v, g = rows("cross_entropy", np.zeros((1, 2)), y=np.array([0]), eps=0.2)
    np.testing.assert_allclose(v, [math.log(2)], rtol=1e-15)
    np.testing.assert_allclose(g, [[-0.4, 0.4]], rtol=1e-15)


def test_kl_hand_cases():
    # teacher logits log[1, 3] -> p = [1/4, 3/4]; student zeros -> q = [1/2, 1/2]
    s, t = np.zeros((1, 2)), np.log([[1.0, 3.0]])
    fkl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    v, g = rows("forward_kl", s, t)
    np.testing.assert_allclose(v, [fkl], rtol=1e-14)
    np.testing.assert_allclose(g, [[0.25, -0.25]], rtol=1e-14)  # q - p
    rkl = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    v, g = rows("reverse_kl", s, t)
    np.testing.assert_allclose(v, [rkl], rtol=1e-14)
    # q_j (log(q_j / p_j) - KL)
    np.testing.assert_allclose(g, [[0.5 * (math.log(2) - rkl), 0.5 * (math.log(2 / 3) - rkl)]], rtol=1e-14)
    # JSD beta 1/2: m = [3/8, 5/8]
    jsd = 0.5 * (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)) + \
        0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625))
    np.testing.assert_allclose(rows("jsd", s, t, beta=0.5)[0], [jsd], rtol=1e-14)
    # skew KL alpha 0.1: r = 0.1 p + 0.9 q = [0.475, 0.525]
    skew = 0.25 * math.log(0.25 / 0.475) + 0.75 * math.log(0.75 / 0.525)
    np.testing.assert_allclose(rows("skew_kl", s, t, beta=0.1)[0], [skew], rtol=1e-14)
    # skew reverse KL alpha 0.1: r = 0.9 p + 0.1 q = [0.275, 0.725]
    skew_r = 0.5 * math.log(0.5 / 0.275) + 0.5 * math.log(0.5 / 0.725)
    np.testing.assert_allclose(rows("skew_reverse_kl", s, t, beta=0.1)[0], [skew_r], rtol=1e-14)


def test_temperature_hand_case():
    # T = 2: z = [0, 0], u = log[1, 3] / 2 -> p ∝ [1, sqrt 3]; grad = (q - p) / T
    s, t = np.zeros((1, 2)), np.log([[1.0, 3.0]])
    p = np.array([1.0, math.sqrt(3.0)]) / (1.0 + math.sqrt(3.0))
    v, g = rows("forward_kl", s, t, T=2.0)
    np.testing.assert_allclose(v, [np.sum(p * np.log(p / 0.5))], rtol=1e-14)
    np.testing.assert_allclose(g, [(0.5 - p) / 2.0], rtol=1e-14)


# ---------------------------------------------------------------- infinite and extreme logits


def test_teacher_banned_entries_contribute_zero_to_forward_kl():
    # teacher -inf at column 2 (p_2 = 0): value and gradient equal the 2-column problem except q_2 in grad
    s, t = np.array([[0.5, -1.0, 2.0]]), np.array([[1.0, 0.0, -INF]])
    v, g = rows("forward_kl", s, t)
    p = np.exp(t[0, :2]) / np.exp(t[0, :2]).sum()
    q = np.exp(s[0]) / np.exp(s[0]).sum()
    np.testing.assert_allclose(v, [np.sum(p * (np.log(p) - np.log(q[:2])))], rtol=1e-14)
    np.testing.assert_allclose(g[0], q - np.append(p, 0.0), rtol=1e-14)


def test_infinite_values_and_their_gradients():
    s, t = np.array([[0.0, -INF, 1.0]]), np.array([[0.0, 1.0, -INF]])
    q = np.array([1.0, 0.0, math.e]) / (1.0 + math.e)
    p = np.array([1.0, math.e, 0.0]) / (1.0 + math.e)
    # forward KL: teacher mass where the student is -inf -> +inf, gradient (q - p) finite
    v, g = rows("forward_kl", s, t)
    assert v[0] == INF
    np.testing.assert_allclose(g[0], q - p, rtol=1e-14)
    # reverse KL: student mass where the teacher is -inf -> +inf, gradient undefined (NaN)
    v, g = rows("reverse_kl", s, t)
    assert v[0] == INF and np.isnan(g).all()
    # cross-entropy on a banned target -> +inf, gradient q - onehot finite
    v, g = rows("cross_entropy", s, y=np.array([1]))
    assert v[0] == INF
    np.testing.assert_allclose(g[0], q - [0, 1, 0], rtol=1e-14)
    # mixtures with 0 < beta are finite and have finite gradients
    for kind in ("jsd", "skew_kl", "skew_reverse_kl"):
        v, g = rows(kind, s, t, beta=0.3)
        assert np.isfinite(v).all() and np.isfinite(g).all(), kind


def test_underflowing_student_mass_still_counts_as_mass():
    # student logit -1e4 on the teacher's banned entry: q > 0 mathematically, KL(q || p) = +inf
    v, _ = rows("reverse_kl", np.array([[0.0, -1e4]]), np.array([[0.0, -INF]]))
    assert v[0] == INF


def test_both_banned_equals_column_removed():
    s, t = logits(1, (3, 6)), logits(2, (3, 6))
    s[:, 4], t[:, 4] = -INF, -INF
    keep = [0, 1, 2, 3, 5]
    for kind in DIVERGENCES:
        v, g = rows(kind, s, t)
        v2, g2 = rows(kind, s[:, keep], t[:, keep])
        np.testing.assert_allclose(v, v2, rtol=1e-13, err_msg=kind)
        np.testing.assert_allclose(g[:, keep], g2, rtol=1e-12, atol=1e-15, err_msg=kind)
        assert (g[:, 4] == 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_logits(dtype):
    """Logits +-1e4 give the exact KL 1e4 and one-hot gradients, in both dtypes.

    s = [1e4, 0, -1e4], t = [0, 1e4, -1e4]: the exps below the row max underflow to 0 in float32
    too, so the log normalisers are log(1) = 0 and every log-probability (0, -1e4, -2e4) is exact;
    p = onehot(1) and log q_1 = -1e4 give forward KL 1 * (0 - (-1e4)) = 1e4 with no rounding.
    """
    s = np.array([[1e4, 0.0, -1e4]], dtype=dtype)
    t = np.array([[0.0, 1e4, -1e4]], dtype=dtype)
    v, g = rows("forward_kl", s, t)
    np.testing.assert_array_equal(v, [1e4])
    np.testing.assert_array_equal(g, np.array([[1.0, -1.0, 0.0]], dtype=dtype))
    v, g = rows("reverse_kl", s, t)  # q = onehot(0), log p_0 = -1e4
    np.testing.assert_array_equal(v, [1e4])
    for kind in DIVERGENCES + ("cross_entropy",):
        v, g = rows(kind, s, t, y=np.array([2]))
        assert np.isfinite(v).all() and np.isfinite(g).all() and g.dtype == dtype, kind


def test_dropped_rows_are_not_evaluated():
    s = np.array([[np.nan, 1.0], [0.0, 0.0]])
    v, g = rows("cross_entropy", s, y=np.array([-100, 1]), w=np.array([0.0, 1.0]))
    np.testing.assert_array_equal(v, [0.0, math.log(2)])
    np.testing.assert_array_equal(g, [[0.0, 0.0], [0.5, -0.5]])


@pytest.mark.parametrize("bad", [np.nan, INF])
def test_nan_or_positive_inf_logits_are_rejected(bad):
    s = np.array([[0.0, bad]])
    with pytest.raises(ValueError, match="student logits row 0"):
        rows("forward_kl", s, np.zeros((1, 2)))
    with pytest.raises(ValueError, match="teacher logits row 0"):
        losses.forward_kl(np.zeros((1, 2)), s, chunk_size=(1, 1))
    with pytest.raises(ValueError, match="student logits row 0"):
        rows("reverse_kl", np.full((1, 2), -INF), np.zeros((1, 2)))


# ---------------------------------------------------------------- properties

seeds = st.integers(0, 2**31 - 1)
shapes = st.tuples(st.integers(1, 5), st.integers(1, 9))
betas = st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])


@SETTINGS
@given(seeds, shapes, st.sampled_from(DIVERGENCES), betas, st.sampled_from([0.5, 1.0, 2.0]))
def test_divergences_nonnegative_and_zero_exactly_on_equal_distributions(seed, shape, kind, beta, T):
    s, t = logits(seed, shape), logits(seed + 1, shape)
    v, _ = rows(kind, s, t, beta=beta, T=T)
    assert (v >= -1e-14).all()
    v_same, g_same = rows(kind, s, s.copy(), beta=beta, T=T)
    if kind in ("forward_kl", "reverse_kl") or beta in (0.0, 1.0) and kind == "jsd":
        assert (v_same == 0).all()
    np.testing.assert_allclose(v_same, 0, atol=1e-15)
    np.testing.assert_allclose(g_same, 0, atol=1e-14)  # a few ulps of q / T (sum p = 1 only to rounding)
    mixture_trivial = kind in ("skew_kl", "skew_reverse_kl") and beta == 1.0
    if shape[1] > 1 and not mixture_trivial:  # different distributions: strictly positive
        assert (v > 0).all()


@SETTINGS
@given(seeds, shapes, st.sampled_from(DIVERGENCES + ("cross_entropy",)), betas,
       st.floats(-50, 50), st.floats(-50, 50))
def test_invariant_to_row_constants_and_gradient_rows_sum_to_zero(seed, shape, kind, beta, c_s, c_t):
    s, t = logits(seed, shape), logits(seed + 1, shape)
    y = np.random.default_rng(seed).integers(0, shape[1], shape[0])
    v, g = rows(kind, s, t, y, beta=beta, eps=0.1)
    v2, g2 = rows(kind, s + c_s, t + c_t, y, beta=beta, eps=0.1)
    np.testing.assert_allclose(v2, v, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g2, g, rtol=1e-10, atol=1e-13)
    rounding = 8 * np.finfo(float).eps * shape[1] * (1 + np.abs(g).max() + np.abs(v).max())
    assert (np.abs(g.sum(axis=-1)) <= rounding).all()


@SETTINGS
@given(seeds, shapes, st.sampled_from([0.1, 1.0, 10.0]))
def test_jsd_half_bounded_by_log_2(seed, shape, scale):
    v, _ = rows("jsd", logits(seed, shape, scale), logits(seed + 1, shape, scale), beta=0.5)
    assert (v <= math.log(2)).all()


def test_jsd_reaches_log_2_on_disjoint_support():
    v, _ = rows("jsd", np.array([[0.0, -INF]]), np.array([[-INF, 0.0]]), beta=0.5)
    np.testing.assert_allclose(v, [math.log(2)], rtol=1e-15)


@SETTINGS
@given(seeds, st.sampled_from(DIVERGENCES), st.sampled_from([0.25, 0.5, 3.0]), st.booleans())
def test_temperature_identities(seed, kind, T, t2):
    s, t = logits(seed, (3, 7)), logits(seed + 1, (3, 7))
    v, g = losses.divergence(kind, s, t, beta=0.3, temperature=T, scale_by_t2=t2)
    v1, g1 = losses.divergence(kind, s / T, t / T, beta=0.3)
    factor = T * T if t2 else 1.0
    np.testing.assert_allclose(v, factor * v1, rtol=1e-13)
    np.testing.assert_allclose(g, factor * g1 / T, rtol=1e-12, atol=1e-16)


@SETTINGS
@given(seeds, st.sampled_from(DIVERGENCES), st.sampled_from(REDUCTIONS[1:]))
def test_masking_equals_dropping_rows(seed, kind, reduction):
    s, t = logits(seed, (2, 5, 6)), logits(seed + 1, (2, 5, 6))
    mask = np.random.default_rng(seed).random((2, 5)) < 0.6
    v, g = losses.divergence(kind, s, t, beta=0.3, mask=mask, reduction=reduction)
    v_kept, g_kept = losses.divergence(kind, s[mask], t[mask], beta=0.3, reduction="sum")
    kept = max(int(mask.sum()), 1)
    divide = 1 if reduction == "sum" else kept  # masked mean and batchmean: sum / kept tokens
    np.testing.assert_allclose(v, v_kept / divide, rtol=1e-13)
    np.testing.assert_allclose(g[mask], g_kept / divide, rtol=1e-13)
    assert (g[~mask] == 0).all()


def test_reductions_and_zero_kept_tokens():
    s, t = logits(3, (2, 3, 5)), logits(4, (2, 3, 5))
    per_token, _ = losses.forward_kl(s, t, reduction="none")
    assert per_token.shape == (2, 3)
    total, _ = losses.forward_kl(s, t, reduction="sum")
    np.testing.assert_allclose(total, per_token.sum(), rtol=1e-14)
    np.testing.assert_allclose(losses.forward_kl(s, t, reduction="mean")[0], total / 6, rtol=1e-14)
    np.testing.assert_allclose(losses.forward_kl(s, t)[0], total / 2, rtol=1e-14)  # PyTorch: / size(0) = B
    np.testing.assert_allclose(losses.forward_kl(s.reshape(6, 5), t.reshape(6, 5))[0], total / 6, rtol=1e-14)
    for reduction in REDUCTIONS:
        v, g = losses.reverse_kl(s, t, mask=np.zeros((2, 3), bool), reduction=reduction)
        assert np.all(v == 0) and np.all(g == 0)
        v, g = losses.cross_entropy(s, np.full((2, 3), -100), reduction=reduction)
        assert np.all(v == 0) and np.all(g == 0)


def test_labels_with_ignore_index_equal_mask():
    s, t = logits(5, (2, 4, 6)), logits(6, (2, 4, 6))
    labels = np.array([[1, -100, 3, 4], [-100, -100, 0, 2]])
    a = losses.generalized_jsd(s, t, labels=labels)
    b = losses.generalized_jsd(s, t, mask=labels != -100)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@SETTINGS
@given(seeds, st.sampled_from(DIVERGENCES), st.sampled_from(["paper", "public_code"]))
def test_alpha_0_and_1_reduce_to_ce_and_kd(seed, kind, mode):
    s, t = logits(seed, (2, 4, 7)), logits(seed + 1, (2, 4, 7))
    y = np.random.default_rng(seed).integers(0, 7, (2, 4))
    kind = kind if mode == "paper" else None
    v0, g0 = losses.kd_loss(s, t, y, alpha=0.0, divergence=kind, mode=mode)
    ce, g_ce = losses.cross_entropy(s, y, ignore_index=0)
    np.testing.assert_array_equal(v0, ce)
    np.testing.assert_array_equal(g0, g_ce)
    v1, g1 = losses.kd_loss(s, t, y, alpha=1.0, divergence=kind, mode=mode, beta=0.3)
    if mode == "paper":
        kd, g_kd = losses.divergence(kind, s, t, beta=0.3, labels=y, ignore_index=0)
    else:
        kd, g_kd = losses.forward_kl(s.reshape(8, 7), t.reshape(8, 7))
    np.testing.assert_allclose(v1, kd, rtol=1e-15)
    np.testing.assert_allclose(g1.reshape(g_kd.shape), g_kd, rtol=1e-15)
    v, g = losses.kd_loss(s, t, y, alpha=0.25, divergence=kind, mode=mode, beta=0.3)
    np.testing.assert_allclose(v, 0.25 * kd + 0.75 * ce, rtol=1e-14)
    np.testing.assert_allclose(g.reshape(g_kd.shape), 0.25 * g_kd + 0.75 * g_ce.reshape(g_kd.shape), rtol=1e-13,
                               atol=1e-17)


def test_public_code_mode_cuts_vocabularies_and_ignores_padding_for_kd():
    s, t = logits(7, (2, 3, 9)), logits(8, (2, 3, 7))
    y = np.array([[5, 0, 0], [1, 2, 0]])
    v, g = losses.kd_loss(s, t, y, mode="public_code")
    kd, g_kd = losses.forward_kl(s[..., :7].reshape(6, 7), t.reshape(6, 7))  # all 6 rows, padding included
    ce, g_ce = losses.cross_entropy(s, y, ignore_index=0)  # full student vocabulary
    np.testing.assert_allclose(v, 0.9 * kd + 0.1 * ce, rtol=1e-14)
    expected = 0.1 * g_ce
    expected[..., :7] += 0.9 * g_kd.reshape(2, 3, 7)
    np.testing.assert_allclose(g, expected, rtol=1e-13, atol=1e-17)


# ---------------------------------------------------------------- finite differences (float64)


def directional_check(fn, x, seed):
    """fn(x) -> (value, grad); the central difference along a random direction matches <grad, d>."""
    d = np.random.default_rng(seed).normal(size=x.shape)
    value, grad = fn(x)
    h = 1e-5
    numeric = (np.sum(fn(x + h * d)[0]) - np.sum(fn(x - h * d)[0])) / (2 * h)
    analytic = np.sum(grad * d)
    assert abs(numeric - analytic) <= 1e-6 * max(abs(analytic), 1e-3), (numeric, analytic)


@SETTINGS
@given(seeds, st.sampled_from(DIVERGENCES + ("cross_entropy", "kd_loss")), st.sampled_from(REDUCTIONS),
       st.sampled_from([0.1, 0.5, 0.9]), st.sampled_from([0.7, 1.0, 2.0]))
def test_finite_differences(seed, name, reduction, beta, T):
    s, t = logits(seed, (2, 3, 6)), logits(seed + 1, (2, 3, 6))
    y = np.random.default_rng(seed).integers(0, 6, (2, 3))
    if name == "cross_entropy":
        options = {"label_smoothing": beta, "reduction": reduction}
    elif name == "kd_loss":
        options = {"alpha": beta, "temperature": T, "scale_by_t2": True, "label_smoothing": 0.1}
    else:
        options = {"beta": beta, "temperature": T, "labels": y, "ignore_index": 0, "reduction": reduction}
    directional_check(lambda x: any_loss(name, x, t, y, **options), s, seed)


@pytest.mark.parametrize("kind", DIVERGENCES + ("cross_entropy",))
def test_every_coordinate_finite_difference(kind):
    # all partial derivatives of a weighted row sum, one coordinate at a time
    s, t, y = logits(11, (2, 5)), logits(12, (2, 5)), np.array([3, 0])
    w = np.array([0.7, 1.3])

    def total(x):
        return np.dot(w, rows(kind, x, t, y, w=np.ones(2), beta=0.4, T=1.5, eps=0.2)[0])

    _, g = rows(kind, s, t, y, w=w, beta=0.4, T=1.5, eps=0.2)
    h = 1e-5
    for i, j in np.ndindex(s.shape):
        e = np.zeros_like(s)
        e[i, j] = h
        numeric = (total(s + e) - total(s - e)) / (2 * h)
        assert abs(numeric - g[i, j]) <= 1e-6 * max(abs(g[i, j]), 1e-3), (kind, i, j)


# ---------------------------------------------------------------- direct == streaming == fused


@SETTINGS
@given(seeds, st.sampled_from(DIVERGENCES + ("cross_entropy", "kd_loss")), st.integers(1, 7), st.integers(1, 13),
       st.integers(1, 6), st.integers(1, 14), st.sampled_from(REDUCTIONS))
def test_direct_streaming_fused_agree(seed, name, n, vocab, chunk_rows, chunk_vocab, reduction):
    rng = np.random.default_rng(seed)
    hidden, lm_head = rng.normal(size=(n, 4)), rng.normal(size=(vocab, 4))
    s, t = hidden @ lm_head.T, logits(seed + 1, (n, vocab + 2))
    y = rng.integers(0, vocab, n)
    if name == "kd_loss":
        options = {"vocab_policy": "truncate", "beta": 0.4, "temperature": 1.5}
    elif name == "cross_entropy":
        options = {"reduction": reduction, "label_smoothing": 0.1}
    else:
        options = {"vocab_policy": "truncate", "beta": 0.4, "mask": rng.random(n) < 0.7, "reduction": reduction}
    v, g = any_loss(name, s, t, y, **options)
    buffer = np.full_like(s, np.nan)
    v_stream, g_stream = any_loss(name, s, t, y, chunk_size=(chunk_rows, chunk_vocab), grad_out=buffer, **options)
    assert g_stream is buffer
    np.testing.assert_allclose(v_stream, v, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(g_stream, g, rtol=1e-12, atol=1e-15)
    v_fused, (g_hidden, g_head) = any_loss(name, losses.LinearHead(hidden, lm_head, chunk_rows), t, y, **options)
    np.testing.assert_allclose(v_fused, v, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(g_hidden, g @ lm_head, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g_head, g.T @ hidden, rtol=1e-12, atol=1e-14)


def test_loss_rows_streaming_equals_direct_float32():
    """Streaming equals direct float32 loss_rows to a few float32 ulps of the values' scale.

    Not bit-identical by construction (these inputs happen to be): the online logsumexp takes exps
    against earlier running maxima and rescales, and the sums go chunk by chunk, so the float32 log
    normalisers can differ by an ulp. Over 9000 random inputs of this shape the differences reached
    2.6 eps (1 + |v|) for values and 1.2 eps of the gradient terms' scale w / T (1 + |v|).
    """
    temperature = 1.3
    s, t = logits(21, (9, 50), dtype=np.float32), logits(22, (9, 50), dtype=np.float32)
    w = np.linspace(0.0, 1.0, 9)
    kept = w != 0
    for kind in DIVERGENCES:
        v, g = rows(kind, s, t, w=w, T=temperature)
        v2, g2 = losses.loss_rows_streaming(kind, s, t, None, w, temperature=temperature, beta=0.3,
                                            label_smoothing=0.0, chunk_rows=4, chunk_vocab=7)
        assert g2.dtype == np.float32
        assert np.all(v2[~kept] == 0) and np.all(g2[~kept] == 0)
        np.testing.assert_allclose(v2, v, rtol=8 * EPS32, atol=8 * EPS32, err_msg=kind)
        # grad[i] = w_i / T (a - q sum a): a difference of terms up to about w_i / T (1 + |v_i|)
        scale = (w / temperature * (1 + np.abs(v)))[kept, None]
        np.testing.assert_allclose(g2[kept] / scale, g[kept] / scale, rtol=0, atol=4 * EPS32, err_msg=kind)


def test_fused_linear_loss_wrapper_and_3d_hidden():
    rng = np.random.default_rng(31)
    hidden, head = rng.normal(size=(2, 3, 4)), rng.normal(size=(6, 4))
    y = rng.integers(1, 6, (2, 3))
    v, gh, gw = losses.fused_linear_loss(hidden, head, y, loss="cross_entropy", chunk_rows=2)
    v2, g = losses.cross_entropy(hidden @ head.T, y)
    np.testing.assert_allclose(v, v2, rtol=1e-14)
    np.testing.assert_allclose(gh, g @ head, rtol=1e-13)
    np.testing.assert_allclose(gw, np.einsum("btv,btc->vc", g, hidden), rtol=1e-13)


def test_streaming_temporaries_stay_within_a_chunk():
    n, vocab = 64, 2048
    s, t = logits(41, (n, vocab)), logits(42, (n, vocab))
    grad = np.empty_like(s)
    direct = peak_extra_bytes(lambda: losses.reverse_kl(s, t, grad_out=grad))
    streaming = peak_extra_bytes(lambda: losses.reverse_kl(s, t, grad_out=grad, chunk_size=(16, 128)))
    chunk_bytes = 16 * 128 * 8
    assert direct > n * vocab * 8  # whole-row temporaries
    assert streaming < 16 * chunk_bytes  # a few chunk temporaries, never a row block of the full vocabulary


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, message", [
    (lambda s, t, y: losses.forward_kl(s, t[:1]), "leading shape"),
    (lambda s, t, y: losses.forward_kl(s, t[..., :4]), "vocab_policy='truncate'"),
    (lambda s, t, y: losses.forward_kl(s, t.astype(np.float32)),
     r"teacher logits must have student's leading shape \(2, 3\) and dtype float64, got \(2, 3, 5\) float32"),
    (lambda s, t, y: losses.forward_kl(s, t, vocab_policy="pad"), "vocab_policy"),
    (lambda s, t, y: losses.kd_loss(s, t, y, alpha=1.5), "alpha must lie in"),
    (lambda s, t, y: losses.kd_loss(s, t, y, alpha=-0.1), "alpha must lie in"),
    (lambda s, t, y: losses.generalized_jsd(s, t, beta=1.01), "beta must lie in"),
    (lambda s, t, y: losses.skew_kl(s, t, alpha=-0.5), "alpha must lie in"),
    (lambda s, t, y: losses.reverse_kl(s, t, temperature=0.0), "temperature must be a finite number > 0, got 0.0"),
    (lambda s, t, y: losses.kd_loss(s, t, y, temperature=-1.0), "temperature must be a finite number > 0, got -1.0"),
    (lambda s, t, y: losses.cross_entropy(s, y + 5), r"targets must lie in \[0, 5\)"),
    (lambda s, t, y: losses.cross_entropy(s, y - 1, ignore_index=-100), r"targets must lie in \[0, 5\)"),
    (lambda s, t, y: losses.cross_entropy(s, y[:, :1]), "targets must be an integer array of shape"),
    (lambda s, t, y: losses.cross_entropy(s, y.astype(float)), "targets must be an integer array"),
    (lambda s, t, y: losses.cross_entropy(s, y, label_smoothing=2.0), "label_smoothing"),
    (lambda s, t, y: losses.forward_kl(s, t, mask=np.ones((2, 3))), "mask must be a bool array"),
    (lambda s, t, y: losses.forward_kl(s, t, mask=np.ones((2, 3), bool), labels=y), "mask or labels"),
    (lambda s, t, y: losses.forward_kl(s, t, reduction="avg"), "reduction must be one of"),
    (lambda s, t, y: losses.forward_kl(s, t, chunk_size=(0, 4)), "chunk_size"),
    (lambda s, t, y: losses.forward_kl(s, t, chunk_size=8), "chunk_size"),
    (lambda s, t, y: losses.forward_kl(s, t, grad_out=np.empty((2, 3, 4))), "grad_out"),
    (lambda s, t, y: losses.kd_loss(s, t, y, mode="public_code", divergence="reverse_kl"), "public_code"),
    (lambda s, t, y: losses.kd_loss(s, t, y, mode="code"), "mode must be"),
    (lambda s, t, y: losses.kd_loss(s, t, y, divergence="kl"), "divergence must be one of"),
    (lambda s, t, y: losses.divergence("cross_entropy", s, t), "divergence kind"),
    (lambda s, t, y: losses.forward_kl(s[0, 0], t[0, 0]), r"\[N, V\] or \[B, T, V\]"),
    (lambda s, t, y: losses.fused_linear_loss(s, t, y, loss="ce"), "loss must be one of"),
    (lambda s, t, y: losses.fused_linear_loss(s, t[0, :, :4], y, loss="cross_entropy"), "same C"),
    (lambda s, t, y: losses.forward_kl(s, t, temperature=np.inf), "temperature must be a finite number > 0, got inf"),
    (lambda s, t, y: losses.forward_kl(s, t, temperature=1e300, scale_by_t2=True),
     r"temperature\*\*2 \(scale_by_t2\) overflows float64"),
    (lambda s, t, y: losses.cross_entropy(s, np.array([[1, 2, 3], [4, 0, 2**64 - 100]], np.uint64)),
     "targets holds 18446744073709551516, beyond int64"),
    (lambda s, t, y: losses.kd_loss(s, t, np.array([[1, 2, 3], [4, -5, 7]]), alpha=1.0),
     r"targets that are not ignore_index must lie in \[0, 5\), got values in \[-5, 7\]"),
    (lambda s, t, y: losses.kd_loss(s, t, y, alpha=0.5, grad_out=s), "grad_out must not overlap student or teacher"),
    (lambda s, t, y: losses.reverse_kl(s, t, grad_out=t), "grad_out must not overlap student or teacher"),
    (lambda s, t, y: losses.fused_linear_loss(s[0], t[0], y[0] % 3, loss="cross_entropy", chunk_rows=2.5),
     "chunk_rows must be an int >= 1, got 2.5"),
    (lambda s, t, y: losses.cross_entropy(s, y, ignore_index=2**70),
     r"ignore_index must be an int in \[-9223372036854775808, 9223372036854775808\), got 1180591620717411303424"),
    (lambda s, t, y: losses.kd_loss(s, t, y, ignore_index=np.uint64(2**64 - 1)),
     r"ignore_index must be an int in \[.*got np.uint64\(18446744073709551615\)"),
])
def test_bad_input_is_a_clear_error(call, message):
    s, t = logits(51, (2, 3, 5)), logits(52, (2, 3, 5))
    y = np.array([[1, 2, 3], [4, 0, 1]])
    with pytest.raises(ValueError, match=message):
        call(s, t, y)


@pytest.mark.parametrize("call, message", [
    (lambda s, t, y: losses.forward_kl(s, t, temperature="2"), "temperature must be a real number, got str '2'"),
    (lambda s, t, y: losses.generalized_jsd(s, t, beta="0.5"), "beta must be a real number, got str"),
    (lambda s, t, y: losses.kd_loss(s, t, y, alpha=None), "alpha must be a real number, got NoneType"),
    (lambda s, t, y: losses.cross_entropy(s, y, label_smoothing=True), "label_smoothing must be a real number"),
    (lambda s, t, y: losses.forward_kl(s, t, labels=y, ignore_index=np.array([1, 2])),
     r"ignore_index must be an int in \[.*\), got array\(\[1, 2\]\) \(ndarray\)"),
    (lambda s, t, y: losses.cross_entropy(s, y, ignore_index=0.0),
     r"ignore_index must be an int in \[.*\), got 0.0 \(float\)"),
    (lambda s, t, y: losses.forward_kl(s, t, temperature=2.0, scale_by_t2="no"),
     r"scale_by_t2 must be True or False, got 'no' \(str\)"),
    (lambda s, t, y: losses.forward_kl(s, t, chunk_size=(2.7, 4)),
     r"chunk_size\[0\] \(chunk_rows\) must be an int >= 1, got 2.7 \(float\)"),
    (lambda s, t, y: losses.skew_kl(s, t, beta=0.3), r"skew_kl takes no beta \(its weight is alpha\), got beta=0.3"),
    (lambda s, t, y: losses.skew_reverse_kl(s, t, beta=0.3), "skew_reverse_kl takes no beta"),
])
def test_wrongly_typed_settings_are_a_type_error(call, message):
    s, t = logits(51, (2, 3, 5)), logits(52, (2, 3, 5))
    y = np.array([[1, 2, 3], [4, 0, 1]])
    with pytest.raises(TypeError, match=message):
        call(s, t, y)


def test_plain_kls_refuse_a_beta_and_rows_refuse_bad_weights():
    s, t = logits(55, (2, 3, 5)), logits(56, (2, 3, 5))
    for fn in (losses.forward_kl, losses.reverse_kl):
        with pytest.raises(TypeError, match=f"{fn.__name__} takes no beta"):
            fn(s, t, beta=0.7)
    for weight in ([np.nan, 1, 1], [np.inf, 1, 1], [-1, 1, 1]):
        with pytest.raises(ValueError, match="row_weight must hold finite numbers >= 0"):
            rows("forward_kl", s[0], t[0], w=np.array(weight, float))


def test_numpy_scalar_settings_are_accepted():
    s, t = logits(53, (2, 3, 5)), logits(54, (2, 3, 5))
    expected = losses.generalized_jsd(s, t, beta=0.25, temperature=2.0)
    got = losses.generalized_jsd(s, t, beta=np.float32(0.25), temperature=np.float64(2.0))
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1])


def test_integer_logits_are_rejected():
    with pytest.raises(TypeError, match="student must be a float32 or float64 ndarray, got int64"):
        losses.cross_entropy(np.zeros((2, 3), np.int64), np.array([0, 1]))
    with pytest.raises(TypeError, match="teacher must be a float32 or float64"):
        losses.reverse_kl(np.zeros((2, 3)), np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="kind must be one of"):
        rows("kl", np.zeros((1, 2)), np.zeros((1, 2)))


def test_backend_argument_uses_the_named_kernel(monkeypatch):
    """backend="numpy" (also the default) runs the numpy backend's loss_rows; an unknown name is an error."""
    s, t = logits(61, (3, 4)), logits(62, (3, 4))
    calls = spy_on_loss_rows(monkeypatch, "numpy")
    value, grad = losses.reverse_kl(s, t, backend="numpy")
    assert calls == ["reverse_kl"]
    default_value, default_grad = losses.reverse_kl(s, t)
    assert calls == ["reverse_kl", "reverse_kl"]
    np.testing.assert_array_equal(value, default_value)
    np.testing.assert_array_equal(grad, default_grad)
    with pytest.raises(ValueError, match="backend must be one of"):
        losses.reverse_kl(s, t, backend="cuda")


@pytest.mark.parametrize("name", ["numba", "opencl"])
def test_other_backends_run_their_kernel_and_agree_with_the_reference_float32(name, monkeypatch):
    """kd_loss(backend=name) runs name's loss_rows (opencl: launches device kernels) on float32 logits.

    The result matches the float64 reference on the same float32 inputs to a few float32 eps:
    values 4 eps relative (measured over 100 inputs like these: numba 4e-16, opencl 1.1 eps);
    gradients 16 eps of the largest entry (numba 0.8 eps, opencl 10 eps: its kernel computes in
    float32, and reverse-KL entries are differences of terms about (1 + KL) times larger).
    """
    if name not in available_backends():
        pytest.skip(f"backend {name} not available")
    backend = get_backend(name)
    s, t = logits(71, (2, 5, 300), dtype=np.float32), logits(72, (2, 5, 290), dtype=np.float32)
    y = np.random.default_rng(73).integers(0, 300, (2, 5))
    calls = spy_on_loss_rows(monkeypatch, name)
    for divergence in ("reverse_kl", "jsd"):
        options = dict(divergence=divergence, vocab_policy="truncate", temperature=1.5)
        want_value, want_grad = losses.kd_loss(s.astype(np.float64), t.astype(np.float64), y, **options)
        launches = getattr(backend, "launches", 0)
        value, grad = losses.kd_loss(s, t, y, **options, backend=name)
        assert calls == [divergence, "cross_entropy"]  # KD term, then CE term (10 rows: one block)
        calls.clear()
        if name == "opencl":
            assert backend.launches > launches
        assert grad.dtype == np.float32
        np.testing.assert_allclose(value, want_value, rtol=4 * EPS32, atol=0)
        np.testing.assert_allclose(grad, want_grad, rtol=0, atol=16 * EPS32 * np.abs(want_grad).max())


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_kd_loss_is_the_weighted_sum_of_its_terms_across_accumulate_blocks(backend, monkeypatch):
    """More rows than one accumulation block: the CE term added block by block must equal the sum."""
    if backend not in available_backends():
        pytest.skip(f"{backend} backend not available")
    rng = np.random.default_rng(11)
    n, vocab, alpha = 2 * losses.ACCUMULATE_ROWS + 37, 40, 0.3
    student, teacher = rng.standard_normal((2, n, vocab))
    targets = rng.integers(1, vocab, n)
    targets[::7] = 0  # ignored (pad) rows
    calls = spy_on_loss_rows(monkeypatch, backend)
    value, grad = losses.kd_loss(student, teacher, targets, alpha=alpha, backend=backend)
    # the KD term on all rows at once, then the CE term once per block of ACCUMULATE_ROWS rows (3 blocks)
    assert calls == ["reverse_kl"] + ["cross_entropy"] * 3
    kd, g_kd = losses.reverse_kl(student, teacher, labels=targets, ignore_index=0, reduction="batchmean")
    ce, g_ce = losses.cross_entropy(student, targets, ignore_index=0)
    np.testing.assert_allclose(value, alpha * kd + (1 - alpha) * ce, rtol=1e-13)
    np.testing.assert_allclose(grad, alpha * g_kd + (1 - alpha) * g_ce, rtol=1e-12, atol=1e-16)


def test_kd_loss_extra_memory_is_one_block_not_a_second_gradient():
    """numba's row kernels hold no [N, V] temporaries, so what is left to see is the CE term's buffer."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(12)
    n, vocab = 4 * losses.ACCUMULATE_ROWS, 2000
    student, teacher = rng.standard_normal((2, n, vocab)).astype(np.float32)
    targets = rng.integers(1, vocab, n)
    grad = np.empty_like(student)
    def run():
        return losses.kd_loss(student, teacher, targets, grad_out=grad, backend="numba")

    run()  # JIT compilation (Python objects, traced) stays outside the measurement
    peak = peak_extra_bytes(run)
    assert peak <= 2 * losses.ACCUMULATE_ROWS * vocab * student.itemsize  # not a second [N, V] gradient


def test_grad_out_must_be_c_contiguous():
    s, t = logits(57, (4, 6)), logits(58, (4, 6))
    strided = np.empty((6, 4)).T  # the right shape and dtype, Fortran order
    with pytest.raises(ValueError, match=r"grad_out must be a C-contiguous ndarray of shape \(4, 6\)"):
        losses.reverse_kl(s, t, grad_out=strided)


LAYOUTS = {  # a [B, T, V] = [2, 3, 5] student in memory orders other than C
    "seq-first": lambda x: np.ascontiguousarray(x.transpose(1, 0, 2)).transpose(1, 0, 2),
    "fortran": np.asfortranarray,
    "reversed vocab": lambda x: np.ascontiguousarray(x[..., ::-1])[..., ::-1],
    "sliced": lambda x: np.concatenate([x, x], axis=-1)[..., :5],
}


@pytest.mark.parametrize("backend", ["numpy", "numba", "opencl"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_any_student_layout_gives_the_gradient_of_its_contiguous_copy(backend, layout):
    """The gradient is a C-contiguous array whatever the student's layout, with the values of the contiguous
    student's (before: an uninitialised array when reshaping the gradient to [N, V] had to copy)."""
    if backend not in available_backends():
        pytest.skip(f"{backend} not available")
    dtype = np.float32 if backend == "opencl" else np.float64
    s, t = logits(61, (2, 3, 5), dtype=dtype), logits(62, (2, 3, 5), dtype=dtype)
    targets = np.array([[1, 2, 0], [4, 3, 2]])
    strided = LAYOUTS[layout](s)
    assert not strided.flags.c_contiguous and np.array_equal(strided, s)
    calls = [lambda x, **o: losses.reverse_kl(x, t, **o), lambda x, **o: losses.cross_entropy(x, targets, **o),
             lambda x, **o: losses.kd_loss(x, t, targets, **o)]
    forms = [{}] + ([{"chunk_size": (2, 3)}] if backend == "numpy" else [])
    for call in calls:
        for form in forms:
            value, grad = call(strided, backend=backend, **form)
            want_value, want_grad = call(s, backend=backend, **form)
            assert grad.flags.c_contiguous and grad.shape == s.shape
            np.testing.assert_array_equal(grad, want_grad)
            assert value == want_value


@pytest.mark.parametrize("backend", ["numpy", "numba", "opencl"])
def test_cross_entropy_ignores_a_teacher_on_every_backend(backend):
    """loss_rows('cross_entropy', ...) reads targets, not the teacher: given one, every backend returns what it
    returns without (numba once checked its never-computed teacher logsumexp, uninitialised memory)."""
    if backend not in available_backends():
        pytest.skip(f"{backend} not available")
    be = get_backend(backend)
    s, t = logits(63, (64, 7), dtype=np.float32), logits(64, (64, 7), dtype=np.float32)
    targets, weight = np.arange(64) % 7, np.ones(64)
    options = dict(temperature=1.0, beta=0.0, label_smoothing=0.1)
    for _ in range(3):  # fresh, uninitialised scratch each call
        with_teacher = be.loss_rows("cross_entropy", be.asarray(s), be.asarray(t), targets, weight, **options)
        without = be.loss_rows("cross_entropy", be.asarray(s), None, targets, weight, **options)
        np.testing.assert_array_equal(with_teacher[0], without[0])
        np.testing.assert_array_equal(be.to_numpy(with_teacher[1]), be.to_numpy(without[1]))


def backend_rows(backend, kind, s, t=None, y=None, beta=0.5):
    """A backend's loss_rows on host float arrays -> host (values, grad)."""
    be = get_backend(backend)
    v, g = be.loss_rows(kind, be.asarray(s), None if t is None else be.asarray(t), y, np.ones(s.shape[0]),
                        temperature=1.0, beta=beta, label_smoothing=0.0)
    return v, be.to_numpy(g)


@pytest.mark.parametrize("backend", ["numpy", "numba", "opencl"])
@pytest.mark.parametrize("kind", DIVERGENCES + ("cross_entropy",))
def test_float32_logits_near_1e4_keep_float32_accuracy(backend, kind):
    """SPEC 6.3: log q = (z - shift) - log_total keeps float32 accuracy at logits ~1e4, where
    z - (shift + log_total) would round shift + log_total to an ulp of 1e4 (~1e-3; opencl once lost
    3 digits so). Reference: float64 on the same float32 inputs; bound 64 eps32 normwise (the float32
    log-probabilities, |log q| <= ~10, each carry a few ulps)."""
    if backend not in available_backends():
        pytest.skip(f"{backend} not available")
    rng = np.random.default_rng(65)
    s, t = (1e4 + 3 * rng.standard_normal((4, 64))).astype(np.float32), (1e4 + 3 * rng.standard_normal((4, 64)))
    t = t.astype(np.float32)
    y = np.array([0, 5, 17, 63]) if kind == "cross_entropy" else None
    teacher = None if kind == "cross_entropy" else t
    want_v, want_g = backend_rows("numpy", kind, s.astype(np.float64), None if teacher is None else t.astype(float), y)
    v, g = backend_rows(backend, kind, s, teacher, y)
    assert np.abs(v - want_v).max() <= 64 * EPS32 * np.abs(want_v).max()
    assert np.abs(g - want_g).max() <= 64 * EPS32 * np.abs(want_g).max()


@pytest.mark.parametrize("backend", ["numpy", "numba", "opencl"])
@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("jsd", 1.0), ("skew_reverse_kl", 0.0)])
def test_infinite_reverse_kl_rows_have_an_all_nan_gradient_on_every_backend(backend, kind, beta):
    """Student mass where the teacher has -inf: value +inf and the whole gradient row NaN (SPEC 6.3), on every
    backend alike (opencl once returned a -inf / NaN mix); the other rows are unaffected."""
    if backend not in available_backends():
        pytest.skip(f"{backend} not available")
    s = np.array([[1.0, 2.0, -INF, 0.5], [0.1, 0.2, 0.3, 0.4]], np.float32)
    t = np.array([[0.3, -INF, -INF, 1.0], [0.3, 0.1, 0.0, 1.0]], np.float32)
    v, g = backend_rows(backend, kind, s, t, beta=beta)
    want_v, want_g = backend_rows("numpy", kind, s.astype(np.float64), t.astype(np.float64), beta=beta)
    assert v[0] == INF and np.isnan(g[0]).all()
    np.testing.assert_allclose(v[1], want_v[1], rtol=16 * EPS32)
    np.testing.assert_allclose(g[1], want_g[1], rtol=16 * EPS32, atol=16 * EPS32 * np.abs(want_g[1]).max())


@pytest.mark.parametrize("bad", [np.nan, -INF, INF])
@pytest.mark.parametrize("form", [{}, {"chunk_size": (2, 3)}])
def test_dropped_rows_may_hold_anything_without_a_warning(bad, form):
    """SPEC 6.3: rows the loss drops may hold anything; the NumPy forms then stay silent (a -W error test suite
    once failed on 'invalid value encountered in subtract') and give those rows value 0 and gradient 0."""
    s, t = logits(66, (3, 5)), logits(67, (3, 5))
    s[1], t[1] = bad, bad
    keep = np.array([True, False, True])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kind in DIVERGENCES:
            value, grad = losses.divergence(kind, s, t, mask=keep, reduction="none", **form)
            assert value[1] == 0 and (grad[1] == 0).all() and np.isfinite(value).all(), kind
        for divergence in ("reverse_kl", "jsd"):
            value, grad = losses.kd_loss(s, t, np.array([1, 0, 2]), divergence=divergence, **form)
            assert np.isfinite(value) and (grad[1] == 0).all()
        value, grad = losses.cross_entropy(s, np.array([1, -100, 2]), **form)
        assert np.isfinite(value) and (grad[1] == 0).all()


@pytest.mark.parametrize("backend", ["numpy", "numba", "opencl"])
@pytest.mark.parametrize("dtype,refused,accepted", [
    (np.float32, (1e-300, 1e-40, 3.5e38, 1e300), (1e-30, 3.4e38)),
    (np.float64, (1e-310, 5e-324), (1e-300, 1e300)),
])
def test_a_temperature_outside_the_dtypes_normal_range_is_named(backend, dtype, refused, accepted):
    """The logits are divided by T in their dtype: a T that is subnormal, 0 or inf there is refused by every
    backend alike, naming the temperature and without a warning (1e-300 in float32: numpy and opencl once blamed
    the logits after dividing by 0, numba computed a value; 1e39 in float32 became inf with an overflow warning)."""
    if backend not in available_backends() or np.dtype(dtype).name not in get_backend(backend).dtypes:
        pytest.skip(f"{backend} not available in {np.dtype(dtype).name}")
    s = logits(68, (3, 5), dtype=dtype)

    def kd(temperature):
        return losses.kd_loss(s, s[::-1].copy(), np.array([1, 2, 3]), temperature=temperature, backend=backend)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for temperature in refused:
            with pytest.raises(ValueError, match=re.escape(f"temperature {temperature} is outside the normal range ")
                               + rf"\[.*\] of {np.dtype(dtype).name}"):
                kd(temperature)
        for temperature in accepted:
            assert np.isfinite(kd(temperature)[0])


@pytest.mark.parametrize("backend", ["numpy", "numba", "opencl"])
@pytest.mark.parametrize("kind", ["cross_entropy", "reverse_kl"])
def test_loss_rows_returns_a_c_contiguous_gradient_for_any_student_layout(backend, kind):
    """loss_rows' own gradient (grad_out not given) is a new C-contiguous array whatever the student's layout, equal
    to the contiguous student's (numpy and numba once returned a Fortran-ordered one for a Fortran student)."""
    if backend not in available_backends():
        pytest.skip(f"{backend} not available")
    be = get_backend(backend)
    s, t = logits(69, (4, 6), dtype=np.float32), logits(70, (4, 6), dtype=np.float32)
    options = dict(temperature=2.0, beta=0.0, label_smoothing=0.1)
    y, w = np.array([0, 5, 2, 3]), np.array([1.0, 0.5, 0.0, 2.0])
    teacher = None if kind == "cross_entropy" else be.asarray(t)
    _, want = be.loss_rows(kind, be.asarray(s), teacher, y, w, **options)
    for strided in (np.asfortranarray(s), np.ascontiguousarray(s.T).T):
        _, grad = be.loss_rows(kind, be.asarray(strided), teacher, y, w, **options)
        grad = be.to_numpy(grad)
        assert grad.flags.c_contiguous
        np.testing.assert_array_equal(grad, be.to_numpy(want))
    if backend == "numpy":
        _, grad = losses.loss_rows_streaming(kind, np.asfortranarray(s), None if teacher is None else t, y, w,
                                             chunk_rows=3, chunk_vocab=4, **options)
        assert grad.flags.c_contiguous


def unk_batch():
    """A paper-layout KD batch whose second target token is 0 (an id >= tokenizer_size replaced by UNK = PAD = 0):
    labels [3, 0, 4, 0, 0], valid_mask [T, T, T, F, F]; student and teacher logits [1, 5, 6]."""
    from refslm.align import PaperLayout, gather_teacher_logits, kd_batch_from_targets

    batch = kd_batch_from_targets([[5, 6, 7]], [[3, 0, 4]], PaperLayout(encoder_len=4, decoder_len=5))
    assert batch.labels.tolist() == [[3, 0, 4, 0, 0]] and batch.valid_mask.tolist() == [[True] * 3 + [False] * 2]
    teacher = gather_teacher_logits(logits(72, (1, 9, 6)), batch.index_map, batch.valid_mask)
    return batch, logits(71, (1, 5, 6)), teacher


@pytest.mark.parametrize("backend,form", [("numpy", {}), ("numpy", {"chunk_size": (2, 4)}), ("numba", {}),
                                          ("opencl", {})])  # streaming (chunk_size) is the NumPy form only
def test_kd_loss_mask_supervises_the_valid_positions_of_a_kd_batch(backend, form):
    """SPEC 7: with UNK = PAD = 0 a replaced token is a valid, supervised position (valid_mask True, label 0).
    kd_loss(mask=batch.valid_mask) keeps exactly the valid positions in both terms: alpha times the divergence
    masked by valid_mask plus (1 - alpha) times the CE of the labels with the invalid ones ignored; the default
    ignore_index = 0 drops the UNK position too."""
    if backend not in available_backends():
        pytest.skip(f"{backend} not available")
    batch, s, t = unk_batch()
    dtype = np.float32 if backend == "opencl" else np.float64
    s, t = s.astype(dtype), t.astype(dtype)
    options = dict(alpha=0.7, divergence="jsd", beta=0.4, temperature=2.0, scale_by_t2=True, backend=backend, **form)
    value, grad = losses.kd_loss(s, t, batch.labels, mask=batch.valid_mask, **options)
    kd, kd_grad = losses.generalized_jsd(s, t, beta=0.4, mask=batch.valid_mask, temperature=2.0, scale_by_t2=True)
    ce, ce_grad = losses.cross_entropy(s, np.where(batch.valid_mask, batch.labels, -100))
    rtol = 16 * EPS32 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(value, 0.7 * kd + 0.3 * ce, rtol=rtol)
    want = 0.7 * kd_grad + 0.3 * ce_grad
    np.testing.assert_allclose(grad, want, rtol=rtol, atol=rtol * np.abs(want).max())
    assert (grad[0, 3:] == 0).all() and (grad[0, 1] != 0).all()
    _, by_labels = losses.kd_loss(s, t, batch.labels, **options)  # ignore_index 0: the UNK position is dropped
    assert (by_labels[0, 1] == 0).all()


def test_kd_loss_mask_rules():
    """mask: a bool array of the tokens' shape; the targets it keeps must lie in [0, V) (a UNK label 0 does);
    mode='public_code' (no mask in the public code) refuses it; the fused form takes it like the direct one."""
    batch, s, t = unk_batch()
    with pytest.raises(ValueError, match=r"mask must be a bool array of shape \(1, 5\)"):
        losses.kd_loss(s, t, batch.labels, mask=batch.valid_mask.astype(int))
    labels = np.where(batch.valid_mask, batch.labels, -100)
    labels[0, 2] = 6
    with pytest.raises(ValueError, match=r"targets where mask is True must lie in \[0, 6\), got values in \[0, 6\]"):
        losses.kd_loss(s, t, labels, mask=batch.valid_mask)
    with pytest.raises(ValueError, match="mode='public_code' .* leave divergence, temperature, scale_by_t2, mask"):
        losses.kd_loss(s, t, batch.labels, mask=batch.valid_mask, mode="public_code")
    hidden, head = logits(73, (1, 5, 4)), logits(74, (6, 4))
    value, grad_hidden, _ = losses.fused_linear_loss(hidden, head, t, batch.labels, mask=batch.valid_mask, chunk_rows=2)
    want, want_grad = losses.kd_loss(hidden @ head.T, t, batch.labels, mask=batch.valid_mask)
    np.testing.assert_allclose(value, want, rtol=1e-12)
    np.testing.assert_allclose(grad_hidden, want_grad @ head, rtol=1e-12, atol=1e-15)

"""The numba backend computes what the NumPy reference computes (refslm.ops, refslm.losses).

Expectations come from the NumPy reference (an independent, readable implementation) and from
hand-derived special cases. Tolerances:
- float64: 1e-12 relative (both sides are exact to a few ulp; only summation order differs).
- float32: both sides round in float32, so each result may differ by the rounding of its longest
  chain: attention scores are D-term dot products, |error| <= D u sum|q k| (u = 2^-24, D <= 80,
  |q|,|k| <= 1 here) ~ 5e-6, moving the softmax weights by as much relatively, so outputs (convex
  combinations of |v| <= 1) agree to 2e-5; elementwise ops agree to 4 ulp (2.4e-7 relative, the
  reference rounds 2-3 intermediates that the numba kernels keep in float64).
- losses, both dtypes: the expectation is the float64 reference on the same (dtype-rounded) inputs;
  the float32 reference is no yardstick (its gradients are off by up to ~2e-6 of their scale).
  numba's loss kernels do the element math in float64 (numba_losses), so values agree to 1e-12
  and gradient entries to their one final rounding (float32: one eps relative, twice the
  round-to-nearest bound) plus 1e-12 of the terms each entry is a difference of.
"""

import sys

import numpy as np
import pytest

pytest.importorskip("numba")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from refslm import backends, losses, ops  # noqa: E402
from refslm.backends import BackendUnavailable, get_backend, numba_backend  # noqa: E402

NB = get_backend("numba")
DTYPES = [np.float64, np.float32]
SETTINGS = settings(deadline=None, max_examples=40, derandomize=True)


def _rng(seed):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- the vectorisable exp


def _elementwise(fn):
    """A jitted loop out[i] = fn(x[i]) for a numba-callable scalar fn."""
    from numba import njit

    @njit
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = fn(x[i])

    return apply


def test_fexp_accuracy_and_special_values():
    from refslm.backends.numba_math import fexp

    apply = _elementwise(fexp)
    rng = _rng(0)
    x = np.concatenate([rng.uniform(-745, 709.78, 20000), rng.uniform(-3, 3, 20000)])
    got = np.empty_like(x)
    apply(x, got)
    normal = np.exp(x) > np.finfo(np.float64).tiny
    np.testing.assert_allclose(got[normal], np.exp(x[normal]), rtol=2.3e-16, atol=0)  # within 1 ulp
    np.testing.assert_allclose(got[~normal], np.exp(x[~normal]), rtol=0, atol=5e-324)  # subnormal: 1 ulp
    special = np.array([-np.inf, np.inf, np.nan, 0.0, 709.79, -746.0])
    got = np.empty_like(special)
    apply(special, got)
    np.testing.assert_array_equal(got, [0.0, np.inf, np.nan, 1.0, np.inf, 0.0])
    x32 = rng.uniform(-103, 88, 20000).astype(np.float32)
    got32 = np.empty_like(x32)
    apply(x32, got32)
    correctly_rounded = np.exp(x32.astype(np.float64)).astype(np.float32)
    ulps = np.abs(got32.view(np.int32).astype(np.int64) - correctly_rounded.view(np.int32))
    assert ulps.max() <= 1


def test_exp_f32_accuracy_and_special_values():
    """exp_f32 (float32 arithmetic, used for attention weights) within 1.2 ulp of the exact exp."""
    from refslm.backends.numba_math import exp_f32

    apply = _elementwise(exp_f32)
    rng = _rng(1)
    edges = [88.72, 88.5, -87.5, -90.0, -103.5]  # largest finite results, subnormal results
    x = np.concatenate([rng.uniform(-87.3, 88.72, 200000), rng.uniform(-20, 0, 200000), edges]).astype(np.float32)
    got = np.empty_like(x)
    apply(x, got)
    exact = np.exp(x.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got - exact) / ulp) <= 1.2
    special = np.array([-np.inf, np.inf, np.nan, 0.0, 88.73, -200.0], np.float32)
    got = np.empty_like(special)
    apply(special, got)
    np.testing.assert_array_equal(got, [0.0, np.inf, np.nan, 1.0, np.inf, 0.0])


# ---------------------------------------------------------------- attention


@SETTINGS
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 2), n_kv=st.integers(1, 3), n_rep=st.sampled_from([1, 2]),
       tq=st.integers(1, 150), extra_keys=st.integers(0, 90), d=st.sampled_from([1, 7, 16, 64, 80]),
       causal=st.booleans(), interleaved=st.booleans(), fill=st.sampled_from(["finite_min", "-inf"]),
       masked=st.booleans(), cross=st.booleans(), rows_kernel=st.booleans(), segmented=st.booleans(),
       dtype=st.sampled_from(DTYPES))
def test_attention_matches_reference(seed, batch, n_kv, n_rep, tq, extra_keys, d, causal, interleaved, fill,
                                     masked, cross, rows_kernel, segmented, dtype):
    rng = _rng(seed)
    tk = tq + extra_keys
    q = rng.uniform(-1, 1, (batch, n_kv * n_rep, tq, d)).astype(dtype)
    k, v = (rng.uniform(-1, 1, (batch, n_kv, tk, d)).astype(dtype) for _ in range(2))
    key_mask = None
    if masked:
        key_mask = rng.random((batch, tk)) < 0.6
        key_mask[0, : tk // 3] = False  # early queries of batch row 0 see no key when causal
        if batch > 1:
            key_mask[1] = False  # fully masked rows: uniform average (finite_min) or zeros (-inf)
    q_start = 0 if cross or not causal else tk - tq
    # segment ids in {0, 1, 2}, not contiguous: the definition is equality, whatever the layout
    segment_ids = rng.integers(0, 3, (batch, tk)) if segmented and not cross else None
    kwargs = dict(key_mask=key_mask, causal=causal and not cross, q_start=q_start, interleaved=interleaved,
                  mask_fill=fill, segment_ids=segment_ids)
    # rows_kernel: every query count through the decode kernel, else only Tq < 8 (blocked kernel otherwise)
    saved = numba_backend.ROWS_KERNEL_MAX_QUERIES
    numba_backend.ROWS_KERNEL_MAX_QUERIES = 1 << 30 if rows_kernel else saved
    try:
        got = NB.attention(q, k, v, **kwargs)
    finally:
        numba_backend.ROWS_KERNEL_MAX_QUERIES = saved
    want = ops.attention(q, k, v, **kwargs)
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == np.float64:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_attention_fully_masked_rows_hand_case():
    # One query, keys all masked: finite_min -> mean of the values, -inf -> zeros.
    q = np.ones((1, 1, 1, 2))
    k = np.ones((1, 1, 3, 2))
    v = np.array([[[[1.0, 2.0], [3.0, 4.0], [8.0, 0.0]]]])
    mask = np.zeros((1, 3), bool)
    uniform = NB.attention(q, k, v, key_mask=mask, causal=False, q_start=0, interleaved=False, mask_fill="finite_min")
    np.testing.assert_array_equal(uniform, [[[[4.0, 2.0]]]])
    zeros = NB.attention(q, k, v, key_mask=mask, causal=False, q_start=0, interleaved=False, mask_fill="-inf")
    np.testing.assert_array_equal(zeros, np.zeros((1, 1, 1, 2)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_decode_step_over_cache_views(dtype):
    # Decode: one new query at position t over a KV cache held in a longer buffer (time_slice views).
    rng = _rng(3)
    t, t_max = 70, 96
    cache_k, cache_v = (NB.empty((2, 3, t_max, 64), dtype) for _ in range(2))
    k_new, v_new = (rng.uniform(-1, 1, (2, 3, t, 64)).astype(dtype) for _ in range(2))
    NB.write_time(cache_k, k_new, 0)
    NB.write_time(cache_v, v_new, 0)
    q = rng.uniform(-1, 1, (2, 6, 1, 64)).astype(dtype)
    k, v = NB.time_slice(cache_k, 0, t), NB.time_slice(cache_v, 0, t)
    kwargs = dict(key_mask=None, causal=True, q_start=t - 1, interleaved=True, mask_fill="finite_min")
    got = NB.attention(q, k, v, **kwargs)
    want = ops.attention(q, k_new, v_new, **kwargs)
    np.testing.assert_allclose(got, want, rtol=1e-12 if dtype == np.float64 else 0,
                               atol=1e-13 if dtype == np.float64 else 2e-5)


def test_attention_rejects_bad_shapes():
    q = np.zeros((1, 3, 4, 8))
    with pytest.raises(ValueError, match="head count must divide"):
        NB.attention(q, np.zeros((1, 2, 4, 8)), np.zeros((1, 2, 4, 8)), key_mask=None, causal=False, q_start=0,
                     interleaved=False, mask_fill="-inf")
    with pytest.raises(ValueError, match="key_mask must have shape"):
        NB.attention(q, q, q, key_mask=np.ones((1, 5), bool), causal=False, q_start=0, interleaved=False,
                     mask_fill="-inf")
    with pytest.raises(ValueError, match="mask_fill"):
        NB.attention(q, q, q, key_mask=None, causal=False, q_start=0, interleaved=False, mask_fill="zero")


# ---------------------------------------------------------------- elementwise


def _assert_close(got, want, dtype, rel32=2.4e-7):
    assert got.dtype == want.dtype
    if dtype == np.float64:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    else:
        np.testing.assert_allclose(got, want, rtol=rel32, atol=1e-30)


@SETTINGS
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 9), width=st.integers(1, 300), unit_offset=st.booleans(),
       dtype=st.sampled_from(DTYPES))
def test_rmsnorm_matches_reference(seed, rows, width, unit_offset, dtype):
    rng = _rng(seed)
    x = (rng.standard_normal((2, rows, width)) * 10).astype(dtype)
    w = rng.standard_normal(width).astype(dtype)
    _assert_close(NB.rmsnorm(x, w, 1e-6, unit_offset), ops.rmsnorm(x, w, 1e-6, unit_offset), dtype, rel32=4.8e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["gelu_tanh", "gelu_erf", "silu"])
def test_activations_and_gated_match_reference(kind, dtype):
    rng = _rng(5)
    gate = np.concatenate([np.linspace(-12, 12, 2001), rng.standard_normal(999) * 4, [0.0, -800.0, 800.0]])
    gate = gate.astype(dtype).reshape(3, 1001)
    up = rng.standard_normal(gate.shape).astype(dtype)
    # gelu_tanh: 1 + tanh(y) cancels for y << 0 in both implementations; compare there absolutely.
    atol = 4 * np.finfo(dtype).eps * np.abs(gate)
    rtol = 1e-12 if dtype == np.float64 else 4.8e-7
    for got, want, scale in ((NB.activation(gate, kind), ops.activation(gate, kind), 1.0),
                             (NB.gated(gate, up, kind), ops.gated(gate, up, kind), np.abs(up))):
        assert got.dtype == dtype
        assert np.all(np.abs(got - want) <= rtol * np.abs(want) + atol * scale)


@SETTINGS
@given(seed=st.integers(0, 2**16), t=st.integers(1, 40), half=st.integers(1, 40),
       layout=st.sampled_from(["rotate_half", "interleaved"]), per_batch=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_rope_matches_reference_exactly(seed, t, half, layout, per_batch, dtype):
    rng = _rng(seed)
    x = rng.standard_normal((2, 3, t, 2 * half)).astype(dtype)
    positions = rng.integers(-50, 50, (2 if per_batch else 1, t))
    cos, sin = ops.rope_cos_sin(positions, 2 * half, 1e4, layout)
    # Same operations in the same order and dtype: bit-identical.
    np.testing.assert_array_equal(NB.rope(x, cos, sin, layout), ops.apply_rope(x, cos, sin, layout))


def test_elementwise_bad_input():
    with pytest.raises(ValueError, match="activation kind"):
        NB.activation(np.zeros(3), "relu")
    with pytest.raises(ValueError, match="rmsnorm weight"):
        NB.rmsnorm(np.zeros((2, 4)), np.zeros(3), 1e-6)
    with pytest.raises(ValueError, match="rope cos/sin"):
        NB.rope(np.zeros((1, 1, 2, 4)), np.zeros((1, 3, 4)), np.zeros((1, 3, 4)), "rotate_half")


# ---------------------------------------------------------------- losses


def _loss_inputs(seed, n, vocab, dtype, banned):
    rng = _rng(seed)
    student = (rng.standard_normal((n, vocab)) * 3).astype(dtype)
    teacher = (rng.standard_normal((n, vocab)) * 3).astype(dtype)
    targets = rng.integers(0, vocab, n)
    weight = rng.choice([0.0, 0.5, 1.0, 2.0], n)
    if banned and vocab > 2:
        student[0, 1] = -np.inf  # student bans an entry: forward KL / CE +inf where the target has mass
        teacher[-1, :2] = -np.inf  # teacher bans entries: reverse KL +inf, gradient NaN (SPEC)
        targets[-1] = 0
    return student, teacher, targets, weight


@SETTINGS
@given(seed=st.integers(0, 2**16), n=st.integers(1, 7), vocab=st.integers(1, 300), kind=st.sampled_from(losses.KINDS),
       temperature=st.sampled_from([0.5, 1.0, 2.0]), beta=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
       smoothing=st.sampled_from([0.0, 0.1, 1.0]), banned=st.booleans(), strided=st.booleans(),
       dtype=st.sampled_from(DTYPES))
def test_loss_rows_matches_reference(seed, n, vocab, kind, temperature, beta, smoothing, banned, strided, dtype):
    """Values, gradients and their infinities/NaNs equal the float64 reference on the same inputs.

    Tolerances (module docstring): values 1e-12; gradient entries 1e-12 (float64) or one float32
    eps (float32: the rounding of a float64 result) relative, plus 1e-12 of their term scale.
    """
    student, teacher, targets, weight = _loss_inputs(seed, n, vocab, dtype, banned)
    if strided:  # rows as a strided view, last axis contiguous
        student = np.concatenate([student, student], axis=1)[:, :vocab]
    is_ce = kind == "cross_entropy"
    kwargs = dict(temperature=temperature, beta=beta, label_smoothing=smoothing)
    grad_out = np.full(student.shape, 7.0, dtype)
    values, grad = NB.loss_rows(kind, student, None if is_ce else teacher, targets if is_ce else None, weight,
                                **kwargs, grad_out=grad_out)
    want_values, want_grad = losses.loss_rows(kind, student.astype(np.float64),
                                              None if is_ce else teacher.astype(np.float64),
                                              targets if is_ce else None, weight, **kwargs)
    assert grad is grad_out and values.dtype == np.float64 and grad.dtype == dtype
    np.testing.assert_array_equal(np.isfinite(values), np.isfinite(want_values))
    np.testing.assert_array_equal(values[~np.isfinite(values)], want_values[~np.isfinite(want_values)])
    np.testing.assert_array_equal(np.isnan(grad).all(axis=1), np.isnan(want_grad).all(axis=1))
    dropped = weight == 0
    assert np.all(values[dropped] == 0) and np.all(grad[dropped] == 0)
    finite = np.isfinite(want_values)
    np.testing.assert_allclose(values[finite], want_values[finite], rtol=1e-12, atol=1e-12)  # nats
    # grad[i] = w_i / T (a - q sum_j a_j), a difference of terms up to about w_i / T (1 + |values_i|):
    # |a_j| <= 2 + values_i for every kind, and |a_j| <= 1 (a = -p or -w) where values_i is +inf.
    # Compared relative to that per-row scale, so an all-zero gradient still has a tolerance.
    rows = ~np.isnan(want_grad).all(axis=1) & ~dropped
    term_scale = (weight / temperature * (1 + np.where(finite, np.abs(want_values), 0.0)))[rows, None]
    np.testing.assert_allclose(grad[rows] / term_scale, want_grad[rows] / term_scale,
                               rtol=1e-12 if dtype == np.float64 else np.finfo(np.float32).eps, atol=1e-12)


def test_loss_rows_hand_case_cross_entropy():
    # Uniform logits over V = 4: CE = log 4; grad = q - onehot = 1/4 - [1, 0, 0, 0] (weight 1).
    values, grad = NB.loss_rows("cross_entropy", np.zeros((1, 4)), None, np.array([0]), np.ones(1),
                                temperature=1.0, beta=0.0, label_smoothing=0.0)
    np.testing.assert_allclose(values, [np.log(4.0)], rtol=1e-15)
    np.testing.assert_allclose(grad, [[-0.75, 0.25, 0.25, 0.25]], rtol=1e-15)


def test_loss_rows_errors_match_reference():
    logits = np.zeros((2, 3))
    logits[1] = -np.inf
    with pytest.raises(ValueError, match="student logits row 1 must hold finite values"):
        NB.loss_rows("forward_kl", logits, np.zeros((2, 3)), None, np.ones(2), temperature=1.0, beta=0.0,
                     label_smoothing=0.0)
    # the same row with weight 0 is not evaluated
    values, grad = NB.loss_rows("forward_kl", logits, np.zeros((2, 3)), None, np.array([1.0, 0.0]),
                                temperature=1.0, beta=0.0, label_smoothing=0.0)
    assert values[1] == 0 and not grad[1].any()
    with pytest.raises(ValueError, match="kind must be one of"):
        NB.loss_rows("kl", logits, logits, None, np.ones(2), temperature=1.0, beta=0.0, label_smoothing=0.0)


# ---------------------------------------------------------------- parallel and serial builds


@pytest.mark.parametrize("dtype", DTYPES)
def test_parallel_and_serial_builds_agree_bitwise(monkeypatch, dtype):
    # Small calls take the serial build; this runs every kernel through both on the same inputs.
    from refslm.backends import numba_math

    rng = _rng(11)
    q = rng.uniform(-1, 1, (2, 4, 70, 24)).astype(dtype)
    kv = rng.uniform(-1, 1, (2, 2, 90, 24)).astype(dtype)
    logits = rng.standard_normal((9, 130)).astype(dtype)
    cos, sin = ops.rope_cos_sin(np.arange(70)[None], 24, 1e4)

    def run_all():
        return [NB.attention(q, kv, kv, key_mask=rng.random((2, 90)) < 0.8, causal=True, q_start=20,
                             interleaved=False, mask_fill="-inf"),
                NB.attention(q[:, :, :1], kv, kv, key_mask=rng.random((2, 90)) < 0.8, causal=True, q_start=60,
                             interleaved=True, mask_fill="finite_min"),
                *NB.loss_rows("jsd", logits, logits[::-1].copy(), None, np.ones(9), temperature=2.0, beta=0.5,
                              label_smoothing=0.0),
                NB.rmsnorm(q, np.ones(24, dtype), 1e-6), NB.rope(q, cos, sin, "rotate_half"),
                NB.activation(q, "gelu_tanh"), NB.gated(q, q, "silu")]

    rng = _rng(12)
    monkeypatch.setattr(numba_math, "PARALLEL_MIN_WORK", 0)
    parallel = run_all()
    rng = _rng(12)
    monkeypatch.setattr(numba_math, "PARALLEL_MIN_WORK", 1 << 60)
    serial = run_all()
    for p, s in zip(parallel, serial, strict=True):
        np.testing.assert_array_equal(p, s)


# ---------------------------------------------------------------- registry


def test_missing_numba_is_backend_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)
    for name in [m for m in sys.modules if m.startswith("refslm.backends.numba_")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(backends, "_INSTANCES", {})
    with pytest.raises(BackendUnavailable, match="numba"):
        get_backend("numba")

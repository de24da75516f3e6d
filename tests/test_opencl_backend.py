"""The opencl backend equals the NumPy reference (refslm.ops / refslm.losses) on random shapes.

Expectations come from the NumPy reference evaluated in float64 on the same (float32-rounded)
inputs; float32 results must agree to a few float32 ulps of the values' scale, float64 ones to
~1e-12. Shapes are drawn so that they are not multiples of the GEMM tiles or attention blocks.
Programs are compiled once per session (PoCL compiles are slow): head_dim is drawn from a small set.
Skipped where pyopencl or a usable OpenCL device is missing.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

pytest.importorskip("pyopencl")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from refslm import config, losses, models, ops  # noqa: E402
from refslm.backends import BackendUnavailable, get_backend  # noqa: E402

try:
    OCL = get_backend("opencl")
except BackendUnavailable as exc:  # pragma: no cover - depends on the machine
    pytest.skip(f"opencl backend unavailable: {exc}", allow_module_level=True)

FEW = settings(max_examples=6, deadline=None, derandomize=True)
DTYPES = [np.float32] + ([np.float64] if "float64" in OCL.dtypes else [])
# One tolerance for every op against the float64 reference (the goldens' are per op). On PoCL, 60 random
# examples per test reach at most 0.25 of it in float32 (loss_rows; linear 0.12, the rest <= 0.06) and
# 0.01 in float64; a GPU's other summation orders and FMA contractions keep headroom.
TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


def rand(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def run(fn, *arrays, **kwargs):
    """fn on device copies of the arrays -> host result."""
    return OCL.to_numpy(fn(*(OCL.asarray(a) if a is not None else None for a in arrays), **kwargs))


def f64(*arrays):
    return [None if a is None else a.astype(np.float64) for a in arrays]


def close(got, ref, dtype, scale=None):
    """got (device dtype) vs ref (float64): tolerance relative to the result's scale."""
    assert got.dtype == dtype
    tol = TOL[dtype]
    scale = np.max(np.abs(ref)) if scale is None else scale
    np.testing.assert_allclose(got, ref, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0))


# ---------------------------------------------------------------- dense ops


@FEW
@given(m=st.integers(1, 150), n=st.integers(1, 140), k=st.integers(1, 90), bias=st.booleans(),
       residual=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_linear_gemm_and_gemv(m, n, k, bias, residual, dtype):
    rng = np.random.default_rng(m * 10007 + n * 101 + k)
    x, w = rand(rng, (m, k), dtype), rand(rng, (n, k), dtype)
    b = rand(rng, (n,), dtype) if bias else None
    r = rand(rng, (m, n), dtype, 10.0) if residual else None
    ref = ops.linear(*f64(x, w, b)) + (0.0 if r is None else r.astype(np.float64))
    close(run(OCL.linear, x, w, b, r), ref, dtype, scale=np.sqrt(k) * 3)


def test_linear_gemv_path_and_batch_dims():
    rng = np.random.default_rng(1)
    for rows in (1, 3, 8, 9):  # GEMV up to 8 rows, tiled GEMM above
        x, w = rand(rng, (1, rows, 70), np.float32), rand(rng, (33, 70), np.float32)
        r = rand(rng, (1, rows, 33), np.float32)
        close(run(OCL.linear, x, w), ops.linear(*f64(x, w)), np.float32, scale=30)
        close(run(OCL.linear, x, w, None, r), ops.linear(*f64(x, w)) + r, np.float32, scale=30)
    with pytest.raises(ValueError, match=r"residual must have the output shape \(1, 9, 33\), got \(1, 9, 70\)"):
        run(OCL.linear, x, w, None, x)


@FEW
@given(rows=st.integers(1, 20), width=st.integers(1, 300), unit_offset=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_rmsnorm(rows, width, unit_offset, dtype):
    rng = np.random.default_rng(rows * 1000 + width)
    x, w = rand(rng, (2, rows, width), dtype, 3.0), rand(rng, (width,), dtype)
    close(run(OCL.rmsnorm, x, w, eps=1e-6, unit_offset=unit_offset), ops.rmsnorm(*f64(x, w), 1e-6, unit_offset), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["gelu_tanh", "gelu_erf", "silu"])
def test_activation_gated(kind, dtype):
    rng = np.random.default_rng(2)
    x = np.concatenate([rand(rng, 997, dtype, 4.0), np.array([-800, -30, 0, 30, 800], dtype)])
    up = rand(rng, x.shape, dtype)
    close(run(OCL.activation, x, kind=kind), ops.activation(x.astype(np.float64), kind), dtype)
    close(run(OCL.gated, x, up, kind=kind), ops.gated(*f64(x, up), kind), dtype)


def test_softmax_rows():
    rng = np.random.default_rng(3)
    x = rand(rng, (5, 1001), np.float32, 10.0)
    x[0, :500] = -np.inf
    close(OCL.to_numpy(OCL.softmax(OCL.asarray(x))), ops.softmax(x.astype(np.float64)), np.float32)


def test_embedding_and_bad_ids():
    rng = np.random.default_rng(4)
    table = rand(rng, (37, 11), np.float32)
    ids = rng.integers(0, 37, (3, 5))
    np.testing.assert_array_equal(OCL.to_numpy(OCL.embedding(ids, OCL.asarray(table))), table[ids])
    with pytest.raises(ValueError, match="token id 37 outside the vocabulary"):
        OCL.embedding(np.array([[37]]), OCL.asarray(table))


@FEW
@given(b=st.integers(1, 3), h=st.integers(1, 4), t=st.integers(1, 40), d=st.sampled_from([4, 10, 64]),
       layout=st.sampled_from(["rotate_half", "interleaved"]), per_batch=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_rope(b, h, t, d, layout, per_batch, dtype):
    rng = np.random.default_rng(b * 100 + t)
    x = rand(rng, (b, h, t, d), dtype)
    positions = rng.integers(-20, 100, (b if per_batch else 1, t))
    cos, sin = ops.rope_cos_sin(positions, d, 10000.0, layout)
    ref = ops.apply_rope(x.astype(np.float64), cos, sin, layout)
    close(OCL.to_numpy(OCL.rope(OCL.asarray(x), cos, sin, layout)), ref, dtype)


@FEW
@given(b=st.integers(1, 3), hkv=st.integers(1, 3), n_rep=st.integers(1, 3), t=st.integers(1, 9),
       d=st.sampled_from([4, 10, 64]), start=st.integers(0, 20), spare=st.integers(0, 5),
       layout=st.sampled_from(["rotate_half", "interleaved"]), per_batch=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_rope_store_kv(b, hkv, n_rep, t, d, start, spare, layout, per_batch, dtype):
    """q, k, v as head views of projections [B, T, H*D] (strided), caches [B, Hkv, start + T + spare, D]: the
    rotated q, the cache window start.. (rope(k), v) and the untouched rest against the NumPy reference."""
    rng = np.random.default_rng(b * 1000 + t * 10 + start)
    hq, capacity = hkv * n_rep, start + t + spare
    q, k, v = (rand(rng, (b, t, h * d), dtype) for h in (hq, hkv, hkv))
    before_k, before_v = rand(rng, (b, hkv, capacity, d), dtype), rand(rng, (b, hkv, capacity, d), dtype)
    positions = rng.integers(0, 100, (b if per_batch else 1, t))
    cos, sin = ops.rope_cos_sin(positions, d, 10000.0, layout)
    cache_k, cache_v = OCL.asarray(before_k), OCL.asarray(before_v)
    heads = [OCL.split_heads(OCL.asarray(x), h) for x, h in ((q, hq), (k, hkv), (v, hkv))]
    rotated = OCL.to_numpy(OCL.rope_store_kv(*heads, cos, sin, layout, cache_k, cache_v, start))
    q_ref, k_ref = (ops.apply_rope(ops.split_heads(x.astype(np.float64), h), cos, sin, layout)
                    for x, h in ((q, hq), (k, hkv)))
    close(rotated, q_ref, dtype)
    got_k, got_v = OCL.to_numpy(cache_k), OCL.to_numpy(cache_v)
    window = slice(start, start + t)
    close(got_k[:, :, window], k_ref, dtype)
    np.testing.assert_array_equal(got_v[:, :, window], ops.split_heads(v, hkv))
    outside = np.r_[0:start, start + t:capacity]
    np.testing.assert_array_equal(got_k[:, :, outside], before_k[:, :, outside])
    np.testing.assert_array_equal(got_v[:, :, outside], before_v[:, :, outside])


def test_split_merge_heads_roundtrip():
    rng = np.random.default_rng(5)
    x = rand(rng, (2, 7, 24), np.float32)
    heads = OCL.split_heads(OCL.asarray(x), 4)
    np.testing.assert_array_equal(OCL.to_numpy(heads), ops.split_heads(x, 4))
    np.testing.assert_array_equal(OCL.to_numpy(OCL.merge_heads(heads)), x)


# ---------------------------------------------------------------- attention


KERNELS = ["row", "flash"]


@contextlib.contextmanager
def forced(kernel: str):
    """Force the decode (row) kernel or the block (flash) kernel for every query length."""
    saved = OCL.row_attention_max_tq
    OCL.row_attention_max_tq = 10**9 if kernel == "row" else 0
    try:
        yield
    finally:
        OCL.row_attention_max_tq = saved


attention_cases = given(
    b=st.integers(1, 2), hkv=st.integers(1, 3), n_rep=st.integers(1, 3), tq=st.integers(1, 40),
    tk=st.integers(1, 45), d=st.sampled_from([8, 16]), causal=st.booleans(), q_start=st.integers(0, 6),
    masked=st.booleans(), interleaved=st.booleans(), fill=st.sampled_from(["finite_min", "-inf"]),
    segmented=st.booleans(), dtype=st.sampled_from(DTYPES))


@pytest.mark.parametrize("kernel", KERNELS)
@settings(max_examples=8, deadline=None, derandomize=True)
@attention_cases
def test_attention_matches_reference(kernel, b, hkv, n_rep, tq, tk, d, causal, q_start, masked,
                                     interleaved, fill, segmented, dtype):
    rng = np.random.default_rng(tq * 1000 + tk * 10 + d)
    q = rand(rng, (b, hkv * n_rep, tq, d), dtype)
    k, v = rand(rng, (b, hkv, tk, d), dtype), rand(rng, (b, hkv, tk, d), dtype)
    key_mask = rng.random((b, tk)) > 0.3 if masked else None
    if masked:
        key_mask[0] = False  # a fully masked row: uniform average (finite_min) or zeros (-inf)
    # segment ids in {0, 1, 2} (equality is the definition, contiguous or not); self-attention only
    segment_ids = rng.integers(0, 3, (b, tk)) if segmented and q_start + tq <= tk else None
    kwargs = dict(key_mask=key_mask, causal=causal, q_start=q_start, interleaved=interleaved, mask_fill=fill,
                  segment_ids=segment_ids)
    ref = ops.attention(*f64(q, k, v), **kwargs)
    with forced(kernel):
        close(run(OCL.attention, q, k, v, **kwargs), ref, dtype)


@pytest.mark.parametrize("kernel", KERNELS)
def test_gqa_orders_differ_and_match(kernel):
    rng = np.random.default_rng(6)
    q = rand(rng, (1, 4, 5, 8), np.float32)
    k, v = rand(rng, (1, 2, 6, 8), np.float32), rand(rng, (1, 2, 6, 8), np.float32)
    outs = []
    for interleaved in (False, True):
        kwargs = dict(key_mask=None, causal=True, q_start=1, interleaved=interleaved, mask_fill="finite_min")
        with forced(kernel):
            got = run(OCL.attention, q, k, v, **kwargs)
        close(got, ops.attention(*f64(q, k, v), **kwargs), np.float32)
        outs.append(got)
    assert np.abs(outs[0] - outs[1]).max() > 1e-3  # head 1 reads kv head 1 (block) vs kv head 0 (interleaved)


@pytest.mark.parametrize("kernel", KERNELS)
def test_decode_over_device_kv_cache(kernel):
    """empty / write_time / time_slice on device, attention over the slice in place."""
    rng = np.random.default_rng(7)
    steps, d = 6, 16
    k_all, v_all = rand(rng, (2, 2, steps, d), np.float32), rand(rng, (2, 2, steps, d), np.float32)
    k_cache, v_cache = OCL.empty((2, 2, 10, d), np.float32), OCL.empty((2, 2, 10, d), np.float32)
    OCL.write_time(k_cache, OCL.asarray(k_all[:, :, :3]), 0)  # a 3-token prefill, then single steps
    OCL.write_time(v_cache, OCL.asarray(v_all[:, :, :3]), 0)
    for t in range(3, steps):
        OCL.write_time(k_cache, OCL.asarray(k_all[:, :, t:t + 1]), t)
        OCL.write_time(v_cache, OCL.asarray(v_all[:, :, t:t + 1]), t)
        q = rand(rng, (2, 4, 1, d), np.float32)
        kwargs = dict(key_mask=None, causal=True, q_start=t, interleaved=True, mask_fill="-inf")
        with forced(kernel):
            got = OCL.to_numpy(OCL.attention(OCL.asarray(q), OCL.time_slice(k_cache, 0, t + 1),
                                             OCL.time_slice(v_cache, 0, t + 1), **kwargs))
        ref = ops.attention(*f64(q, k_all[:, :, :t + 1], v_all[:, :, :t + 1]), **kwargs)
        close(got, ref, np.float32)
    np.testing.assert_array_equal(OCL.to_numpy(OCL.time_slice(k_cache, 2, 5)), k_all[:, :, 2:5])


def test_attention_bad_input():
    q, k = OCL.asarray(np.zeros((1, 3, 2, 8), np.float32)), OCL.asarray(np.zeros((1, 2, 2, 8), np.float32))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        OCL.attention(q, k, k, key_mask=None, causal=False, q_start=0, interleaved=False, mask_fill="-inf")
    with pytest.raises(ValueError, match="key_mask must have shape"):
        OCL.attention(q, q, q, key_mask=np.ones((1, 5), bool), causal=False, q_start=0, interleaved=False,
                      mask_fill="-inf")


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", losses.KINDS)
@pytest.mark.parametrize("temperature,beta,smoothing", [(1.0, 0.5, 0.0), (2.0, 0.1, 0.1), (0.7, 0.0, 0.0),
                                                        (1.0, 1.0, 1.0)])
def test_loss_rows(kind, temperature, beta, smoothing, dtype):
    rng = np.random.default_rng(8)
    n, vocab = 6, 517
    student, teacher = rand(rng, (n, vocab), dtype, 3.0), rand(rng, (n, vocab), dtype, 3.0)
    student[1, :3] = -np.inf  # -inf entries are allowed (zero probability)
    teacher[2, 5:9] = -np.inf
    targets = rng.integers(3, vocab, n)
    row_weight = np.array([1.0, 0.5, 2.0, 0.0, 1.0, 0.25])
    kwargs = dict(temperature=temperature, beta=beta, label_smoothing=smoothing)
    ref_values, ref_grad = losses.loss_rows(kind, *f64(student, teacher), targets, row_weight, **kwargs)
    values, grad = OCL.loss_rows(kind, OCL.asarray(student), OCL.asarray(teacher), targets, row_weight, **kwargs)
    grad = OCL.to_numpy(grad)
    assert values.dtype == np.float64 and values[3] == 0 and np.all(grad[3] == 0)
    finite = np.isfinite(ref_values)
    np.testing.assert_array_equal(np.isfinite(values), finite)
    close(values[finite].astype(dtype), ref_values[finite], dtype)
    rows = np.isfinite(ref_grad).all(axis=1)
    close(grad[rows], ref_grad[rows], dtype, scale=1.0)


def test_loss_rows_rejects_nan_rows_and_writes_grad_out():
    student = np.zeros((2, 4), np.float32)
    student[1, 0] = np.nan
    with pytest.raises(ValueError, match="student logits row 1"):
        OCL.loss_rows("cross_entropy", OCL.asarray(student), None, np.array([0, 1]), np.ones(2),
                      temperature=1.0, beta=0.0, label_smoothing=0.0)
    grad_out = OCL.empty((2, 4), np.float32)
    values, grad = OCL.loss_rows("cross_entropy", OCL.asarray(student), None, np.array([0, 1]), np.array([1.0, 0.0]),
                                 temperature=1.0, beta=0.0, label_smoothing=0.0, grad_out=grad_out)
    assert grad is grad_out
    np.testing.assert_allclose(values, [np.log(4), 0.0], rtol=1e-6)  # uniform row: -log(1/4); dropped row: 0
    np.testing.assert_allclose(OCL.to_numpy(grad), [[-0.75, 0.25, 0.25, 0.25], [0, 0, 0, 0]], rtol=1e-6)


# ---------------------------------------------------------------- models and devices


@pytest.mark.parametrize("make", [config.tiny_encoder_decoder, config.tiny_decoder_only])
def test_tiny_model_logits_and_cached_generation(make):
    cfg = make()
    host = models.init(cfg, seed=0, dtype="float32", backend="numpy")
    device = models.from_params(cfg, host.params, dtype="float32", backend="opencl")
    ids = np.random.default_rng(9).integers(3, cfg.vocab_size, (2, 7))
    args = (ids, ids[:, :5]) if host.is_encoder_decoder else (ids,)
    params64 = {name: value.astype(np.float64) for name, value in host.params.items()}
    ref = models.from_params(cfg, params64, dtype="float64").logits(*args)
    close(device.logits(*args), ref, np.float32)
    np.testing.assert_array_equal(device.generate(ids, 6, greedy=True), host.generate(ids, 6, greedy=True))


def test_device_choice_errors(monkeypatch):
    from refslm.backends.opencl_backend import OpenCLBackend

    monkeypatch.setenv("REFSLM_OPENCL_DEVICE", "no-such-device-name")
    with pytest.raises(BackendUnavailable, match="no OpenCL device matches 'no-such-device-name'"):
        OpenCLBackend()
    with pytest.raises(ValueError, match="GEMM tile must be 'TM,TN,TK,RM,RN'"):
        OpenCLBackend(device="0:0", gemm_tile="64,64")
    monkeypatch.delenv("REFSLM_OPENCL_DEVICE")
    monkeypatch.setenv("REFSLM_OPENCL_WEIGHT_STORAGE", "bfloat16")
    with pytest.raises(ValueError, match="weight_storage \\(REFSLM_OPENCL_WEIGHT_STORAGE or argument\\) must be"):
        OpenCLBackend()
    monkeypatch.setenv("REFSLM_OPENCL_WEIGHT_STORAGE", "float16")
    assert OpenCLBackend().weight_storage == "float16"


def test_devices_command_lists_the_backend_device(capsys):
    from refslm.cli import main

    assert main(["devices"]) == 0
    assert OCL.device.name.strip() in capsys.readouterr().out


@pytest.mark.parametrize("make", [config.tiny_encoder_decoder, config.tiny_decoder_only])
def test_float16_weight_storage_matches_reference_on_rounded_weights(make):
    """weight_storage='float16' keeps matrices as half and computes in float32: the logits equal the
    reference run on float16-rounded weights (to float32 tolerance), not merely 'close to float32'."""
    from refslm.backends.opencl_backend import OpenCLBackend

    half_backend = OpenCLBackend(weight_storage="float16")
    cfg = make()
    host = models.init(cfg, seed=0, dtype="float32", backend="numpy")
    device = models.from_params(cfg, host.params, dtype="float32", backend=half_backend)
    assert device.weights.embed.dtype == np.float16 and device.weights.final_norm.dtype == np.float32
    rounded = {name: (value.astype(np.float16).astype(np.float64) if value.ndim == 2 else value.astype(np.float64))
               for name, value in host.params.items()}
    ids = np.random.default_rng(4).integers(3, cfg.vocab_size, (2, 7))
    args = (ids, ids[:, :5]) if host.is_encoder_decoder else (ids,)
    ref = models.from_params(cfg, rounded, dtype="float64").logits(*args)
    close(device.logits(*args), ref, np.float32)
    assert np.abs(host.logits(*args) - ref).max() > 1e-5  # the rounding is visible: the test can fail
    assert half_backend.asarray(np.ones((3, 4), np.float32)).dtype == np.float32  # only weights are narrowed
    with pytest.raises(TypeError, match="supports dtypes \\('float32',\\)"):
        models.from_params(cfg, host.params, dtype="float64", backend=half_backend)


def test_launch_rejects_python_scalars():
    kernel = OCL.kernel("elementwise.cl", "gated", np.float32, UNUSED_TEST_DEFINE=1)  # a fresh, undeclared kernel
    a = OCL.asarray(np.ones(4, np.float32))
    with pytest.raises(TypeError, match="kernel gated argument 1: expected a numpy scalar"):
        OCL._launch(kernel, (4,), None, np.int64(4), 1, a.data, a.data, a.data)


@pytest.mark.parametrize("make", [config.tiny_encoder_decoder, config.tiny_decoder_only])
def test_decode_step_launch_count(make):
    """One cached decode step enqueues exactly the kernels of the forward pass, no hidden copies:
    embedding + final rmsnorm + lm_head, and per block the kernels counted below (a view such as
    split_heads, merge_heads or time_slice must not cost a copy, and each residual add and the MLP's
    activation are fused into the projection before them)."""
    from refslm.generate import CachedDecoder

    cfg = make()
    model = models.from_params(cfg, models.init(cfg, seed=0).params, dtype="float32", backend="opencl")
    decoder = CachedDecoder(model, np.arange(3, 9)[None], 4)
    self_attention = 1 + 3 + 1 + 1 + 1  # norm, q/k/v, rope q/k with the cache writes, attention, o + residual
    cross_attention = 1 + 1 + 1 + 1  # norm, q, attention, o + residual
    mlp = 1 + 1 + 1  # norm, up with its activation (Mu's GELU MLP), down + residual
    per_block = self_attention + mlp + (cross_attention if model.is_encoder_decoder else 0)
    before = OCL.launches
    decoder.step(np.array([5]))
    assert OCL.launches - before == 3 + per_block * len(model.weights.blocks)


def test_kernel_seconds_profiles_the_kernels_of_a_call():
    x, w = OCL.asarray(np.ones((64, 256), np.float32)), OCL.asarray(np.ones((128, 256), np.float32))
    before = OCL.launches
    recorded = []
    real_launch = OCL._launch

    def launch(*args):
        real_launch(*args)
        recorded.append(OCL._recorded[-1])  # each kernel's event is kept while kernel_seconds runs

    OCL._launch = launch
    try:
        wall, busy = OCL.kernel_seconds(lambda: [OCL.linear(x, w) for _ in range(3)])
    finally:
        del OCL._launch
    assert OCL.launches - before == 3 and len(recorded) == 3
    assert busy == sum(e.profile.end - e.profile.start for e in recorded) * 1e-9 and wall > 0
    assert OCL._recorded is None  # events are kept only while measuring
    assert OCL.kernel_seconds(lambda: None)[1] == 0  # nothing enqueued, no device time


def test_host_transfers_refuse_what_is_no_number():
    """Object arrays hold host pointers: copied to a device and back they crashed the process."""
    with pytest.raises(TypeError, match="asarray x must be a bool, integer or float array, got dtype object"):
        OCL.asarray(np.array([[1] * 10, 0], dtype=object))
    assert OCL.to_numpy(OCL.asarray(np.array(2.5))).shape == ()  # a 0-d array stays 0-d
    with pytest.raises(ValueError, match=r"empty: shape must be ints >= 0, got \(-2, 3\)"):
        OCL.empty((-2, 3), np.float32)
    with pytest.raises(ValueError, match=r"empty: shape must be ints >= 0, got \(2.7, 3\)"):
        OCL.empty((2.7, 3), np.float32)
    buf = OCL.empty((1, 1, 4, 2), np.float32)
    with pytest.raises(TypeError, match=r"write_time start must be an int >= 0, got 1.5 \(float\)"):
        OCL.write_time(buf, OCL.asarray(np.ones((1, 1, 1, 2), np.float32)), 1.5)
    with pytest.raises(ValueError, match=r"merge_heads x must have shape \[B, H, T, D\]"):
        OCL.merge_heads(OCL.asarray(np.ones((2, 3, 4), np.float32)))
    with pytest.raises(ValueError, match=r"embedding table must have shape \[V, C\]"):
        OCL.embedding(np.array([[1]]), OCL.asarray(np.ones(4, np.float32)))

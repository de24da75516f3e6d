"""Backend registry: names, clean unavailability, and (in CI) that the required backends really run."""

import os
import sys

import numpy as np
import pytest

from refslm import ops
from refslm.backends import BackendUnavailable, available_backends, backend_names, get_backend


def test_registry_names_and_unknown_backend():
    assert backend_names() == ("numpy", "numba", "opencl")
    assert "numpy" in available_backends()
    with pytest.raises(ValueError, match="backend must be one of"):
        get_backend("cuda")


def test_missing_package_is_backend_unavailable(monkeypatch):
    import refslm.backends as registry

    monkeypatch.setitem(registry._REGISTRY, "fake", ("refslm.backends.no_such_module", "X"))
    with pytest.raises(BackendUnavailable, match="'fake' is not available"):
        get_backend("fake")


def hide_package(monkeypatch, package: str, backend: str) -> None:
    """Make `package` (numba, pyopencl) look uninstalled and the backend module `backend` not yet imported."""
    import refslm.backends as registry

    module = f"refslm.backends.{backend}_backend"
    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.delattr(registry, f"{backend}_backend", raising=False)
    monkeypatch.delitem(registry._INSTANCES, backend, raising=False)


def test_missing_numba_names_the_extra_to_install(monkeypatch):
    """The opencl backend named `pip install 'refslm[opencl]'`; a missing numba gave only the ImportError."""
    hide_package(monkeypatch, "numba", "numba")
    with pytest.raises(BackendUnavailable, match="backend 'numba' is not available: numba is not installed .*; "
                                                 "install the extra: pip install 'refslm\\[numba\\]'"):
        get_backend("numba")
    assert "numba" not in available_backends()


def test_devices_without_pyopencl_says_so_and_fails(monkeypatch, capsys):
    from refslm.cli import main

    hide_package(monkeypatch, "pyopencl", "opencl")
    assert main(["devices"]) == 1
    assert "OpenCL unavailable: pyopencl is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("name", os.environ.get("REFSLM_REQUIRE_BACKENDS", "numpy").split())
def test_required_backend_is_available(name):
    """CI sets REFSLM_REQUIRE_BACKENDS so that a backend cannot silently skip all its tests."""
    assert name in available_backends(), f"backend {name!r} is required here but unavailable"


@pytest.mark.parametrize("name", available_backends())
@pytest.mark.parametrize("rows", [(2, 3), (4, 5)])  # 6 rows: opencl's GEMV kernel; 20: its tiled GEMM
def test_linear_applies_the_activation_then_adds_the_residual(name, rows):
    """linear(x, W, b, residual, activation) = act(x W^T + b) + residual with the rounding of the separate
    ops (linear, activation, add), bit for bit, in every dtype of the backend."""
    be = get_backend(name)
    rng = np.random.default_rng(7)
    for dtype in be.dtypes:
        x, w, b = rng.standard_normal((*rows, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
        residual = 1e3 * rng.standard_normal((*rows, 4))  # large: added before the bias it would round differently
        x, w, b, residual = (be.asarray(a.astype(dtype)) for a in (x, w, b, residual))
        plain = be.linear(x, w, b)
        np.testing.assert_array_equal(be.to_numpy(be.linear(x, w, b, residual)),
                                      be.to_numpy(plain) + be.to_numpy(residual))
        for kind in ("gelu_tanh", "gelu_erf", "silu"):
            separate = be.to_numpy(be.activation(plain, kind))
            np.testing.assert_array_equal(be.to_numpy(be.linear(x, w, b, activation=kind)), separate)
            np.testing.assert_array_equal(be.to_numpy(be.linear(x, w, b, residual, activation=kind)),
                                          separate + be.to_numpy(residual))
        with pytest.raises(ValueError, match="residual must have the output shape"):
            be.linear(x, w, b, x)
        with pytest.raises(ValueError, match="activation kind must be one of"):
            be.linear(x, w, b, activation="relu")


@pytest.mark.parametrize("name", available_backends())
@pytest.mark.parametrize("layout", ["rotate_half", "interleaved"])
@pytest.mark.parametrize("per_batch", [False, True])
def test_rope_store_kv_is_rope_then_the_cache_writes(name, layout, per_batch):
    """rope_store_kv (one launch on opencl) = rope(q), and rope(k), v written into the caches at start.., bit
    for bit the backend's separate rope and write_time, on head views of a projection (strided on a device),
    with GQA (Hq = 4, Hkv = 2); cache times outside the window keep their values; rotated q and k agree
    with the float64 NumPy reference (ops.apply_rope) within a few ulps of the dtype."""
    be = get_backend(name)
    rng = np.random.default_rng(11)
    b, hq, hkv, t, d, capacity, start = 2, 4, 2, 3, 8, 7, 2
    positions = np.arange(start, start + t)[None] + (np.arange(b)[:, None] if per_batch else 0)
    cos, sin = ops.rope_cos_sin(positions, d, 10000.0, layout)
    for dtype in be.dtypes:
        q, k, v = (be.split_heads(be.asarray(rng.standard_normal((b, t, h * d)).astype(dtype)), h)
                   for h in (hq, hkv, hkv))
        before = rng.standard_normal((b, hkv, capacity, d)).astype(dtype)
        fused = [be.asarray(before.copy()) for _ in range(2)]
        separate = [be.asarray(before.copy()) for _ in range(2)]
        rotated_q = be.rope_store_kv(q, k, v, cos, sin, layout, *fused, start)
        be.write_time(separate[0], be.rope(k, cos, sin, layout), start)
        be.write_time(separate[1], v, start)
        np.testing.assert_array_equal(be.to_numpy(rotated_q), be.to_numpy(be.rope(q, cos, sin, layout)))
        for got, want in zip(fused, separate, strict=True):
            np.testing.assert_array_equal(be.to_numpy(got), be.to_numpy(want))
        keys, values = (be.to_numpy(c) for c in fused)
        np.testing.assert_array_equal(values[:, :, start:start + t], be.to_numpy(v))
        rtol = 1e-14 if dtype == "float64" else 1e-6
        for got, x in ((be.to_numpy(rotated_q), q), (keys[:, :, start:start + t], k)):
            want = ops.apply_rope(be.to_numpy(x).astype(np.float64), cos, sin, layout)
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())
        outside = np.r_[0:start, start + t:capacity]
        for cache in (keys, values):
            np.testing.assert_array_equal(cache[:, :, outside], before[:, :, outside])


# ---------------------------------------------------------------- bad input: every backend rejects it alike

# positions of the arguments that are backend arrays (the rest stay on the host)
DEVICE_ARGUMENTS = {"rope": (0,), "attention": (0, 1, 2), "linear": (0, 1, 2, 3), "rmsnorm": (0, 1), "gated": (0, 1),
                    "activation": (0,), "split_heads": (0,), "write_time": (0, 1), "time_slice": (0,), "empty": (),
                    "rope_store_kv": (0, 1, 2, 6, 7)}


class OnDevice:
    """A device backend called with host arrays: each method's backend-array arguments are uploaded first
    (whatever their dtype, so that the backend's own checks see them)."""

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, name):
        method, positions = getattr(self.backend, name), DEVICE_ARGUMENTS[name]

        def call(*args, **kwargs):
            uploaded = {}  # one device array per host array (an argument given twice stays one array)

            def device(a):
                if id(a) not in uploaded:
                    uploaded[id(a)] = self.backend.asarray(a)
                return uploaded[id(a)]
            return method(*(device(a) if i in positions and isinstance(a, np.ndarray) else a
                            for i, a in enumerate(args)), **kwargs)
        return call


def backend_for_bad_input(name):
    be = get_backend(name)
    return be if name in ("numpy", "numba") else OnDevice(be)


BAD_INPUT_BACKENDS = [n for n in ("numpy", "numba", "opencl") if n in available_backends()]
ATTN = dict(key_mask=None, causal=False, q_start=0, interleaved=False, mask_fill="finite_min")


def _attention(be, q_shape=(1, 2, 2, 4), kv_shape=(1, 1, 3, 4), dtype=np.float64, **kwargs):
    q, kv = np.ones(q_shape, dtype), np.ones(kv_shape, dtype)
    return be.attention(q, kv, kv, **(ATTN | kwargs))


def _rope(be, x_shape=(1, 1, 2, 4), layout="rotate_half", dtype=np.float64):
    t, d = x_shape[-2:]
    return be.rope(np.arange(np.prod(x_shape)).reshape(x_shape).astype(dtype), np.ones((1, t, d)), np.ones((1, t, d)),
                   layout)


def _rope_store_kv(be, q_shape=(2, 2, 2, 4), k_shape=(2, 1, 2, 4), v_shape=None, k_dtype=np.float64,
                   v_dtype=np.float64, cache_dtype=np.float64, one_cache=False, start=0):
    q, k, v = np.ones(q_shape), np.ones(k_shape, k_dtype), np.ones(v_shape or k_shape, v_dtype)
    cache_k = np.zeros((2, 1, 5, 4), cache_dtype)
    cache_v = cache_k if one_cache else cache_k.copy()
    tables = np.ones((1, 2, 4))
    return be.rope_store_kv(q, k, v, tables, tables, "rotate_half", cache_k, cache_v, start)


f32, f16, ones = np.float32, np.float16, np.ones


class DeviceMask:
    """Stands in for a device array given where the contract says host (np.asarray makes it an object)."""
BAD_INPUT = {  # case: (error, what the message must say, the call)
    # 1. numba read past the array for odd D (returned -9e199); 3-D x gave "not enough values to unpack"
    "rope odd head_dim": (ValueError, "rope needs an even head_dim >= 2, got 7",
                          lambda be: _rope(be, (1, 1, 2, 7), "interleaved")),
    "rope 3-D x": (ValueError, r"rope x must have shape \[B, H, T, D\]", lambda be: _rope(be, (1, 2, 8))),
    "rope layout": (ValueError, "rope layout must be one of", lambda be: _rope(be, layout="foo")),
    "rope cos not host": (TypeError, "rope cos must be a host NumPy array",
                          lambda be: be.rope(ones((1, 1, 2, 4)), DeviceMask(), ones((1, 2, 4)), "rotate_half")),
    "rope int x": (TypeError, "rope x must be a float32 or float64 ndarray", lambda be: _rope(be, dtype=int)),
    # 2. numba cast a float key_mask to uint8 (0.5 -> masked), numpy to bool (0.5 -> attended)
    "key_mask float": (TypeError, "key_mask must be a bool array",
                       lambda be: _attention(be, key_mask=np.array([[0.5, 1.0, 1.0]]))),
    "key_mask 256": (ValueError, "key_mask must hold only 0 and 1",
                     lambda be: _attention(be, key_mask=np.array([[256, 1, 1]]))),
    "key_mask on the device": (TypeError, "key_mask must be a host bool array",
                               lambda be: _attention(be, key_mask=DeviceMask())),
    "key_mask shape": (ValueError, r"key_mask must have shape \(1, 3\)",
                       lambda be: _attention(be, key_mask=ones((1, 4), bool))),
    # 3. numba gave NaN for q_start < 0 (causal, Tq < 8) and for Tk = 0
    "q_start negative": (ValueError, "q_start must be an int >= 0, got -1",
                         lambda be: _attention(be, causal=True, q_start=-1)),
    "q_start float": (TypeError, r"q_start must be an int >= 0, got 1.5 \(float\)",
                      lambda be: _attention(be, causal=True, q_start=1.5)),
    "no keys": (ValueError, r"at least one key \(Tk >= 1\)", lambda be: _attention(be, kv_shape=(1, 1, 0, 4))),
    # 4. unknown mask_fill (numpy gave all NaN)
    "mask_fill": (ValueError, "mask_fill must be one of",
                  lambda be: _attention(be, key_mask=np.array([[True, False, True]]), mask_fill="zero")),
    # 8. shapes
    "heads not dividing": (ValueError, "head count must divide",
                           lambda be: _attention(be, q_shape=(1, 3, 2, 4), kv_shape=(1, 2, 3, 4))),
    "no kv heads": (ValueError, "head count must divide", lambda be: _attention(be, kv_shape=(1, 0, 3, 4))),
    "head_dim mismatch": (ValueError, "k and v must both have shape", lambda be: _attention(be, kv_shape=(1, 1, 3, 5))),
    "batch mismatch": (ValueError, "k and v must both have shape", lambda be: _attention(be, kv_shape=(2, 1, 3, 4))),
    "attention float16": (TypeError, "attention q must be a float32 or float64 ndarray",
                          lambda be: _attention(be, dtype=f16)),
    "attention mixed dtypes": (TypeError, "attention k must have the dtype of the other operands",
                               lambda be: be.attention(ones((1, 1, 1, 4), f32), *(ones((1, 1, 2, 4)),) * 2, **ATTN)),
    "split_heads": (ValueError, "split_heads x must have shape", lambda be: be.split_heads(ones((1, 2, 6)), 4)),
    "split_heads int": (TypeError, "split_heads x must be a float32 or float64 ndarray",
                        lambda be: be.split_heads(ones((1, 2, 6), int), 2)),
    # 6. rmsnorm eps and weight shape (eps -1 or NaN gave NaN; weight (1,) broadcast)
    "rmsnorm eps -1": (ValueError, "rmsnorm eps must be a finite number > 0",
                       lambda be: be.rmsnorm(ones((2, 3)), ones(3), -1.0)),
    "rmsnorm eps nan": (ValueError, "rmsnorm eps must be a finite number > 0",
                        lambda be: be.rmsnorm(ones((2, 3)), ones(3), float("nan"))),
    "rmsnorm weight (1,)": (ValueError, r"rmsnorm weight must have shape \(C,\)",
                            lambda be: be.rmsnorm(ones((2, 3)), ones(1), 1e-6)),
    "rmsnorm weight dtype": (TypeError, "rmsnorm weight must have the dtype",
                             lambda be: be.rmsnorm(ones((2, 3), f32), ones(3), 1e-6)),
    "rmsnorm int": (TypeError, "rmsnorm x must be a float32 or float64 ndarray",
                    lambda be: be.rmsnorm(ones((2, 3), int), ones(3, int), 1e-6)),
    # 9. linear: int, float16 and mixed dtypes (numpy and numba returned int64 / float16 / float64)
    "linear int": (TypeError, "linear x must be a float32 or float64 ndarray",
                   lambda be: be.linear(ones((2, 3), int), ones((4, 3), int))),
    "linear float16": (TypeError, "linear x must be a float32 or float64 ndarray",
                       lambda be: be.linear(ones((2, 3), f16), ones((4, 3), f16))),
    "linear mixed": (TypeError, "linear weight must have the dtype",
                     lambda be: be.linear(ones((2, 3), f32), ones((4, 3)))),
    "linear bias dtype": (TypeError, "linear bias must have the dtype",
                          lambda be: be.linear(ones((2, 3)), ones((4, 3)), ones(4, f32))),
    "linear residual dtype": (TypeError, "linear residual must have the dtype",
                              lambda be: be.linear(ones((2, 3), f32), ones((4, 3), f32), None, ones((2, 4)))),
    "linear shapes": (ValueError, r"linear needs x \[\.\.\., in >= 1\]",
                      lambda be: be.linear(ones((2, 3)), ones((4, 5)))),
    "linear no inputs": (ValueError, r"linear needs x \[\.\.\., in >= 1\]",  # opencl wrote nothing for K = 0
                         lambda be: be.linear(ones((2, 0)), ones((4, 0)))),
    "linear activation kind": (ValueError, "activation kind must be one of",  # refused before the product
                               lambda be: be.linear(ones((2, 3)), ones((4, 3)), activation="relu")),
    # the KV cache's time window (numpy wrote nothing for start -1 and sliced 3:1 to an empty array)
    "write_time start -1": (ValueError, "write_time start must be an int >= 0, got -1",
                            lambda be: be.write_time(be.empty((1, 1, 4, 2), f32), ones((1, 1, 1, 2), f32), -1)),
    "write_time overflow": (ValueError, r"write_time: x \(1, 1, 2, 2\) does not fit buf \(1, 1, 4, 2\) at time 3",
                            lambda be: be.write_time(be.empty((1, 1, 4, 2), f32), ones((1, 1, 2, 2), f32), 3)),
    "write_time dtypes": (TypeError, r"write_time buf must have the dtype of the other operands \(float64\), got "
                          "float32",
                          lambda be: be.write_time(be.empty((1, 1, 4, 2), f32), ones((1, 1, 1, 2)), 0)),
    "rope_store_kv batches": (ValueError, r"rope_store_kv: need q \[B, Hq, T, D\] and k, v \[B, Hkv, T, D\]",
                              lambda be: _rope_store_kv(be, k_shape=(1, 1, 2, 4))),
    "rope_store_kv v shape": (ValueError, r"rope_store_kv: need q .* got \(2, 2, 2, 4\), \(2, 1, 2, 4\), "
                              r"\(2, 2, 2, 4\)", lambda be: _rope_store_kv(be, v_shape=(2, 2, 2, 4))),
    "rope_store_kv v dtype": (TypeError, "rope_store_kv v must have the dtype of the other operands",
                              lambda be: _rope_store_kv(be, v_dtype=f32)),
    "rope_store_kv k dtype": (TypeError, "rope_store_kv k must have the dtype of the other operands",
                              lambda be: _rope_store_kv(be, k_dtype=f32)),
    "rope_store_kv cache dtype": (TypeError, "write_time buf must have the dtype of the other operands",
                                  lambda be: _rope_store_kv(be, cache_dtype=f32)),
    "rope_store_kv one cache": (ValueError, "cache_k and cache_v must be two arrays, got the same one twice",
                                lambda be: _rope_store_kv(be, one_cache=True)),
    "rope_store_kv 3-D q": (ValueError, r"rope_store_kv q must have shape \[B, H, T, D\]",
                            lambda be: _rope_store_kv(be, q_shape=(2, 2, 4))),
    "rope_store_kv overflow": (ValueError, r"write_time: x \(2, 1, 2, 4\) does not fit buf \(2, 1, 5, 4\) at time 4",
                               lambda be: _rope_store_kv(be, start=4)),
    "time_slice reversed": (ValueError, r"time_slice: need x \[\.\.\., T, D\] and 0 <= start <= stop <= T",
                            lambda be: be.time_slice(ones((1, 1, 4, 2), f32), 3, 1)),
    # activations
    "activation int": (TypeError, "silu x must be a float32 or float64 ndarray",
                       lambda be: be.activation(np.array([1, 2]), "silu")),
    "gated float16": (TypeError, "gated gate must be a float32 or float64 ndarray",
                      lambda be: be.gated(ones(2, f16), ones(2, f16), "silu")),
    "gated shapes": (ValueError, "gated up must have gate's shape", lambda be: be.gated(ones((2, 3)), ones(3), "silu")),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_backends_reject_bad_input_with_one_message(case):
    """Every backend raises the same error naming the argument, with one message (the shared ops.check_*)."""
    error, match, call = BAD_INPUT[case]
    messages = set()
    for name in BAD_INPUT_BACKENDS:
        with pytest.raises(error, match=match) as info:
            call(backend_for_bad_input(name))
        messages.add(str(info.value))
    assert len(messages) == 1, messages


@pytest.mark.parametrize("name", BAD_INPUT_BACKENDS)
def test_attention_integer_key_mask_and_q_start_past_the_keys(name):
    """A 0/1 integer key_mask is the bool mask; a causal q_start past the keys (2**40 overflowed opencl's int32)
    sees every key, like q_start = Tk; both as the NumPy reference."""
    if "float64" not in get_backend(name).dtypes:
        pytest.skip(f"{name} has no float64 here")
    device = backend_for_bad_input(name)

    def attend(*args, **kwargs):  # the backend's attention, host arrays in and out
        return get_backend(name).to_numpy(device.attention(*args, **kwargs))

    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((2, 4, 3, 8)), rng.standard_normal((2, 2, 6, 8)), rng.standard_normal((2, 2, 6, 8))
    ints = np.array([[1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 1]], np.int8)
    kwargs = dict(causal=True, q_start=2, interleaved=True, mask_fill="-inf")
    want = attend(q, k, v, key_mask=ints.astype(bool), **kwargs)
    np.testing.assert_array_equal(attend(q, k, v, key_mask=ints, **kwargs), want)
    np.testing.assert_allclose(want, ops.attention(q, k, v, key_mask=ints, **kwargs), rtol=1e-12, atol=1e-13)
    kwargs["q_start"] = 6
    past = attend(q, k, v, key_mask=ints, **kwargs)
    for q_start in (5, 7, 2**40, 2**80):  # query 0 at position >= Tk - 1 = 5
        kwargs["q_start"] = q_start
        np.testing.assert_array_equal(attend(q, k, v, key_mask=ints, **kwargs), past)
    np.testing.assert_allclose(past, attend(q, k, v, key_mask=ints, **(kwargs | dict(causal=False))),
                               rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", BAD_INPUT_BACKENDS)
def test_softmax_over_the_last_axis_is_the_reference(name):
    """Backend.softmax (the golden softmax op runs it too) equals ops.softmax, -inf entries included."""
    be = get_backend(name)
    dtype = np.float64 if "float64" in be.dtypes else np.float32
    x = np.random.default_rng(4).standard_normal((3, 5, 300)).astype(dtype) * 30
    x[0, 0, :7] = -np.inf
    got = be.to_numpy(be.softmax(be.asarray(x)))
    np.testing.assert_allclose(got, ops.softmax(x, axis=-1), rtol=8 * np.finfo(dtype).eps, atol=0)
    assert (got[0, 0, :7] == 0).all()


def test_backend_names_must_be_strings():
    with pytest.raises(ValueError, match=r"backend must be one of \['numba', 'numpy', 'opencl'\], got \['numpy'\]"):
        get_backend(["numpy"])

"""Backend registry: names, clean unavailability, and (in CI) that the required backends really run."""

import os

import numpy as np
import pytest

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


@pytest.mark.parametrize("name", os.environ.get("REFSLM_REQUIRE_BACKENDS", "numpy").split())
def test_required_backend_is_available(name):
    """CI sets REFSLM_REQUIRE_BACKENDS so that a backend cannot silently skip all its tests."""
    assert name in available_backends(), f"backend {name!r} is required here but unavailable"


@pytest.mark.parametrize("name", available_backends())
def test_linear_adds_the_residual_last(name):
    """linear(x, W, b, residual) = (x W^T + b) + residual with the rounding of the two separate ops."""
    be = get_backend(name)
    rng = np.random.default_rng(7)
    x, w, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    residual = 1e3 * rng.standard_normal((2, 3, 4))  # large: a residual added before the bias would round differently
    dtype = np.float32 if "float64" not in be.dtypes else np.float64
    x, w, b, residual = (a.astype(dtype) for a in (x, w, b, residual))
    got = be.to_numpy(be.linear(*(be.asarray(a) for a in (x, w, b, residual))))
    plain = be.to_numpy(be.linear(*(be.asarray(a) for a in (x, w, b))))
    np.testing.assert_array_equal(got, plain + residual)
    with pytest.raises(ValueError, match="residual must have the output shape"):
        be.linear(*(be.asarray(a) for a in (x, w, b, x)))

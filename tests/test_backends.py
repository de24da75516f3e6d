"""Backend registry: names, clean unavailability, and (in CI) that the required backends really run."""

import os

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

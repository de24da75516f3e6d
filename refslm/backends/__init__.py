"""Backend registry: backends are chosen by name and imported lazily.

`get_backend("numpy" | "numba" | "opencl")` returns an instance; `available_backends()` lists the
names whose optional packages are installed and usable. A backend whose package is missing raises
BackendUnavailable with the reason, never an ImportError from deep inside.
"""

from __future__ import annotations

import importlib

from .base import Backend

_REGISTRY = {
    "numpy": ("refslm.backends.numpy_backend", "NumpyBackend"),
    "numba": ("refslm.backends.numba_backend", "NumbaBackend"),
    "opencl": ("refslm.backends.opencl_backend", "OpenCLBackend"),
}
_INSTANCES: dict[str, Backend] = {}


class BackendUnavailable(RuntimeError):
    """The named backend cannot run here (package missing, no device, kernel build failure)."""


def backend_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_backend(name: str | Backend = "numpy") -> Backend:
    """The backend instance for a name (instances are cached), or the instance itself if given one."""
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"backend must be one of {sorted(_REGISTRY)}, got {name!r}")
    if name not in _INSTANCES:
        module_name, class_name = _REGISTRY[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise BackendUnavailable(f"backend {name!r} is not available: {exc}") from exc
        _INSTANCES[name] = getattr(module, class_name)()
    return _INSTANCES[name]


def available_backends() -> list[str]:
    """Names of the backends that can be instantiated here."""
    names = []
    for name in _REGISTRY:
        try:
            get_backend(name)
        except BackendUnavailable:
            continue
        names.append(name)
    return names


__all__ = ["Backend", "BackendUnavailable", "available_backends", "backend_names", "get_backend"]

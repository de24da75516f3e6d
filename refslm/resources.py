"""Where the files the package reads at run time live: kernel sources and the golden suite.

In an installed wheel they are packaged under refslm/_data/ (see pyproject.toml force-include);
in a source checkout (editable install or PYTHONPATH) they are the top-level kernels/ and golden/.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _find(installed: Path, checkout: Path) -> Path:
    if installed.exists():
        return installed
    if checkout.exists():
        return checkout
    raise FileNotFoundError(f"neither {installed} nor {checkout} exists: is refslm installed completely?")


def kernels_dir() -> Path:
    """Directory holding kernels/opencl/*.cl."""
    return _find(_PACKAGE / "_data" / "kernels", _PACKAGE.parent / "kernels")


def golden_dir() -> Path:
    """Directory holding manifest.json and cases/*.safetensors."""
    return _find(_PACKAGE / "_data" / "golden", _PACKAGE.parent / "golden")

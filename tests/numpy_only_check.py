"""Run by .ci/run in a venv holding only numpy and refslm (installed from the wheel, not the checkout).

Checks that no optional package is present, that refslm imports from site-packages, and that the
NumPy path computes.
"""

import importlib.util
import sys

import numpy as np

import refslm
from refslm import ops

for optional in ("numba", "pyopencl", "safetensors", "tokenizers", "torch", "hypothesis"):
    assert importlib.util.find_spec(optional) is None, f"{optional} should not be installed in this venv"
assert "site-packages" in refslm.__file__, f"refslm imported from {refslm.__file__}, not the installed wheel"

rng = np.random.default_rng(0)
q = rng.standard_normal((1, 4, 5, 8))
kv = rng.standard_normal((1, 2, 5, 8))
out = ops.attention(q, kv, kv, causal=True)
assert out.shape == (1, 4, 5, 8) and np.isfinite(out).all()
print("numpy-only install OK:", refslm.__file__, file=sys.stderr)

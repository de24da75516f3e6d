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

from refslm import generate, models  # noqa: E402
from refslm.config import tiny_decoder_only, tiny_encoder_decoder  # noqa: E402

ed = refslm.init(tiny_encoder_decoder(), seed=0, dtype="float64")
enc = np.array([[1, 5, 6, 7, 0], [1, 8, 9, 10, 11]])
dec = np.array([[1, 20, 21], [1, 30, 31]])
assert ed.logits(enc, dec).shape == (2, 3, 512)
# n_embd 64 a multiple of n_head (save refuses a Llama that transformers cannot load)
llama = tiny_decoder_only(layout="llama", is_interleaved=True, qkv_embd=None, n_head=4, n_kv_head=2, head_dim=12)
do = models.init(llama, seed=0, dtype="float64")
assert do.logits(dec).shape == (2, 3, 512)
new = ed.generate(enc, 4, seed=1, top_k=50)
assert new.shape == (2, 4) and new.dtype == np.int64
decoder = generate.CachedDecoder(ed, enc, 4)
decoder.step(new[:, 0])
full = ed.logits(enc, np.concatenate([np.ones((2, 1), np.int64), new[:, :1]], axis=1))[:, -1]
assert np.abs(decoder.logits - full).max() < 1e-12 * np.abs(full).max(), "cached logits differ from recomputed"
# checkpoints through the built-in safetensors reader/writer (no safetensors package here), bf16 too
import tempfile  # noqa: E402

for storage in ("float32", "bfloat16"):
    with tempfile.TemporaryDirectory() as directory:
        refslm.save(do, directory, storage=storage)
        again = refslm.load(directory, dtype="float64")
        assert again.params.keys() == do.params.keys()
        if storage == "float32":
            assert all(np.array_equal(again.params[k], do.params[k].astype(np.float32)) for k in do.params)

# the golden suite shipped in the wheel verifies on the NumPy backend
from refslm.cli import main  # noqa: E402

assert main(["verify", "--backend", "numpy", "--dtype", "float64"]) == 0
print("numpy-only install OK:", refslm.__file__, file=sys.stderr)

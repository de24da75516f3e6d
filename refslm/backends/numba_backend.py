"""The "numba" backend: the NumPy reference's contract, with fused parallel kernels (numba JIT).

Data movement, embedding and GEMMs are NumPy's (inherited): OpenBLAS already runs GEMMs near this
machine's peak. RMSNorm, RoPE, activations and gated units are one pass each
(numba_elementwise), attention is one fused online-softmax kernel (numba_attention) and loss_rows
one fused value + gradient pass per row (numba_losses). Kernels compile on first use for the
dtypes and layouts actually seen and are cached on disk (cache=True), so a second process loads
them instead of compiling. Importing this module needs numba; refslm.backends reports a missing
numba as BackendUnavailable.
"""

from __future__ import annotations

import os

import numpy as np

try:
    import numba
except ImportError as exc:  # the registry turns this into BackendUnavailable
    raise ImportError(f"numba is not installed ({exc}); install the extra: pip install 'refslm[numba]'") from exc

from .. import losses, ops
from .numba_attention import attention_kernel, attention_rows_kernel
from .numba_elementwise import activation_kernel, gated_kernel, rmsnorm_kernel, rope_kernel
from .numba_losses import KIND_CODES, loss_rows_kernel
from .numpy_backend import NumpyBackend

if "NUMBA_THREADING_LAYER" not in os.environ:
    # OpenMP workers spin between kernels and fight OpenBLAS's threads for the cores; workqueue
    # workers sleep. Measured on 2 cores (330M first token): 0.79x of NumPy with omp, 1.11x with
    # workqueue. Set NUMBA_THREADING_LAYER to choose another layer.
    numba.config.THREADING_LAYER = "workqueue"

_NO_KEY_MASK = np.zeros((0, 0), dtype=np.uint8)
_NO_SEGMENTS = np.zeros((0, 0), dtype=np.int32)
ROWS_KERNEL_MAX_QUERIES = 8  # fewer queries than this (decode steps) go to the row-at-a-time attention kernel


def _flat(x: np.ndarray) -> np.ndarray:
    """[...] -> [M] contiguous (a view when x is already contiguous)."""
    return np.ascontiguousarray(x).reshape(-1)


class NumbaBackend(NumpyBackend):
    """NumPy arrays in and out; fused numba kernels for the memory-bound and softmax-bound ops."""

    name = "numba"
    dtypes = ("float32", "float64")

    def rmsnorm(self, x, weight, eps, unit_offset=False):
        """[..., C], [C] -> [..., C]; see ops.rmsnorm (the sum of squares accumulates in float64)."""
        eps = ops.check_rmsnorm(x, weight, eps)
        rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
        out = np.empty_like(rows)
        rmsnorm_kernel(rows.size, rows, weight, eps, bool(unit_offset), out)
        return out.reshape(x.shape)

    def activation(self, x, kind):
        """Elementwise 'gelu_tanh' | 'gelu_erf' | 'silu' in one pass."""
        code = ops.activation_code(kind)
        ops.check_float(f"{kind} x", x)
        out = np.empty(x.shape, x.dtype)
        activation_kernel(x.size, _flat(x), code, out.reshape(-1))
        return out

    def gated(self, gate, up, kind):
        """act(gate) * up in one pass (SwiGLU / GeGLU)."""
        code = ops.activation_code(kind)
        ops.check_gated(gate, up)
        out = np.empty(gate.shape, gate.dtype)
        gated_kernel(gate.size, _flat(gate), _flat(up), code, out.reshape(-1))
        return out

    def rope(self, x, cos, sin, layout):
        """x [B, H, T, D], cos/sin [B or 1, T, D] -> rotated x; see ops.apply_rope."""
        ops.check_rope(x, cos, sin, layout)
        out = np.empty(x.shape, x.dtype)
        c = np.ascontiguousarray(cos, dtype=x.dtype)
        s = np.ascontiguousarray(sin, dtype=x.dtype)
        rope_kernel(x.size, x, c, s, layout == "interleaved", out)
        return out

    def attention(self, q, k, v, *, key_mask, causal, q_start, interleaved, mask_fill, segment_ids=None):
        """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] -> [B, Hq, Tq, D]; one fused kernel, see ops.attention."""
        key_mask, q_start, segments = ops.check_attention(q, k, v, key_mask=key_mask, q_start=q_start,
                                                          mask_fill=mask_fill, segment_ids=segment_ids)
        mask = _NO_KEY_MASK if key_mask is None else np.ascontiguousarray(key_mask, dtype=np.uint8)
        out = np.empty(q.shape, q.dtype)
        kernel = attention_rows_kernel if q.shape[2] < ROWS_KERNEL_MAX_QUERIES else attention_kernel
        kernel(q.size * k.shape[2], q, k, v, mask, _NO_SEGMENTS if segments is None else segments, bool(causal),
               q_start, bool(interleaved), mask_fill == "finite_min", out)
        return out

    def loss_rows(self, kind, student, teacher, targets, row_weight, *, temperature, beta, label_smoothing,
                  grad_out=None):
        """Per-row losses and the gradient of their weighted sum; see refslm.losses.loss_rows."""
        student, teacher, targets, row_weight = losses.check_rows(
            kind, student, teacher, targets, row_weight, temperature, beta, label_smoothing, grad_out)
        kind = losses.plain_kind(kind, beta)
        n, vocab = student.shape
        grad = losses.rows_grad(student, grad_out)
        values = np.empty(n)
        student_lse = np.empty(n)
        teacher_lse = np.empty(n)
        loss_rows_kernel(student.size, KIND_CODES[kind], student, student[:0] if teacher is None else teacher,
                         np.zeros(n, np.int64) if targets is None else targets, row_weight, float(temperature),
                         float(beta), float(label_smoothing), grad, values, student_lse, teacher_lse,
                         max(1, min(n, 4 * numba.get_num_threads())))
        losses.check_logsumexp(student_lse, "student", row_weight)
        if kind != "cross_entropy":  # a teacher given to cross_entropy is ignored, as by every backend
            losses.check_logsumexp(teacher_lse, "teacher", row_weight)
        return values, grad

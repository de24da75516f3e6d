"""Row-wise and elementwise kernels of the numba backend: RMSNorm, RoPE, activations, gated units.

Each is one parallel pass over memory where the NumPy reference makes several; the element math
runs in float64 and is rounded once to the output dtype (float64 inputs: the reference's formula).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .numba_math import ParallelKernel, exp_coefficients, sigmoid, tanh_from_exp

_GELU_TANH, _GELU_ERF, _SILU = range(3)  # refslm.ops.ACTIVATION_CODES
_GELU_TANH_C = math.sqrt(2.0 / math.pi)


@njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def _sum_squares(row):
    """sum(row^2) accumulated in float64 (order left to the vectoriser; the only flag is 'reassoc')."""
    total = 0.0
    for x in row:
        total += np.float64(x) * np.float64(x)
    return total


@ParallelKernel
def rmsnorm_kernel(x, weight, eps, unit_offset, out):
    """x [N, C], weight [C] -> out [N, C]: x / sqrt(mean(x^2) + eps) (cast to x's dtype) * w (or 1 + w)."""
    n, c = x.shape
    dtype = out.dtype.type
    for i in prange(n):
        rms = math.sqrt(_sum_squares(x[i]) / c + eps)
        for j in range(c):
            scale = dtype(1.0 + weight[j]) if unit_offset else weight[j]
            out[i, j] = dtype(x[i, j] / rms) * scale


@ParallelKernel
def rope_kernel(x, cos, sin, interleaved, out):
    """x [B, H, T, D], cos/sin [B or 1, T, D] in x's dtype -> out = x cos + rotate(x) sin.

    rotate: (-x2, x1) of the halves (rotate_half) or (-x1, x0) of each pair (interleaved).
    """
    n_batch, n_heads, t_len, d = x.shape
    half = d // 2
    for bh in prange(n_batch * n_heads):
        b, h = bh // n_heads, bh % n_heads
        cb = b if cos.shape[0] > 1 else 0
        for t in range(t_len):
            row, c, s, o = x[b, h, t], cos[cb, t], sin[cb, t], out[b, h, t]
            for j in range(d):
                if interleaved:
                    rotated = -row[j + 1] if j % 2 == 0 else row[j - 1]
                else:
                    rotated = -row[j + half] if j < half else row[j - half]
                o[j] = row[j] * c[j] + rotated * s[j]


@njit(cache=True, error_model="numpy")
def _gelu_tanh(x, coefficients):
    return 0.5 * x * (1.0 + tanh_from_exp(_GELU_TANH_C * (x + 0.044715 * x * x * x), coefficients))


@njit(cache=True, error_model="numpy")
def _gelu_erf(x, coefficients):
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


@njit(cache=True, error_model="numpy")
def _silu(x, coefficients):
    return x * sigmoid(x, coefficients)


@ParallelKernel
def activation_kernel(x, kind, out):
    """x [M] -> out [M]: act(x), in float64 rounded once (one loop per kind, so each vectorises)."""
    coefficients = exp_coefficients(out)
    if kind == _GELU_TANH:
        for i in prange(x.shape[0]):
            out[i] = _gelu_tanh(np.float64(x[i]), coefficients)
    elif kind == _GELU_ERF:
        for i in prange(x.shape[0]):
            out[i] = _gelu_erf(np.float64(x[i]), coefficients)
    else:
        for i in prange(x.shape[0]):
            out[i] = _silu(np.float64(x[i]), coefficients)


@ParallelKernel
def gated_kernel(gate, up, kind, out):
    """gate, up [M] -> out [M]: act(gate) * up (SwiGLU: silu, GeGLU: gelu), one pass."""
    dtype = out.dtype.type
    coefficients = exp_coefficients(out)
    if kind == _GELU_TANH:
        for i in prange(gate.shape[0]):
            out[i] = dtype(_gelu_tanh(np.float64(gate[i]), coefficients)) * up[i]
    elif kind == _GELU_ERF:
        for i in prange(gate.shape[0]):
            out[i] = dtype(_gelu_erf(np.float64(gate[i]), coefficients)) * up[i]
    else:
        for i in prange(gate.shape[0]):
            out[i] = dtype(_silu(np.float64(gate[i]), coefficients)) * up[i]

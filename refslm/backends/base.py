"""The backend interface: the small set of kernels that models and losses are written against.

A backend owns its array type (NumPy arrays for "numpy" and "numba"; device buffers for "opencl").
Models call only these methods, never branch on the backend, and convert with `asarray` /
`to_numpy` at their edges. Every method documents shapes; dtypes are float32 or float64 unless
noted (a backend may support only float32, and says so in `dtypes`). Arguments are validated by the
shared checks of refslm.ops (check_rmsnorm, check_rope, check_attention, ...: shapes, dtypes and
scalars only, never a scan of a large tensor), so every backend rejects the same input with the
same TypeError / ValueError.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import ops

Array = Any  # the backend's array type


class Backend:
    """Interface. Subclasses implement every method but `weight` and `rope_store_kv`, whose defaults are
    built from the others; `NumpyBackend` is the definition."""

    name: str = "abstract"
    dtypes: tuple[str, ...] = ("float32", "float64")

    # ---- data movement
    def asarray(self, x: np.ndarray) -> Array:
        """Host array -> backend array of the same dtype."""
        raise NotImplementedError

    def weight(self, x: np.ndarray) -> Array:
        """A model weight -> backend array, once at model build. The default is asarray; a backend may
        store weights in a narrower type (the opencl backend's weight_storage='float16')."""
        return self.asarray(x)

    def to_numpy(self, x: Array) -> np.ndarray:
        """Backend array -> host NumPy array."""
        raise NotImplementedError

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Array:
        """Uninitialised array (used for KV caches)."""
        raise NotImplementedError

    def write_time(self, buf: Array, x: Array, start: int) -> None:
        """buf [..., Tmax, D] <- x [..., T, D] at time positions start..start+T-1 (in place)."""
        raise NotImplementedError

    def time_slice(self, x: Array, start: int, stop: int) -> Array:
        """[..., T, D] -> [..., stop-start, D] (a view where the backend can)."""
        raise NotImplementedError

    # ---- dense ops
    def embedding(self, ids: np.ndarray, table: Array) -> Array:
        """ids [B, T] int64 (host), table [V, C] -> [B, T, C]."""
        raise NotImplementedError

    def linear(self, x: Array, weight: Array, bias: Array | None = None, residual: Array | None = None,
               activation: str | None = None) -> Array:
        """[..., in], [out, in], [out], [..., out] -> [..., out] = act(x W^T + bias) + residual.

        activation ('gelu_tanh' | 'gelu_erf' | 'silu', or None) is the activation that follows the
        projection (Mu's MLP up-projection); residual is the block's residual stream, added last (the
        residual connection fused into the projection that ends each sub-layer). Each is one kernel
        fewer on a device, with the rounding of the separate ops."""
        raise NotImplementedError

    def rmsnorm(self, x: Array, weight: Array, eps: float, unit_offset: bool = False) -> Array:
        """[..., C], [C] -> [..., C]; see ops.rmsnorm."""
        raise NotImplementedError

    def activation(self, x: Array, kind: str) -> Array:
        """Elementwise 'gelu_tanh' | 'gelu_erf' | 'silu'."""
        raise NotImplementedError

    def gated(self, gate: Array, up: Array, kind: str) -> Array:
        """act(gate) * up (SwiGLU: kind 'silu'; GeGLU: 'gelu_tanh' / 'gelu_erf')."""
        raise NotImplementedError

    def softmax(self, x: Array) -> Array:
        """[..., N] -> [..., N]: softmax over the last axis; see ops.softmax. (Not called by the models,
        whose softmax lives inside attention and the losses; the golden softmax op checks it.)"""
        raise NotImplementedError

    # ---- attention
    def split_heads(self, x: Array, n_head: int) -> Array:
        """[B, T, H*D] -> [B, H, T, D]."""
        raise NotImplementedError

    def merge_heads(self, x: Array) -> Array:
        """[B, H, T, D] -> [B, T, H*D]."""
        raise NotImplementedError

    def rope(self, x: Array, cos: np.ndarray, sin: np.ndarray, layout: str) -> Array:
        """x [B, H, T, D] (D even), cos/sin [B or 1, T, D] float host arrays -> rotated x; see ops.apply_rope."""
        raise NotImplementedError

    def rope_store_kv(self, q: Array, k: Array, v: Array, cos: np.ndarray, sin: np.ndarray, layout: str,
                      cache_k: Array, cache_v: Array, start: int) -> Array:
        """A cached step's RoPE and KV-cache writes: q [B, Hq, T, D] -> rotated q; rope(k) and v [B, Hkv, T, D]
        are written into cache_k / cache_v [B, Hkv, capacity, D] (two distinct arrays, as `empty` gives
        them) at times start..start+T-1 (in place).

        Defined by rope and write_time (this default); a device backend fuses it into one launch."""
        ops.check_rope_store_kv(q, k, v, cos, sin, layout, cache_k, cache_v, start)
        self.write_time(cache_k, self.rope(k, cos, sin, layout), start)
        self.write_time(cache_v, v, start)
        return self.rope(q, cos, sin, layout)

    def attention(self, q: Array, k: Array, v: Array, *, key_mask: np.ndarray | None, causal: bool,
                  q_start: int, interleaved: bool, mask_fill: str, segment_ids: np.ndarray | None = None) -> Array:
        """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] (Hkv divides Hq, Tk >= 1), key_mask [B, Tk] bool (or 0/1
        integers) host or None, q_start an int >= 0, segment_ids [B, Tk] int host or None -> [B, Hq, Tq, D].

        See ops.attention for the exact semantics (mask, segments, scale, GQA order, fully masked rows).
        """
        raise NotImplementedError

    # ---- losses
    def loss_rows(self, kind: str, student: Array, teacher: Array | None, targets: np.ndarray | None,
                  row_weight: np.ndarray, *, temperature: float, beta: float, label_smoothing: float,
                  grad_out: Array | None = None) -> tuple[np.ndarray, Array]:
        """Per-row losses and the gradient of their weighted sum; see refslm.losses.loss_rows.

        student [N, V]; teacher [N, V] (divergences) or None; targets [N] int64 (cross_entropy) or
        None; row_weight [N] float64. Returns (values [N] float64, grad [N, V]) with
        grad[i] = row_weight[i] * d values[i] / d student[i].
        """
        raise NotImplementedError

"""The "numpy" backend: the reference definition, delegating to refslm.ops and refslm.losses."""

from __future__ import annotations

import numpy as np

from .. import ops
from .base import Backend


class NumpyBackend(Backend):
    name = "numpy"
    dtypes = ("float32", "float64")

    def asarray(self, x):
        return np.asarray(x)

    def to_numpy(self, x):
        return np.asarray(x)

    def empty(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def write_time(self, buf, x, start):
        ops.check_write_time(buf, x, start)
        buf[..., start:start + x.shape[-2], :] = x

    def time_slice(self, x, start, stop):
        ops.check_time_slice(x, start, stop)
        return x[..., start:stop, :]

    def embedding(self, ids, table):
        return ops.embedding(ids, table)

    def linear(self, x, weight, bias=None, residual=None, activation=None):
        ops.check_linear(x, weight, bias, residual, activation)
        y = ops.linear(x, weight, bias)  # (checks x, weight and bias again: ~1 us)
        if activation is not None:
            y = self.activation(y, activation)  # the backend's own activation (numba: its kernel)
        if residual is not None:
            y += residual  # y is a fresh array
        return y

    def softmax(self, x):
        return ops.softmax(x, axis=-1)

    def rmsnorm(self, x, weight, eps, unit_offset=False):
        return ops.rmsnorm(x, weight, eps, unit_offset)

    def activation(self, x, kind):
        return ops.activation(x, kind)

    def gated(self, gate, up, kind):
        return ops.gated(gate, up, kind)

    def split_heads(self, x, n_head):
        return ops.split_heads(x, n_head)

    def merge_heads(self, x):
        return ops.merge_heads(x)

    def rope(self, x, cos, sin, layout):
        return ops.apply_rope(x, cos, sin, layout)

    def attention(self, q, k, v, *, key_mask, causal, q_start, interleaved, mask_fill, segment_ids=None):
        return ops.attention(q, k, v, key_mask=key_mask, causal=causal, q_start=q_start,
                             interleaved=interleaved, mask_fill=mask_fill, segment_ids=segment_ids)

    def loss_rows(self, kind, student, teacher, targets, row_weight, *, temperature, beta,
                  label_smoothing, grad_out=None):
        from .. import losses

        return losses.loss_rows(kind, student, teacher, targets, row_weight, temperature=temperature,
                                beta=beta, label_smoothing=label_smoothing, grad_out=grad_out)

"""A backend that counts the matmul FLOPs a model executes, from the shapes of the arrays it is given.

`CountingBackend(config, inner)` delegates every kernel to `inner` (a Backend or its name) and
adds to `counts` what `linear` and `attention` cost under the convention of `refslm.flops`
(2*m*n*k per GEMM; attention scores and weighted values over every key it is given). A model built
on it runs exactly as on `inner`, so comparing `counts` with the analytic `refslm.flops` numbers
checks the formulas against what the model really does.

Linear maps are assigned to a component by the weight's shape: [V, C] is the head, a shape with
F (or 2F, Phi-3's fused gate_up) on one side is the MLP, anything else an attention projection.
The constructor refuses configs whose widths make that ambiguous.
"""

from __future__ import annotations

import math

from ..backends import Backend, get_backend
from ..flops import COMPONENTS, Config, Flops, gemm


class CountingBackend(Backend):
    """Delegates to `inner`; `counts` holds the FLOPs of linear and attention calls by component."""

    def __init__(self, config: Config, inner: Backend | str = "numpy") -> None:
        self.inner = get_backend(inner)
        self.name = f"counting({self.inner.name})"
        self.dtypes = self.inner.dtypes
        c, f, v = config.n_embd, config.hidden_dim, config.vocab_size
        q, kv = config.qkv_width, config.n_kv_head * config.resolved_head_dim
        mlp_sides = {f, 2 * f}
        other_sides = {c, q, kv, q + 2 * kv, v}
        if mlp_sides & other_sides or v in {q, kv, q + 2 * kv}:
            raise ValueError(
                f"config widths are ambiguous for counting: hidden_dim {f} (or 2x) and vocab_size {v} must differ "
                f"from n_embd {c}, query width {q}, key/value width {kv} and their fused sum {q + 2 * kv}"
            )
        self._head_shape = (v, c)
        self._mlp_sides = mlp_sides
        self.reset()

    def reset(self) -> None:
        """Zero the counts."""
        self.counts = dict.fromkeys(COMPONENTS, 0)

    @property
    def flops(self) -> Flops:
        """The counts so far as a Flops record."""
        return Flops(**self.counts)

    def _component(self, weight_shape: tuple[int, ...]) -> str:
        if tuple(weight_shape) == self._head_shape:
            return "head"
        if self._mlp_sides & set(weight_shape):
            return "mlp"
        return "projections"

    def linear(self, x, weight, bias=None, residual=None, activation=None):
        """Backend.linear (epilogue activation and residual included); counts 2 * rows * in * out."""
        out_features, in_features = weight.shape
        rows = math.prod(x.shape[:-1])
        self.counts[self._component(weight.shape)] += gemm(rows, out_features, in_features)
        return self.inner.linear(x, weight, bias, residual, activation)

    def attention(self, q, k, v, *, key_mask, causal, q_start, interleaved, mask_fill, segment_ids=None):
        """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D]; counts 2*B*Hq*Tq*Tk*D for scores and for values."""
        b, hq, tq, d = q.shape
        tk = k.shape[2]
        self.counts["attention"] += gemm(b * hq * tq, tk, d) + gemm(b * hq * tq, v.shape[3], tk)
        return self.inner.attention(q, k, v, key_mask=key_mask, causal=causal, q_start=q_start,
                                    interleaved=interleaved, mask_fill=mask_fill, segment_ids=segment_ids)


def _delegate(name: str):
    def method(self, *args, **kwargs):
        return getattr(self.inner, name)(*args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"Delegates to the wrapped backend's `{name}` (not counted)."
    return method


for _name, _value in vars(Backend).items():
    if callable(_value) and not _name.startswith("_") and _name not in vars(CountingBackend):
        setattr(CountingBackend, _name, _delegate(_name))

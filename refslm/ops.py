"""The NumPy reference ops: small pure functions, shapes in their docstrings.

Every function computes in the floating dtype of its inputs (float32 or float64); SPEC.md section
"Ops" is the normative definition. Nothing here imports an optional package. Bad arguments raise
TypeError / ValueError naming them, from the check_* functions beside each op, which every backend
calls too (so all backends reject the same input with the same message).

Shape letters: B batch, T time (Tq queries, Tk keys), C model width, H heads (Hq query heads,
Hkv key/value heads), D head_dim, V vocabulary, F MLP hidden width.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .config import MASK_FILLS, ROPE_LAYOUTS, is_real

FLOAT_DTYPES = (np.float32, np.float64)
GELU_TANH_C = math.sqrt(2.0 / math.pi)


# ---------------------------------------------------------------- argument checks
# Shared by every backend and cheap: of the backend's arrays they read only .shape and .dtype (a device array
# passes as well as a NumPy one); the small host index arrays (ids, key_mask, segment_ids) are scanned.


def check_float(name: str, x, like=None) -> None:
    """Raise TypeError unless x is a float32 or float64 array (of like's dtype, when like is given)."""
    dtype = getattr(x, "dtype", None)
    if getattr(dtype, "type", None) not in FLOAT_DTYPES or isinstance(x, np.generic) or not hasattr(x, "shape"):
        got = dtype if dtype is not None and not isinstance(x, np.generic) else type(x).__name__
        raise TypeError(f"{name} must be a float32 or float64 ndarray, got {got}")
    if like is not None and dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of the other operands ({like.dtype}), got {dtype}")


def check_real(name: str, value) -> float:
    """A real number (Python or NumPy int or float, not bool) -> float; TypeError naming it otherwise."""
    if type(value) is float:  # (isinstance against numbers.Real is slow: the common case first)
        return value
    if not is_real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float range
        return math.inf


def check_number(name: str, value, minimum: float = 0.0) -> float:
    """A finite real number > minimum -> float; TypeError / ValueError naming it otherwise."""
    v = check_real(name, value)
    if not minimum < v < math.inf:  # (False for NaN)
        raise ValueError(f"{name} must be a finite number > {minimum:g}, got {value!r}")
    return v


def check_int(name: str, value, low: int | None, high: int | None = None) -> int:
    """An int (Python or NumPy, not bool) in [low, high) (no bound where None) -> int: lengths, counts,
    positions, token ids, seeds. TypeError naming it for another type, ValueError out of range."""
    expected = ("" if low is None else f" >= {low}") if high is None else f" in [{low}, {high})"
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be an int{expected}, got {value!r} ({type(value).__name__})")
    if (low is not None and value < low) or (high is not None and value >= high):
        raise ValueError(f"{name} must be an int{expected}, got {value!r}")
    return int(value)


def check_bool(name: str, value) -> bool:
    """True or False (Python bools only: a string such as "no", an int or a NumPy bool is no answer) -> value;
    TypeError naming it otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


# ---------------------------------------------------------------- normalisation and activations


def check_rmsnorm(x, weight, eps) -> float:
    """x [..., C], weight [C] of one float dtype, eps a finite number > 0 -> float(eps)."""
    check_float("rmsnorm x", x)
    check_float("rmsnorm weight", weight, like=x)
    if len(x.shape) < 1 or weight.shape != x.shape[-1:]:
        raise ValueError(f"rmsnorm weight must have shape (C,) for x [..., C], got weight {weight.shape}, x {x.shape}")
    return check_number("rmsnorm eps", eps)


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, unit_offset: bool = False) -> np.ndarray:
    """[..., C], [C] -> [..., C]: x / sqrt(mean(x^2) + eps) * w  (w replaced by 1 + w if unit_offset).

    The normalisation runs in x's dtype (float32 or float64), then the weight multiply; public Mu and
    Hugging Face code normalise in float32 even for a float64 model.
    """
    eps = check_rmsnorm(x, weight, eps)
    normed = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return normed * ((1.0 + weight) if unit_offset else weight)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """[...] -> [...]: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), evaluated in that order, in place."""
    check_float("gelu_tanh x", x)
    y = x * x
    y *= x
    y *= x.dtype.type(0.044715)
    y += x
    y *= x.dtype.type(GELU_TANH_C)
    np.tanh(y, out=y)
    y += 1
    y *= x
    y *= 0.5
    return y


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """[...] -> [...]: 0.5 x (1 + erf(x / sqrt(2))) (exact GELU; erf from math.erf, correctly rounded)."""
    check_float("gelu_erf x", x)
    e = _erf(x.astype(np.float64) / math.sqrt(2.0)).astype(np.float64).astype(x.dtype)
    return 0.5 * x * (1.0 + e)


def silu(x: np.ndarray) -> np.ndarray:
    """[...] -> [...]: x * sigmoid(x), evaluated without overflow for large |x|."""
    check_float("silu x", x)
    return x * sigmoid(x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """[...] -> [...]: 1 / (1 + exp(-x)), stable for both signs."""
    check_float("sigmoid x", x)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


ACTIVATIONS = {"gelu_tanh": gelu_tanh, "gelu_erf": gelu_erf, "silu": silu}
ACTIVATION_CODES = {kind: code for code, kind in enumerate(ACTIVATIONS)}  # the kernels' codes (common.h ACT_*)


def activation_code(kind: str) -> int:
    """An activation kind -> its kernel code; ValueError naming the kinds otherwise (every backend's check)."""
    if not isinstance(kind, str) or kind not in ACTIVATION_CODES:
        raise ValueError(f"activation kind must be one of {sorted(ACTIVATIONS)}, got {kind!r}")
    return ACTIVATION_CODES[kind]


def activation(x: np.ndarray, kind: str) -> np.ndarray:
    """[...] -> [...]: the activation named kind ('gelu_tanh', 'gelu_erf', 'silu')."""
    activation_code(kind)
    return ACTIVATIONS[kind](x)


def check_gated(gate, up) -> None:
    """gate and up: float arrays of one dtype and one shape."""
    check_float("gated gate", gate)
    check_float("gated up", up, like=gate)
    if up.shape != gate.shape:
        raise ValueError(f"gated up must have gate's shape {gate.shape}, got {up.shape}")


def gated(gate: np.ndarray, up: np.ndarray, kind: str) -> np.ndarray:
    """[..., F], [..., F] -> [..., F]: act(gate) * up. SwiGLU is kind='silu', GeGLU 'gelu_tanh'/'gelu_erf'."""
    check_gated(gate, up)
    return activation(gate, kind) * up


def check_softmax(x, axis: int, name: str = "softmax x") -> None:
    """x: a float array with at least one entry along axis (an int in [-ndim, ndim))."""
    check_float(name, x)
    if not isinstance(axis, numbers.Integral) or not -x.ndim <= axis < x.ndim or x.shape[axis] == 0:
        raise ValueError(f"{name} needs an axis in [-{x.ndim}, {x.ndim}) with at least one entry, got axis {axis!r} "
                         f"of shape {x.shape}")


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """[...] -> [...]: exp(x - max) / sum exp(x - max). Rows of all -inf give NaN (undefined)."""
    check_softmax(x, axis)
    m = np.max(x, axis=axis, keepdims=True)
    e = x - m
    np.exp(e, out=e)
    e /= np.sum(e, axis=axis, keepdims=True)
    return e


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """[...] -> [...]: (x - max) - log sum exp(x - max). -inf entries stay -inf.

    Subtracting the max first keeps full relative precision when |max| is large (logits ~1e4).
    """
    check_softmax(x, axis, "log_softmax x")
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


# ---------------------------------------------------------------- linear maps


def check_linear(x, weight, bias=None, residual=None, activation=None, half_weight=False) -> None:
    """x [..., in >= 1], weight [out, in], bias [out] or None: float arrays of one dtype (weight may be
    float16 when half_weight: a backend's half weight storage); the backends' fused epilogue: an
    activation kind or None, a residual [..., out] or None."""
    check_float("linear x", x)
    if not (half_weight and weight.dtype == np.float16):
        check_float("linear weight", weight, like=x)
    if bias is not None:
        check_float("linear bias", bias, like=x)
    if len(weight.shape) != 2 or len(x.shape) < 1 or x.shape[-1] != weight.shape[1] or weight.shape[1] < 1 \
            or (bias is not None and bias.shape != weight.shape[:1]):
        raise ValueError(f"linear needs x [..., in >= 1], weight [out, in] and bias [out], got x {x.shape}, "
                         f"weight {weight.shape}, bias {None if bias is None else bias.shape}")
    if activation is not None:
        activation_code(activation)
    if residual is not None:
        check_float("linear residual", residual, like=x)
        if residual.shape != (*x.shape[:-1], weight.shape[0]):
            raise ValueError(f"linear: residual must have the output shape {(*x.shape[:-1], weight.shape[0])}, "
                             f"got {residual.shape}")


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """[..., in], [out, in], [out] -> [..., out]: x @ W^T + b (PyTorch Linear layout)."""
    check_linear(x, weight, bias)
    y = x @ weight.T
    if bias is not None:
        y += bias  # y is a fresh array
    return y


def check_token_ids(ids, vocab_size: int, name: str = "token ids") -> np.ndarray:
    """ids (any shape) -> int64 array; TypeError unless integer, ValueError naming the first id outside [0, V)."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0]
        raise ValueError(f"{name} holds token id {int(bad)} outside the vocabulary [0, {vocab_size})")
    return ids.astype(np.int64, copy=False)


def embedding(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """[B, T] int, [V, C] -> [B, T, C]: rows of the table. Ids outside [0, V) raise ValueError."""
    return table[check_embedding(ids, table)]


def check_embedding(ids, table, half_table: bool = False) -> np.ndarray:
    """table [V, C] float (float16 too when half_table: a backend's half weight storage), ids ints in
    [0, V) -> ids as int64 (check_token_ids)."""
    if not (half_table and getattr(table, "dtype", None) == np.float16):
        check_float("embedding table", table)
    if len(table.shape) != 2:
        raise ValueError(f"embedding table must have shape [V, C], got {table.shape}")
    return check_token_ids(ids, table.shape[0])


# ---------------------------------------------------------------- rotary position embedding


def check_layout(layout: str) -> None:
    """layout: 'rotate_half' or 'interleaved'."""
    if not isinstance(layout, str) or layout not in ROPE_LAYOUTS:
        raise ValueError(f"rope layout must be one of {ROPE_LAYOUTS}, got {layout!r}")


def check_head_dim(head_dim) -> int:
    """RoPE's D: an even int >= 2 (it rotates pairs of coordinates)."""
    if (type(head_dim) is not int and (isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral))) \
            or head_dim < 2 or head_dim % 2:
        raise ValueError(f"rope needs an even head_dim >= 2, got {head_dim!r}")
    return int(head_dim)


def check_rope(x, cos, sin, layout: str, name: str = "rope x") -> None:
    """x [B, H, T, D] float with D even, cos/sin [B or 1, T, D] float host arrays, a known layout (name: x's
    name in the messages)."""
    check_layout(layout)
    check_float(name, x)
    if len(x.shape) != 4:
        raise ValueError(f"{name} must have shape [B, H, T, D], got {x.shape}")
    b, _, t, d = x.shape
    check_head_dim(d)
    for label, table in (("rope cos", cos), ("rope sin", sin)):
        if not isinstance(table, np.ndarray):
            raise TypeError(f"{label} must be a host NumPy array (the tables are computed on the host), "
                            f"got {type(table).__name__}")
        check_float(label, table)
    if cos.shape != sin.shape or cos.ndim != 3 or cos.shape[0] not in (1, b) or cos.shape[1:] != (t, d):
        raise ValueError(f"rope cos/sin must have shape [1 or {b}, {t}, {d}], got {cos.shape} and {sin.shape}")


def rope_inv_freq(head_dim: int, theta: float, ext_factors: np.ndarray | None = None) -> np.ndarray:
    """-> [D/2] float64: theta^(-2j/D) for j = 0 .. D/2-1, divided by ext_factors [D/2] when given (longrope).

    D an even int >= 2, theta and every ext_factor finite and > 0 (else ValueError)."""
    head_dim, theta = check_head_dim(head_dim), check_number("rope theta", theta)
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if ext_factors is None:
        return inv_freq
    ext = np.asarray(ext_factors, dtype=np.float64)
    if ext.shape != inv_freq.shape:
        raise ValueError(f"ext_factors must have shape ({head_dim // 2},) (head_dim/2), got {ext.shape}")
    if not (np.isfinite(ext) & (ext > 0)).all():
        raise ValueError(f"ext_factors must be finite and > 0, got {ext}")
    return inv_freq / ext


def longrope_attention_factor(factor: float, original_max_position: int) -> float:
    """The longrope cos/sin scale: sqrt(1 + log(factor) / log(original_max_position)), 1 when factor <= 1.

    factor is the context extension max_position / original_max_position (Phi-3's default).
    """
    if check_number("longrope factor", factor) <= 1.0:
        return 1.0
    check_int("longrope original_max_position", original_max_position, 2)  # log(1) = 0 divides
    return math.sqrt(1.0 + math.log(factor) / math.log(original_max_position))


def check_ntk(head_dim: int, seq_len: int, factor: float, block_size: int) -> None:
    """seq_len an int >= 0, block_size an int >= 1, factor a finite number > 0; with factor > 1 (NTK
    active) an even head_dim > 2 (the exponent D / (D - 2))."""
    check_int("NTK seq_len", seq_len, 0)
    check_int("NTK block_size", block_size, 1)
    if check_number("NTK factor", factor) > 1.0 and check_head_dim(head_dim) == 2:
        raise ValueError("dynamic NTK RoPE needs head_dim > 2 (its exponent is D / (D - 2)), got 2")


def rope_theta_for_length(theta: float, head_dim: int, seq_len: int, factor: float, block_size: int) -> float:
    """Dynamic NTK base (Mu and HF 'dynamic'): unchanged unless factor > 1 and seq_len > block_size.

    L = max(seq_len, block_size); theta' = theta * (factor L / block_size - (factor - 1))^(D / (D - 2)).
    """
    check_ntk(head_dim, seq_len, factor, block_size)
    if factor <= 1.0:
        return theta
    length = max(seq_len, block_size)
    return theta * ((factor * length / block_size) - (factor - 1.0)) ** (head_dim / (head_dim - 2))


def centred_positions(length: int) -> np.ndarray:
    """-> [L] int64: p - (L-1)//2 for p in 0..L-1 (the public Mu encoder's bidirectional positions)."""
    return np.arange(check_int("centred_positions length", length, 0), dtype=np.int64) - (length - 1) // 2


def check_rope_tables(positions, layout: str, linear_factor: float, scale: float) -> np.ndarray:
    """positions integers or finite floats (-> an array), a known layout, linear_factor and scale finite
    numbers > 0 (rope_inv_freq checks head_dim, theta and the longrope factors)."""
    check_layout(layout)
    check_number("rope linear_factor", linear_factor)
    check_number("rope scale", scale)
    positions = np.asarray(positions)
    if positions.dtype.kind not in "iuf":
        raise TypeError(f"rope positions must be integers (or floats), got dtype {positions.dtype}")
    if positions.dtype.kind == "f" and not np.isfinite(positions).all():
        raise ValueError("rope positions must be finite")
    return positions


def rope_cos_sin(positions: np.ndarray, head_dim: int, theta: float, layout: str = "rotate_half",
                 linear_factor: float = 1.0, ext_factors: np.ndarray | None = None,
                 scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """[..., T] positions -> cos, sin [..., T, D] float64.

    angle[t, j] = (pos[t] / linear_factor) * inv_freq[j] (inv_freq from rope_inv_freq with the
    longrope ext_factors [D/2], if any). rotate_half repeats the D/2 angles as cat(a, a);
    interleaved repeats each angle twice (a0, a0, a1, a1, ...). Both tables are multiplied by scale
    (longrope's attention factor). positions are integers or finite floats; head_dim an even int >= 2;
    theta, linear_factor and scale finite numbers > 0 (else TypeError / ValueError naming them).
    """
    positions = check_rope_tables(positions, layout, linear_factor, scale)
    inv_freq = rope_inv_freq(head_dim, theta, ext_factors)
    angles = (positions.astype(np.float64) / linear_factor)[..., None] * inv_freq
    full = np.concatenate([angles, angles], axis=-1) if layout == "rotate_half" else np.repeat(angles, 2, axis=-1)
    return np.cos(full) * scale, np.sin(full) * scale  # exact when scale == 1


def rotate(x: np.ndarray, layout: str) -> np.ndarray:
    """[..., D] -> [..., D]: rotate_half: (-x2, x1) of the halves; interleaved: (-x1, x0) of each pair."""
    check_layout(layout)
    if layout == "rotate_half":
        half = x.shape[-1] // 2
        return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = np.empty_like(x)
    out[..., 0::2] = -x[..., 1::2]
    out[..., 1::2] = x[..., 0::2]
    return out


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, layout: str = "rotate_half") -> np.ndarray:
    """[B, H, T, D], cos/sin [B or 1, T, D] -> [B, H, T, D]: x cos + rotate(x) sin (in x's dtype)."""
    check_rope(x, cos, sin, layout)
    c = cos.astype(x.dtype, copy=False)[:, None]
    s = sin.astype(x.dtype, copy=False)[:, None]
    return x * c + rotate(x, layout) * s


# ---------------------------------------------------------------- attention


def check_split_heads(x, n_head: int) -> None:
    """x [B, T, H*D] float and n_head = H, an int >= 1 dividing the width."""
    check_float("split_heads x", x)
    check_int("split_heads n_head", n_head, 1)
    if len(x.shape) != 3 or x.shape[2] % n_head:
        raise ValueError(f"split_heads x must have shape [B, T, n_head*D] with n_head={n_head}, got {x.shape}")


def split_heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """[B, T, H*D] -> [B, H, T, D]."""
    check_split_heads(x, n_head)
    b, t, width = x.shape
    return x.reshape(b, t, n_head, width // n_head).transpose(0, 2, 1, 3)


def check_time_slice(x, start, stop) -> None:
    """x [..., T, D] and ints 0 <= start <= stop <= T (the KV cache's time window; Backend.time_slice)."""
    check_int("time_slice start", start, 0)
    check_int("time_slice stop", stop, 0)
    if len(x.shape) < 2 or not start <= stop <= x.shape[-2]:
        raise ValueError(f"time_slice: need x [..., T, D] and 0 <= start <= stop <= T, got x {x.shape}, {start}:{stop}")


def check_write_time(buf, x, start) -> None:
    """x [..., T, D] fits buf [..., Tmax, D] of its dtype at times start..start+T-1 (Backend.write_time)."""
    check_int("write_time start", start, 0)
    check_float("write_time x", x)
    check_float("write_time buf", buf, like=x)
    if len(x.shape) < 2 or buf.shape[:-2] != x.shape[:-2] or buf.shape[-1] != x.shape[-1] \
            or start + x.shape[-2] > buf.shape[-2]:
        raise ValueError(f"write_time: x {x.shape} does not fit buf {buf.shape} at time {start}")


def check_rope_store_kv(q, k, v, cos, sin, layout: str, cache_k, cache_v, start) -> None:
    """Backend.rope_store_kv: q [B, Hq, T, D] and k, v [B, Hkv, T, D] of one dtype with RoPE tables for them
    (check_rope), k and v fitting the caches cache_k, cache_v [B, Hkv, capacity, D] at start (check_write_time)."""
    check_rope(q, cos, sin, layout, "rope_store_kv q")
    check_rope(k, cos, sin, layout, "rope_store_kv k")
    check_float("rope_store_kv k", k, like=q)
    check_float("rope_store_kv v", v, like=q)
    if v.shape != k.shape or k.shape[0] != q.shape[0]:
        raise ValueError(f"rope_store_kv: need q [B, Hq, T, D] and k, v [B, Hkv, T, D], got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if cache_k is cache_v:
        raise ValueError("rope_store_kv: cache_k and cache_v must be two arrays, got the same one twice")
    check_write_time(cache_k, k, start)
    check_write_time(cache_v, v, start)


def check_merge_heads(x) -> None:
    """x [B, H, T, D] float."""
    check_float("merge_heads x", x)
    if len(x.shape) != 4:
        raise ValueError(f"merge_heads x must have shape [B, H, T, D], got {x.shape}")


def merge_heads(x: np.ndarray) -> np.ndarray:
    """[B, H, T, D] -> [B, T, H*D]."""
    check_merge_heads(x)
    b, h, t, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def repeat_kv(x: np.ndarray, n_rep: int, interleaved: bool) -> np.ndarray:
    """[B, Hkv, T, D] -> [B, Hkv*n_rep, T, D].

    interleaved=False (public Mu text default): query head h uses kv head h % Hkv (block repeat).
    interleaved=True (Llama, Mu v2): query head h uses kv head h // n_rep (each head repeated).
    """
    if check_int("repeat_kv n_rep", n_rep, 1) == 1:
        return x
    return np.repeat(x, n_rep, axis=1) if interleaved else np.tile(x, (1, n_rep, 1, 1))


def check_segment_ids(segment_ids, batch: int, tq: int, tk: int, q_start: int) -> np.ndarray | None:
    """segment_ids [B, Tk] integers (or None) -> int32 array, checked for self-attention: query i is the
    token at time q_start + i, so q_start + Tq <= Tk. Raises ValueError naming segment_ids otherwise."""
    if segment_ids is None:
        return None
    segment_ids = np.asarray(segment_ids)
    if segment_ids.shape != (batch, tk) or segment_ids.dtype.kind not in "iu":
        raise ValueError(f"segment_ids must be an integer array of shape ({batch}, {tk}), got "
                         f"{segment_ids.dtype} {segment_ids.shape}")
    if q_start + tq > tk:
        raise ValueError(f"segment_ids need self-attention (queries at times q_start..q_start+Tq-1 of the "
                         f"keys), got q_start {q_start} + Tq {tq} > Tk {tk}")
    if segment_ids.size and (segment_ids.min() < np.iinfo(np.int32).min or segment_ids.max() > np.iinfo(np.int32).max):
        raise ValueError("segment_ids must fit in int32")
    return segment_ids.astype(np.int32)


def check_key_mask(key_mask, batch: int, tk: int) -> np.ndarray | None:
    """key_mask [B, Tk] bool, or integers that are all 0 or 1 (or None) -> bool array (or None)."""
    if key_mask is None:
        return None
    mask = np.asarray(key_mask)
    if mask.dtype == object:
        raise TypeError(f"key_mask must be a host bool array (or integers 0 / 1), got {type(key_mask).__name__}")
    if mask.shape != (batch, tk):
        raise ValueError(f"key_mask must have shape ({batch}, {tk}), got {mask.shape}")
    if mask.dtype == bool:
        return mask
    if mask.dtype.kind not in "iu":
        raise TypeError(f"key_mask must be a bool array (or integers 0 / 1), got dtype {mask.dtype}")
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"key_mask must hold only 0 and 1 (True = a real key), got values {np.unique(mask)[:5]}")
    return mask.astype(bool)


def check_q_start(q_start, tk: int) -> int:
    """q_start, an int >= 0 (the position of query 0) -> min(q_start, Tk).

    Keys are positions 0..Tk-1, so a causal query at position >= Tk - 1 sees every key: clamping to Tk
    changes no result and keeps the value in any kernel's int32."""
    return min(check_int("attention q_start", q_start, 0), tk)


def check_attention(q, k, v, *, key_mask=None, q_start: int = 0, mask_fill: str = "finite_min",
                    segment_ids=None) -> tuple[np.ndarray | None, int, np.ndarray | None]:
    """q [B, Hq, Tq, D], k = v [B, Hkv, Tk, D] float arrays of one dtype, Hkv >= 1 dividing Hq, Tk >= 1; a known
    mask_fill; key_mask (check_key_mask), q_start (check_q_start), segment_ids (check_segment_ids).
    -> (key_mask bool or None, min(q_start, Tk) for the kernels, segment_ids int32 or None)."""
    if not isinstance(mask_fill, str) or mask_fill not in MASK_FILLS:
        raise ValueError(f"mask_fill must be one of {MASK_FILLS}, got {mask_fill!r}")
    for name, x in (("attention q", q), ("attention k", k), ("attention v", v)):
        check_float(name, x, like=q)
        if len(x.shape) != 4:
            raise ValueError(f"{name} must have shape [B, H, T, D], got {x.shape}")
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention k and v must both have shape [B, Hkv, Tk, D] with q's B = {b} and D = {d}, "
                         f"got k {k.shape}, v {v.shape}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"attention k/v head count must divide q's (query heads a multiple of key/value heads "
                         f">= 1), got Hq {hq}, Hkv {hkv}")
    if tk < 1:
        raise ValueError("attention needs at least one key (Tk >= 1)")
    start = check_q_start(q_start, tk)
    segment_ids = check_segment_ids(segment_ids, b, tq, tk, q_start)
    return check_key_mask(key_mask, b, tk), start, segment_ids


def attention_mask(key_mask: np.ndarray | None, causal: bool, batch: int, tq: int, tk: int,
                   q_start: int = 0, segment_ids: np.ndarray | None = None) -> np.ndarray | None:
    """-> [B, 1, Tq, Tk] bool (True = may attend), or None when nothing is masked.

    key_mask [B, Tk] bool marks real (non-pad) keys. causal: query i sits at absolute position
    q_start + i and sees keys j <= q_start + i (keys are positions 0..Tk-1). segment_ids [B, Tk]
    (checked by check_segment_ids): query i sees only keys j with segment_ids[b, j] ==
    segment_ids[b, q_start + i] (packed rows: block-diagonal attention).
    """
    segment_ids = check_segment_ids(segment_ids, batch, tq, tk, q_start)
    return _allowed(check_key_mask(key_mask, batch, tk), causal, batch, tq, tk, check_q_start(q_start, tk),
                    segment_ids)


def _allowed(key_mask, causal, batch, tq, tk, q_start, segment_ids) -> np.ndarray | None:
    """attention_mask on checked arguments (attention checks them once, in check_attention)."""
    allowed = None
    if key_mask is not None:
        allowed = np.broadcast_to(key_mask[:, None, None, :], (batch, 1, tq, tk))
    if causal:
        tri = np.arange(tk)[None, :] <= (q_start + np.arange(tq))[:, None]
        allowed = tri[None, None] if allowed is None else (allowed & tri[None, None])
    if segment_ids is not None:
        same = segment_ids[:, None, q_start:q_start + tq, None] == segment_ids[:, None, None, :]
        allowed = same if allowed is None else (allowed & same)
    return allowed


def group_query_heads(q: np.ndarray, n_kv_head: int, interleaved: bool) -> np.ndarray:
    """[B, Hq, T, D] -> [B, Hkv, n_rep*T, D]: the query heads that share kv head g stacked along time.

    Equivalent to repeat_kv on the keys (same GQA orders), without copying the keys: attention then
    runs one [n_rep*T, D] x [D, Tk] product per kv head.
    """
    b, hq, t, d = q.shape
    n_rep = hq // n_kv_head
    if interleaved:  # query head h = g * n_rep + r uses kv head g
        return q.reshape(b, n_kv_head, n_rep * t, d)
    # query head h = r * Hkv + g uses kv head g
    return q.reshape(b, n_rep, n_kv_head, t, d).transpose(0, 2, 1, 3, 4).reshape(b, n_kv_head, n_rep * t, d)


def ungroup_query_heads(y: np.ndarray, n_head: int, interleaved: bool) -> np.ndarray:
    """[B, Hkv, n_rep*T, D] -> [B, Hq, T, D]: the inverse of group_query_heads."""
    b, hkv, rt, d = y.shape
    n_rep = n_head // hkv
    if interleaved:
        return y.reshape(b, n_head, rt // n_rep, d)
    return y.reshape(b, hkv, n_rep, rt // n_rep, d).transpose(0, 2, 1, 3, 4).reshape(b, n_head, rt // n_rep, d)


def softmax_inplace(x: np.ndarray) -> np.ndarray:
    """[..., N] -> the same array, overwritten with softmax over the last axis (see softmax)."""
    x -= np.max(x, axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= np.sum(x, axis=-1, keepdims=True)
    return x


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, key_mask: np.ndarray | None = None,
              causal: bool = False, q_start: int = 0, interleaved: bool = False,
              mask_fill: str = "finite_min", segment_ids: np.ndarray | None = None) -> np.ndarray:
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] -> [B, Hq, Tq, D].

    scores = Q K^T (query head h reads kv head h % Hkv, or h // n_rep when interleaved: repeat_kv);
    masked entries (attention_mask: key_mask, causal, segment_ids) set to the fill; scores / sqrt(D);
    softmax over keys; @ V.
    mask_fill 'finite_min': the dtype's most negative finite value (a fully masked row becomes the
    uniform average of all values, as in the public Mu code). '-inf': masked keys get exactly zero
    weight; a fully masked row is defined as zeros (never NaN). Arguments are checked by check_attention.
    """
    key_mask, q_start, segment_ids = check_attention(q, k, v, key_mask=key_mask, q_start=q_start, mask_fill=mask_fill,
                                                     segment_ids=segment_ids)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scores = group_query_heads(q, hkv, interleaved) @ k.transpose(0, 1, 3, 2)  # [B, Hkv, n_rep*Tq, Tk]
    per_head = scores.reshape(b, hkv, hq // hkv, tq, tk)  # a view, to apply [B, 1, 1, Tq, Tk] masks
    allowed = _allowed(key_mask, causal, b, tq, tk, q_start, segment_ids)
    empty = None
    if allowed is not None:
        allowed = allowed[:, :, None]
        fill = np.finfo(q.dtype).min if mask_fill == "finite_min" else -np.inf
        np.copyto(per_head, q.dtype.type(fill), where=~allowed)
        if mask_fill == "-inf":
            empty = ~np.any(allowed, axis=-1, keepdims=True)
            np.copyto(per_head, q.dtype.type(0), where=empty)
    scores /= q.dtype.type(math.sqrt(d))
    softmax_inplace(scores)
    if empty is not None:
        np.copyto(per_head, q.dtype.type(0), where=empty)
    return ungroup_query_heads(scores @ v, hq, interleaved)

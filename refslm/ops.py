"""The NumPy reference ops: small pure functions, shapes in their docstrings.

Every function computes in the floating dtype of its inputs (float32 or float64); SPEC.md section
"Ops" is the normative definition. Nothing here imports an optional package.

Shape letters: B batch, T time (Tq queries, Tk keys), C model width, H heads (Hq query heads,
Hkv key/value heads), D head_dim, V vocabulary, F MLP hidden width.
"""

from __future__ import annotations

import math

import numpy as np

FLOAT_DTYPES = (np.float32, np.float64)
GELU_TANH_C = math.sqrt(2.0 / math.pi)


def check_float(name: str, x: np.ndarray) -> None:
    """Raise TypeError unless x is a float32 or float64 ndarray."""
    if not isinstance(x, np.ndarray) or x.dtype.type not in FLOAT_DTYPES:
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"{name} must be a float32 or float64 ndarray, got {got}")


# ---------------------------------------------------------------- normalisation and activations


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, unit_offset: bool = False) -> np.ndarray:
    """[..., C], [C] -> [..., C]: x / sqrt(mean(x^2) + eps) * w  (w replaced by 1 + w if unit_offset).

    The normalisation runs in float32 at least (float64 stays float64), then is cast back to x's
    dtype before the weight multiply, as the public Mu and Llama code do.
    """
    acc = np.promote_types(x.dtype, np.float32)
    xa = x.astype(acc, copy=False)
    normed = (xa / np.sqrt(np.mean(xa * xa, axis=-1, keepdims=True) + eps)).astype(x.dtype, copy=False)
    scale = (1.0 + weight) if unit_offset else weight
    return normed * scale.astype(x.dtype, copy=False)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """[...] -> [...]: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), evaluated in that order, in place."""
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
    e = _erf(x.astype(np.float64) / math.sqrt(2.0)).astype(np.float64).astype(x.dtype)
    return 0.5 * x * (1.0 + e)


def silu(x: np.ndarray) -> np.ndarray:
    """[...] -> [...]: x * sigmoid(x), evaluated without overflow for large |x|."""
    return x * sigmoid(x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """[...] -> [...]: 1 / (1 + exp(-x)), stable for both signs."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


ACTIVATIONS = {"gelu_tanh": gelu_tanh, "gelu_erf": gelu_erf, "silu": silu}


def activation(x: np.ndarray, kind: str) -> np.ndarray:
    """[...] -> [...]: the activation named kind ('gelu_tanh', 'gelu_erf', 'silu')."""
    try:
        fn = ACTIVATIONS[kind]
    except KeyError:
        raise ValueError(f"activation kind must be one of {sorted(ACTIVATIONS)}, got {kind!r}") from None
    return fn(x)


def gated(gate: np.ndarray, up: np.ndarray, kind: str) -> np.ndarray:
    """[..., F], [..., F] -> [..., F]: act(gate) * up. SwiGLU is kind='silu', GeGLU 'gelu_tanh'/'gelu_erf'."""
    return activation(gate, kind) * up


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """[...] -> [...]: exp(x - max) / sum exp(x - max). Rows of all -inf give NaN (undefined)."""
    m = np.max(x, axis=axis, keepdims=True)
    e = x - m
    np.exp(e, out=e)
    e /= np.sum(e, axis=axis, keepdims=True)
    return e


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """[...] -> [...]: (x - max) - log sum exp(x - max). -inf entries stay -inf.

    Subtracting the max first keeps full relative precision when |max| is large (logits ~1e4).
    """
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


# ---------------------------------------------------------------- linear maps


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """[..., in], [out, in], [out] -> [..., out]: x @ W^T + b (PyTorch Linear layout)."""
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
    return table[check_token_ids(ids, table.shape[0])]


# ---------------------------------------------------------------- rotary position embedding


def rope_inv_freq(head_dim: int, theta: float, ext_factors: np.ndarray | None = None) -> np.ndarray:
    """-> [D/2] float64: theta^(-2j/D) for j = 0 .. D/2-1, divided by ext_factors [D/2] when given (longrope)."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if ext_factors is None:
        return inv_freq
    ext = np.asarray(ext_factors, dtype=np.float64)
    if ext.shape != inv_freq.shape:
        raise ValueError(f"ext_factors must have shape ({head_dim // 2},) (head_dim/2), got {ext.shape}")
    return inv_freq / ext


def longrope_attention_factor(factor: float, original_max_position: int) -> float:
    """The longrope cos/sin scale: sqrt(1 + log(factor) / log(original_max_position)), 1 when factor <= 1.

    factor is the context extension max_position / original_max_position (Phi-3's default).
    """
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(factor) / math.log(original_max_position))


def rope_theta_for_length(theta: float, head_dim: int, seq_len: int, factor: float, block_size: int) -> float:
    """Dynamic NTK base (Mu and HF 'dynamic'): unchanged unless factor > 1 and seq_len > block_size.

    L = max(seq_len, block_size); theta' = theta * (factor L / block_size - (factor - 1))^(D / (D - 2)).
    """
    if factor <= 1.0:
        return theta
    length = max(seq_len, block_size)
    return theta * ((factor * length / block_size) - (factor - 1.0)) ** (head_dim / (head_dim - 2))


def centred_positions(length: int) -> np.ndarray:
    """-> [L] int64: p - (L-1)//2 for p in 0..L-1 (the public Mu encoder's bidirectional positions)."""
    return np.arange(length, dtype=np.int64) - (length - 1) // 2


def rope_cos_sin(positions: np.ndarray, head_dim: int, theta: float, layout: str = "rotate_half",
                 linear_factor: float = 1.0, ext_factors: np.ndarray | None = None,
                 scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """[..., T] positions -> cos, sin [..., T, D] float64.

    angle[t, j] = (pos[t] / linear_factor) * inv_freq[j] (inv_freq from rope_inv_freq with the
    longrope ext_factors [D/2], if any). rotate_half repeats the D/2 angles as cat(a, a);
    interleaved repeats each angle twice (a0, a0, a1, a1, ...). Both tables are multiplied by scale
    (longrope's attention factor).
    """
    inv_freq = rope_inv_freq(head_dim, theta, ext_factors)
    angles = (np.asarray(positions, dtype=np.float64) / linear_factor)[..., None] * inv_freq
    if layout == "rotate_half":
        full = np.concatenate([angles, angles], axis=-1)
    elif layout == "interleaved":
        full = np.repeat(angles, 2, axis=-1)
    else:
        raise ValueError(f"rope layout must be 'rotate_half' or 'interleaved', got {layout!r}")
    return np.cos(full) * scale, np.sin(full) * scale  # exact when scale == 1


def rotate(x: np.ndarray, layout: str) -> np.ndarray:
    """[..., D] -> [..., D]: rotate_half: (-x2, x1) of the halves; interleaved: (-x1, x0) of each pair."""
    if layout == "rotate_half":
        half = x.shape[-1] // 2
        return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = np.empty_like(x)
    out[..., 0::2] = -x[..., 1::2]
    out[..., 1::2] = x[..., 0::2]
    return out


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, layout: str = "rotate_half") -> np.ndarray:
    """[B, H, T, D], cos/sin [B or 1, T, D] -> [B, H, T, D]: x cos + rotate(x) sin (in x's dtype)."""
    c = cos.astype(x.dtype, copy=False)[:, None]
    s = sin.astype(x.dtype, copy=False)[:, None]
    return x * c + rotate(x, layout) * s


# ---------------------------------------------------------------- attention


def split_heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """[B, T, H*D] -> [B, H, T, D]."""
    b, t, width = x.shape
    return x.reshape(b, t, n_head, width // n_head).transpose(0, 2, 1, 3)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """[B, H, T, D] -> [B, T, H*D]."""
    b, h, t, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def repeat_kv(x: np.ndarray, n_rep: int, interleaved: bool) -> np.ndarray:
    """[B, Hkv, T, D] -> [B, Hkv*n_rep, T, D].

    interleaved=False (public Mu text default): query head h uses kv head h % Hkv (block repeat).
    interleaved=True (Llama, Mu v2): query head h uses kv head h // n_rep (each head repeated).
    """
    if n_rep == 1:
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


def attention_mask(key_mask: np.ndarray | None, causal: bool, batch: int, tq: int, tk: int,
                   q_start: int = 0, segment_ids: np.ndarray | None = None) -> np.ndarray | None:
    """-> [B, 1, Tq, Tk] bool (True = may attend), or None when nothing is masked.

    key_mask [B, Tk] bool marks real (non-pad) keys. causal: query i sits at absolute position
    q_start + i and sees keys j <= q_start + i (keys are positions 0..Tk-1). segment_ids [B, Tk]
    (checked by check_segment_ids): query i sees only keys j with segment_ids[b, j] ==
    segment_ids[b, q_start + i] (packed rows: block-diagonal attention).
    """
    allowed = None
    if key_mask is not None:
        allowed = np.broadcast_to(np.asarray(key_mask, dtype=bool)[:, None, None, :], (batch, 1, tq, tk))
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
    weight; a fully masked row is defined as zeros (never NaN).
    """
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scores = group_query_heads(q, hkv, interleaved) @ k.transpose(0, 1, 3, 2)  # [B, Hkv, n_rep*Tq, Tk]
    per_head = scores.reshape(b, hkv, hq // hkv, tq, tk)  # a view, to apply [B, 1, 1, Tq, Tk] masks
    allowed = attention_mask(key_mask, causal, b, tq, tk, q_start, check_segment_ids(segment_ids, b, tq, tk, q_start))
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

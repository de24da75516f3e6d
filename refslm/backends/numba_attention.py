"""Fused attention for the numba backend: one kernel, online softmax over key blocks.

For every (batch, query head, tile of QUERY_TILE queries) the kernel walks the keys in blocks of
KEY_BLOCK: scores of the block (a register-blocked micro-kernel), mask, scale, a running max and
running sum per query row (the online softmax), and the weighted sum of the block's values. The
[Tq, Tk] score matrix is never formed: extra memory is O(QUERY_TILE x (D + KEY_BLOCK)) per thread.
Causal tiles skip the key blocks after their last query. Decode (few queries) uses
attention_rows_kernel instead: one query at a time over an O(Tk) score buffer, reading the KV cache
in place.

Semantics are those of refslm.ops.attention exactly (only rounding differs): a masked key gets
weight exactly 0; a query row with no allowed key gets the mean of all Tk values (mask_fill
'finite_min', what the reference's uniform softmax over equal fills gives) or zeros ('-inf').
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from numba.extending import overload

from .numba_math import LANES, ParallelKernel, fexp_fast, row_max, stack_tile, sum_reassoc

KEY_BLOCK = LANES  # keys per block (one micro-kernel tile wide)
QUERY_TILE = LANES  # queries per task (the lanes of the score micro-kernel)


def _tile_rows(x):
    """Rows of a micro-kernel tile: 4 for float32, 2 for float64 (16 vector accumulators either way)."""


@overload(_tile_rows)
def _tile_rows_overload(x):
    rows = 4 if x.dtype.bitwidth == 32 else 2  # a compile-time constant, so the tile lives in registers
    return lambda x: rows


@njit(cache=True, error_model="numpy")
def _scores_block(kb, qt, st, block_max, nk, dp, sqrt_d):
    """st[:nk, :] = kb[:nk, :dp] @ qt[:dp, :] / sqrt_d and block_max[i] = max(st[:nk, i]).

    kb [KEY_BLOCK, Dp], qt [Dp, QUERY_TILE], st [KEY_BLOCK, QUERY_TILE], block_max [QUERY_TILE].
    Scores are stored key-major (transposed), so the softmax over keys is elementwise over queries.
    """
    rows = _tile_rows(st)
    acc = stack_tile(rows, st.dtype)
    block_max[:] = -np.inf
    for j0 in range(0, nk, rows):
        for a in range(rows):
            for u in range(LANES):
                acc[a, u] = 0
        for d in range(dp):
            qrow = qt[d]
            for a in range(rows):
                ka = kb[j0 + a, d]
                for u in range(LANES):
                    acc[a, u] += ka * qrow[u]
        for a in range(min(rows, nk - j0)):
            for u in range(LANES):
                score = acc[a, u] / sqrt_d
                st[j0 + a, u] = score
                block_max[u] = max(block_max[u], score)


@njit(cache=True, error_model="numpy")
def _accumulate_values(pt, vb, o, rescale, nq, nk):
    """o[:nq] = o[:nq] * rescale[:nq, None] + pt[:nk, :nq]^T @ vb[:nk], for one LANES-wide chunk of D.

    pt [KEY_BLOCK, QUERY_TILE] weights (key-major), vb [KEY_BLOCK, LANES], o [QUERY_TILE, LANES]. Working
    on one chunk at a time keeps every loop bound but nq and nk fixed at compile time: measured 1.7x
    faster than one call looping over the chunks of D itself.
    """
    rows = _tile_rows(o)
    acc = stack_tile(rows, o.dtype)
    for i0 in range(0, nq, rows):
        for a in range(rows):
            for u in range(LANES):
                acc[a, u] = o[i0 + a, u] * rescale[i0 + a]
        for j in range(nk):
            vrow = vb[j]
            prow = pt[j, i0:i0 + rows]
            for a in range(rows):
                pa = prow[a]
                for u in range(LANES):
                    acc[a, u] += pa * vrow[u]
        for a in range(rows):
            for u in range(LANES):
                o[i0 + a, u] = acc[a, u]


@njit(cache=True, error_model="numpy")
def _mask_block(st, block_max, nk, j0, key_mask, segments, query_segment, b, causal, last_key):
    """Set the scores of keys a query may not see to -inf and recompute block_max over what is left.

    st [KEY_BLOCK, QUERY_TILE] scaled scores of keys j0..j0+nk-1; last_key[i] is the last key query
    i may see (causal); key_mask [B, Tk] uint8 marks real keys; segments [B, Tk] int32 and
    query_segment[i] the segment of query i (keys of other segments are hidden). Absent masks have
    shape [0, 0].
    """
    neg_inf = st.dtype.type(-np.inf)
    block_max[:] = neg_inf
    for j in range(nk):
        key = j0 + j
        real = key_mask.shape[1] == 0 or key_mask[b, key] != 0
        srow = st[j]
        for i in range(LANES):
            visible = (real and (not causal or key <= last_key[i])
                       and (segments.shape[1] == 0 or segments[b, key] == query_segment[i]))
            srow[i] = srow[i] if visible else neg_inf
            block_max[i] = max(block_max[i], srow[i])


@njit(cache=True, error_model="numpy")
def _online_softmax_block(st, block_max, row_max, row_sum, rescale, nk):
    """Exponentiate one block of key-major scores in place and update the running softmax state.

    st [KEY_BLOCK, QUERY_TILE] scores (-inf for hidden keys) -> weights exp(score - running max),
    exactly 0 for hidden keys; block_max [QUERY_TILE] their maxima. row_max, row_sum move to the new
    running max and rescale[i] = exp(old - new max) is what the accumulated values must be
    multiplied by.
    """
    neg_inf = st.dtype.type(-np.inf)
    for i in range(LANES):
        new_max = max(row_max[i], block_max[i])
        shift = new_max if new_max > neg_inf else 0  # no key seen yet: every weight is exp(-inf) = 0
        rescale[i] = fexp_fast(row_max[i] - shift)
        row_max[i] = new_max
        block_max[i] = shift
        row_sum[i] *= rescale[i]
    for j in range(nk):
        srow = st[j]
        for i in range(LANES):
            srow[i] = fexp_fast(srow[i] - block_max[i])
            row_sum[i] += srow[i]


@njit(cache=True, error_model="numpy")
def _task_order(n_tiles, causal):
    """Tile visiting order: causal tiles paired (0, n-1, 1, n-2, ...) so contiguous chunks of the
    parallel loop hold equal work."""
    order = np.arange(n_tiles)
    if causal:
        for t in range(n_tiles):
            order[t] = t // 2 if t % 2 == 0 else n_tiles - 1 - t // 2
    return order


@ParallelKernel
def attention_kernel(q, k, v, key_mask, segments, causal, q_start, interleaved, uniform_when_empty, out):
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], key_mask [B, Tk] uint8 or [0, 0], segments [B, Tk] int32
    or [0, 0] (query i is the token at time q_start + i) -> out [B, Hq, Tq, D].

    GQA: query head h reads kv head h // (Hq / Hkv) (interleaved) or h % Hkv. Rows with no allowed
    key: mean of all values (uniform_when_empty) or zeros.
    """
    n_batch, n_q_heads, tq, d = q.shape
    n_kv_heads, tk = k.shape[1], k.shape[2]
    n_rep = n_q_heads // n_kv_heads
    n_chunks = (d + LANES - 1) // LANES
    dp = n_chunks * LANES
    n_tiles = (tq + QUERY_TILE - 1) // QUERY_TILE
    order = _task_order(n_tiles, causal)
    sqrt_d = q.dtype.type(math.sqrt(d))
    for task in prange(n_batch * n_q_heads * n_tiles):
        bh, tile = task // n_tiles, task % n_tiles
        b, h = bh // n_q_heads, bh % n_q_heads
        kvh = h // n_rep if interleaved else h % n_kv_heads
        i0 = order[tile] * QUERY_TILE
        nq = min(QUERY_TILE, tq - i0)
        qt = np.zeros((dp, QUERY_TILE), q.dtype)
        kb = np.zeros((KEY_BLOCK, dp), q.dtype)
        vb = np.zeros((n_chunks, KEY_BLOCK, LANES), q.dtype)  # V block and output by LANES-wide chunks of D
        st = np.empty((KEY_BLOCK, QUERY_TILE), q.dtype)
        o = np.zeros((n_chunks, QUERY_TILE, LANES), q.dtype)
        row_max = np.full(QUERY_TILE, -np.inf, q.dtype)
        row_sum = np.zeros(QUERY_TILE, q.dtype)
        rescale = np.empty(QUERY_TILE, q.dtype)
        block_max = np.empty(QUERY_TILE, q.dtype)
        last_key = np.arange(QUERY_TILE) + (q_start + i0)
        query_segment = np.zeros(QUERY_TILE, np.int32)
        for i in range(nq):
            for c in range(d):
                qt[c, i] = q[b, h, i0 + i, c]
            if segments.shape[1] != 0:
                query_segment[i] = segments[b, q_start + i0 + i]
        some_hidden = key_mask.shape[1] != 0 or segments.shape[1] != 0
        key_end = min(tk, q_start + i0 + nq) if causal else tk
        for j0 in range(0, key_end, KEY_BLOCK):
            nk = min(KEY_BLOCK, key_end - j0)
            for j in range(nk):
                for c in range(d):
                    kb[j, c] = k[b, kvh, j0 + j, c]
                    vb[c // LANES, j, c % LANES] = v[b, kvh, j0 + j, c]
            _scores_block(kb, qt, st, block_max, nk, dp, sqrt_d)
            if some_hidden or (causal and j0 + nk - 1 > last_key[0]):  # some key hidden from some query
                _mask_block(st, block_max, nk, j0, key_mask, segments, query_segment, b, causal, last_key)
            _online_softmax_block(st, block_max, row_max, row_sum, rescale, nk)
            for chunk in range(n_chunks):
                _accumulate_values(st, vb[chunk], o[chunk], rescale, nq, nk)
        for i in range(nq):
            if row_sum[i] > 0:
                for c in range(d):
                    out[b, h, i0 + i, c] = o[c // LANES, i, c % LANES] / row_sum[i]
            elif uniform_when_empty:
                out[b, h, i0 + i] = _mean_over_time(v, b, kvh)
            else:
                out[b, h, i0 + i] = 0


@njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def _dot(a, b):
    """sum(a * b) over the last axis of two [D] rows (order left to the vectoriser; flag 'reassoc' only)."""
    total = a.dtype.type(0)
    for c in range(a.shape[0]):
        total += a[c] * b[c]
    return total


@ParallelKernel
def attention_rows_kernel(q, k, v, key_mask, segments, causal, q_start, interleaved, uniform_when_empty, out):
    """attention_kernel's contract for few queries (decode): one query row at a time, scores over all
    keys in an O(Tk) buffer, no copies of K and V (the KV cache is read in place, once per query)."""
    n_batch, n_q_heads, tq, d = q.shape
    n_kv_heads, tk = k.shape[1], k.shape[2]
    n_rep = n_q_heads // n_kv_heads
    sqrt_d = q.dtype.type(math.sqrt(d))
    for task in prange(n_batch * n_q_heads * tq):
        bh, i = task // tq, task % tq
        b, h = bh // n_q_heads, bh % n_q_heads
        kvh = h // n_rep if interleaved else h % n_kv_heads
        visible = min(tk, q_start + i + 1) if causal else tk
        scores = np.empty(max(visible, 1), q.dtype)
        query = q[b, h, i]
        for j in range(visible):
            real = ((key_mask.shape[1] == 0 or key_mask[b, j] != 0)
                    and (segments.shape[1] == 0 or segments[b, j] == segments[b, q_start + i]))
            scores[j] = _dot(query, k[b, kvh, j]) / sqrt_d if real else -np.inf
        top = row_max(scores, visible)
        acc = np.zeros(d, q.dtype)
        if top == -np.inf:
            if uniform_when_empty:
                out[b, h, i] = _mean_over_time(v, b, kvh)
            else:
                out[b, h, i] = 0
            continue
        for j in range(visible):
            scores[j] = fexp_fast(scores[j] - top)
        total = sum_reassoc(scores, visible)
        for j in range(visible):
            weight = scores[j]
            if weight != 0:
                row = v[b, kvh, j]
                for c in range(d):
                    acc[c] += weight * row[c]
        for c in range(d):
            out[b, h, i, c] = acc[c] / total


@njit(cache=True, error_model="numpy")
def _mean_over_time(v, b, kvh):
    """v [B, Hkv, Tk, D] -> [D]: mean of v[b, kvh] over time (the uniform softmax of a fully masked row)."""
    total = np.zeros(v.shape[3], np.float64)
    for j in range(v.shape[2]):
        total += v[b, kvh, j]
    return (total / v.shape[2]).astype(v.dtype)

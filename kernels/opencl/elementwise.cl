/* Elementwise and row kernels: copies, embedding, activations, RMSNorm, RoPE, softmax. */
#include "common.h"

/* dst[i0,i1,i2,i3] = src[i0,i1,i2,i3] for strided 4-D views (strides and offsets in elements). */
__kernel void copy4d(const int n1, const int n2, const int n3, const long total,
                     __global const REAL *src, const long s_off, const long s0, const long s1, const long s2,
                     const long s3,
                     __global REAL *dst, const long d_off, const long d0, const long d1, const long d2,
                     const long d3) {
    const long i = get_global_id(0);
    if (i >= total) return;
    const long i3 = i % n3, r2 = i / n3;
    const long i2 = r2 % n2, r1 = r2 / n2;
    const long i1 = r1 % n1, i0 = r1 / n1;
    dst[d_off + i0 * d0 + i1 * d1 + i2 * d2 + i3 * d3] = src[s_off + i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3];
}

/* out [N, C] = table[ids[n], :] (table half under W_HALF) */
__kernel void embedding(const long total, const int C, __global const long *ids, __global const WTYPE *table,
                        __global REAL *out) {
    const long i = get_global_id(0);
    if (i >= total) return;
    out[i] = WLOAD(table, ids[i / C] * C + i % C);
}

__kernel void activation(const long total, const int kind, __global const REAL *x, __global REAL *out) {
    const long i = get_global_id(0);
    if (i < total) out[i] = activate(x[i], kind);
}

__kernel void gated(const long total, const int kind, __global const REAL *gate, __global const REAL *up,
                    __global REAL *out) {
    const long i = get_global_id(0);
    if (i < total) out[i] = activate(gate[i], kind) * up[i];
}

/* One work-group per row of x [rows, C]: out = x / sqrt(mean(x^2) + eps) * (w or 1 + w). */
__kernel void rmsnorm(const int C, const REAL eps, const int unit_offset, __global const REAL *x,
                      __global const REAL *w, __global REAL *out, __local REAL *scratch) {
    const long row = get_group_id(0);
    const int lid = get_local_id(0), wg = get_local_size(0);
    __global const REAL *xr = x + row * C;
    REAL ss = 0;
    for (int c = lid; c < C; c += wg) ss += xr[c] * xr[c];
    const REAL rms = sqrt(group_sum(ss, scratch) / (REAL)C + eps);
    for (int c = lid; c < C; c += wg) {
        const REAL scale = unit_offset ? (REAL)1 + w[c] : w[c];
        out[row * C + c] = (xr[c] / rms) * scale;
    }
}

/* Strided [B, H, T, D] views (d contiguous) as kernel arguments: buffer, offset and strides of b, h, t in
 * elements (VIEW_IN: read only); AT(p, b, h, t) points at the row [D] of (b, h, t). */
#define VIEW_OF(T, p) __global T *p, const long p##_off, const long p##_sb, const long p##_sh, const long p##_st
#define VIEW(p) VIEW_OF(REAL, p)
#define VIEW_IN(p) VIEW_OF(const REAL, p)
#define AT(p, b, h, t) (p + p##_off + (b) * p##_sb + (long)(h) * p##_sh + (long)(t) * p##_st)

/* Flat index i of a dense [B, H, T, D] array -> (b, h, t, d), and c: the index of its entry in RoPE tables
 * cos/sin [B or 1, T, D]. */
typedef struct { long b; int h, t, d; long c; } RopeIndex;
inline RopeIndex rope_index(const long i, const int H, const int T, const int D, const int cos_per_batch) {
    RopeIndex r;
    r.d = i % D;
    const long bht = i / D;
    r.t = bht % T;
    r.h = (bht / T) % H;
    r.b = bht / T / H;
    r.c = (cos_per_batch ? r.b * T : 0) * D + (long)r.t * D + r.d;
    return r;
}

/* Element r.d of x_row [D] rotated: x * cos + rotate(x) * sin, layout interleaved (pairs 2i, 2i+1) or
 * rotate_half (pairs i, i + D/2). */
inline REAL rope_element(__global const REAL *x_row, const RopeIndex r, const int D, const int interleaved,
                         __global const REAL *cs, __global const REAL *sn) {
    const int d = r.d;
    REAL rotated;
    if (interleaved) {
        rotated = (d % 2 == 0) ? -x_row[d + 1] : x_row[d - 1];
    } else {
        const int half_d = D / 2;
        rotated = (d < half_d) ? -x_row[d + half_d] : x_row[d - half_d];
    }
    return x_row[d] * cs[r.c] + rotated * sn[r.c];
}

/* out [B, H, T, D] (dense) = rope(x), x a strided view; cos/sin [B or 1, T, D]; layout 0 rotate_half,
 * 1 interleaved. */
__kernel void rope(const int H, const int T, const int D, const long total, const int cos_per_batch,
                   const int interleaved, VIEW_IN(x), __global const REAL *cs, __global const REAL *sn,
                   __global REAL *out) {
    const long i = get_global_id(0);
    if (i >= total) return;
    const RopeIndex r = rope_index(i, H, T, D, cos_per_batch);
    out[i] = rope_element(AT(x, r.b, r.h, r.t), r, D, interleaved, cs, sn);
}

/* A cached step's RoPE and KV-cache writes in one launch, over the rows of q [B, Hq, T, D], k and
 * v [B, Hkv, T, D] (strided views) taken as heads 0..Hq-1, Hq.., Hq+Hkv.. of one [B, Hq + 2 Hkv, T, D]:
 * q_out [B, Hq, T, D] (dense) = rope(q); cache_k[b, h, t] = rope(k); cache_v[b, h, t] = v, where the
 * cache views [B, Hkv, T, D] start at the first written time (the window start.. of the cache). */
__kernel void rope_store_kv(const int Hq, const int Hkv, const int T, const int D, const long total,
                            const int cos_per_batch, const int interleaved, VIEW_IN(q), VIEW_IN(k), VIEW_IN(v),
                            __global const REAL *cs, __global const REAL *sn, __global REAL *q_out,
                            VIEW(cache_k), VIEW(cache_v)) {
    const long i = get_global_id(0);
    if (i >= total) return;
    const RopeIndex r = rope_index(i, Hq + 2 * Hkv, T, D, cos_per_batch);
    const long b = r.b;
    const int h = r.h, t = r.t;
    if (h < Hq) {
        q_out[((b * Hq + h) * T + t) * D + r.d] = rope_element(AT(q, b, h, t), r, D, interleaved, cs, sn);
    } else if (h < Hq + Hkv) {
        AT(cache_k, b, h - Hq, t)[r.d] = rope_element(AT(k, b, h - Hq, t), r, D, interleaved, cs, sn);
    } else {
        AT(cache_v, b, h - Hq - Hkv, t)[r.d] = AT(v, b, h - Hq - Hkv, t)[r.d];
    }
}
#undef VIEW_OF
#undef VIEW
#undef VIEW_IN
#undef AT

/* One work-group per row of x [rows, N]: out = exp(x - max) / sum exp(x - max). */
__kernel void softmax_rows(const int N, __global const REAL *x, __global REAL *out, __local REAL *scratch) {
    const long row = get_group_id(0);
    const int lid = get_local_id(0), wg = get_local_size(0);
    __global const REAL *xr = x + row * N;
    REAL m = -INFINITY;
    for (int j = lid; j < N; j += wg) m = fmax(m, xr[j]);
    m = group_max(m, scratch);
    REAL s = 0;
    for (int j = lid; j < N; j += wg) s += exp(xr[j] - m);
    s = group_sum(s, scratch);
    for (int j = lid; j < N; j += wg) out[row * N + j] = exp(xr[j] - m) / s;
}

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

/* out [B, H, T, D] (dense) = x * cos + rotate(x) * sin; x is a strided view (offset and strides of b, h, t
 * in elements, d contiguous); cos/sin [B or 1, T, D]; layout 0 rotate_half, 1 interleaved. */
__kernel void rope(const int H, const int T, const int D, const long total, const int cos_per_batch,
                   const int interleaved, __global const REAL *x, const long x_off, const long x_sb,
                   const long x_sh, const long x_st, __global const REAL *cs, __global const REAL *sn,
                   __global REAL *out) {
    const long i = get_global_id(0);
    if (i >= total) return;
    const int d = i % D;
    const long bht = i / D;
    const int t = bht % T;
    const long bh = bht / T;
    const long h = bh % H, b = bh / H;
    __global const REAL *xr = x + x_off + b * x_sb + h * x_sh + t * x_st;
    const long c = (cos_per_batch ? b * T : 0) * D + (long)t * D + d;
    REAL rotated;
    if (interleaved) {
        rotated = (d % 2 == 0) ? -xr[d + 1] : xr[d - 1];
    } else {
        const int half_d = D / 2;
        rotated = (d < half_d) ? -xr[d + half_d] : xr[d - half_d];
    }
    out[i] = xr[d] * cs[c] + rotated * sn[c];
}

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

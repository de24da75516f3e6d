/* Attention with the exact semantics of refslm.ops.attention:
 *   s_ij = (q_i . k_j, or FILL where masked) / sqrt(D); out_i = softmax_j(s_ij) @ V.
 * FILL is the dtype's most negative finite value (MASK_FILL_FINITE: a fully masked row averages all
 * values) or -inf (a fully masked row is zeros). A key j is allowed for query i when key_mask[b, j]
 * (if given), if causal j <= q_start + i, and if segments are given segments[b, j] ==
 * segments[b, q_start + i] (packed rows: block-diagonal attention). GQA: query head h reads kv head h / n_rep
 * (interleaved) or h % Hkv (block order).
 *
 * q, k, v and out are strided views [B, H, T, D] (element offset and strides of b, h, t; d contiguous):
 * heads split from [B, T, H*D] and KV cache slices are read in place, and out can be written in
 * [B, Tq, Hq, D] order so that merging the heads needs no copy.
 * Build defines: HEAD_DIM, MASK_FILL_FINITE (or not), and BQ/BK (flash_attention) or WG (row_attention).
 */
#include "common.h"

#ifdef MASK_FILL_FINITE
#define FILL (-REAL_MAX)
#else
#define FILL (-INFINITY)
#endif

#define VIEW_ARGS(p) __global const REAL *p, const long p##_off, const long p##_sb, const long p##_sh, const long p##_st
#define OUT_ARGS(p) __global REAL *p, const long p##_off, const long p##_sb, const long p##_sh, const long p##_st

inline int kv_head(int h, int Hkv, int n_rep, int interleaved) {
    return interleaved ? h / n_rep : h % Hkv;
}

#define MASK_ARGS const int has_mask, __global const uchar *key_mask, const int has_segments, \
                  __global const int *segments

inline int key_allowed(int b, int i, int j, int Tk, int causal, int q_start, MASK_ARGS) {
    if (has_mask && !key_mask[(long)b * Tk + j]) return 0;
    if (causal && j > q_start + i) return 0;
    if (has_segments && segments[(long)b * Tk + j] != segments[(long)b * Tk + q_start + i]) return 0;
    return 1;
}

#ifdef BQ
/* One work-item per query row, BQ rows per work-group; keys stream through local memory in blocks of
 * BK with an online (running max / running sum) softmax. Global (ceil(Tq/BQ)*BQ, B*Hq). */
__kernel __attribute__((reqd_work_group_size(BQ, 1, 1)))
void flash_attention(const int Hq, const int Hkv, const int Tq, const int Tk, const int n_rep,
                     const int interleaved, const int causal, const int q_start, MASK_ARGS,
                     VIEW_ARGS(q), VIEW_ARGS(k), VIEW_ARGS(v), OUT_ARGS(out)) {
    __local REAL Ks[BK][HEAD_DIM];
    __local REAL Vs[BK][HEAD_DIM];
    const int lid = get_local_id(0);
    const int i = get_group_id(0) * BQ + lid;
    const int bh = get_group_id(1);
    const int b = bh / Hq, h = bh % Hq;
    const int hk = kv_head(h, Hkv, n_rep, interleaved);
    const REAL scale_div = sqrt((REAL)HEAD_DIM);
    const int active = i < Tq;

    REAL qr[HEAD_DIM], acc[HEAD_DIM];
    __global const REAL *qrow = q + q_off + b * q_sb + h * q_sh + (long)(active ? i : 0) * q_st;
    for (int d = 0; d < HEAD_DIM; d++) {
        qr[d] = qrow[d];
        acc[d] = 0;
    }
    REAL m = -INFINITY, l = 0;
    const long kbase = k_off + b * k_sb + hk * k_sh, vbase = v_off + b * v_sb + hk * v_sh;

    for (int j0 = 0; j0 < Tk; j0 += BK) {
        const int nb = min(BK, Tk - j0);
        for (int e = lid; e < nb * HEAD_DIM; e += BQ) {
            const int jj = e / HEAD_DIM, d = e % HEAD_DIM;
            Ks[jj][d] = k[kbase + (long)(j0 + jj) * k_st + d];
            Vs[jj][d] = v[vbase + (long)(j0 + jj) * v_st + d];
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        if (active) {
            REAL s[BK];
            REAL mb = -INFINITY;
            for (int jj = 0; jj < nb; jj++) {
                REAL dot = 0;
                if (key_allowed(b, i, j0 + jj, Tk, causal, q_start, has_mask, key_mask, has_segments, segments)) {
                    for (int d = 0; d < HEAD_DIM; d++) dot = fma(qr[d], Ks[jj][d], dot);
                } else {
                    dot = FILL;
                }
                s[jj] = dot / scale_div;
                mb = fmax(mb, s[jj]);
            }
            const REAL m_new = fmax(m, mb);
            if (m_new > -INFINITY) {
                const REAL rescale = exp(m - m_new);
                l *= rescale;
                for (int d = 0; d < HEAD_DIM; d++) acc[d] *= rescale;
                for (int jj = 0; jj < nb; jj++) {
                    const REAL p = exp(s[jj] - m_new);
                    l += p;
                    for (int d = 0; d < HEAD_DIM; d++) acc[d] = fma(p, Vs[jj][d], acc[d]);
                }
                m = m_new;
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (active) {
        __global REAL *orow = out + out_off + b * out_sb + h * out_sh + (long)i * out_st;
        for (int d = 0; d < HEAD_DIM; d++) orow[d] = l > 0 ? acc[d] / l : (REAL)0;
    }
}
#endif

#ifdef WG
/* One work-group of WG work-items per (b, h, query row), for few query rows (decode steps over a KV
 * cache): scores of all keys in parallel into `scores` [B*Hq*Tq, Tk], then max, sum and the weighted
 * sum of V with work-items spread over D and key subsets. Global (WG * B*Hq*Tq). */
__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void row_attention(const int Hq, const int Hkv, const int Tq, const int Tk, const int n_rep,
                   const int interleaved, const int causal, const int q_start, MASK_ARGS,
                   VIEW_ARGS(q), VIEW_ARGS(k), VIEW_ARGS(v), OUT_ARGS(out), __global REAL *scores) {
    __local REAL qs[HEAD_DIM];
    __local REAL scratch[WG];
    const int lid = get_local_id(0);
    const long row = get_group_id(0);  /* (b * Hq + h) * Tq + i */
    const int i = row % Tq;
    const int bh = row / Tq;
    const int b = bh / Hq, h = bh % Hq;
    const int hk = kv_head(h, Hkv, n_rep, interleaved);
    const REAL scale_div = sqrt((REAL)HEAD_DIM);
    const long kbase = k_off + b * k_sb + hk * k_sh, vbase = v_off + b * v_sb + hk * v_sh;
    __global REAL *srow = scores + row * Tk;

    __global const REAL *qrow = q + q_off + b * q_sb + h * q_sh + (long)i * q_st;
    for (int d = lid; d < HEAD_DIM; d += WG) qs[d] = qrow[d];
    barrier(CLK_LOCAL_MEM_FENCE);

    REAL m = -INFINITY;
    for (int j = lid; j < Tk; j += WG) {
        REAL dot = 0;
        if (key_allowed(b, i, j, Tk, causal, q_start, has_mask, key_mask, has_segments, segments)) {
            __global const REAL *kr = k + kbase + (long)j * k_st;
            for (int d = 0; d < HEAD_DIM; d++) dot = fma(qs[d], kr[d], dot);
        } else {
            dot = FILL;
        }
        srow[j] = dot / scale_div;
        m = fmax(m, srow[j]);
    }
    m = group_max(m, scratch);
    REAL l = 0;
    for (int j = lid; j < Tk; j += WG) {
        const REAL p = m > -INFINITY ? exp(srow[j] - m) : (REAL)0;
        srow[j] = p;
        l += p;
    }
    l = group_sum(l, scratch);  /* its barriers also make srow visible to the whole work-group */
    barrier(CLK_GLOBAL_MEM_FENCE);
    __global REAL *orow = out + out_off + b * out_sb + h * out_sh + (long)i * out_st;
#if WG >= HEAD_DIM
    /* WG / HEAD_DIM groups of work-items each sum a strided subset of the keys for every d. */
    const int groups = WG / HEAD_DIM, d = lid % HEAD_DIM, g = lid / HEAD_DIM;
    REAL acc = 0;
    if (g < groups)
        for (int j = g; j < Tk; j += groups) acc = fma(srow[j], v[vbase + (long)j * v_st + d], acc);
    scratch[lid] = acc;
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lid < HEAD_DIM) {
        REAL total = 0;
        for (int r = 0; r < groups; r++) total += scratch[r * HEAD_DIM + lid];
        orow[lid] = l > 0 ? total / l : (REAL)0;
    }
#else
    for (int d = lid; d < HEAD_DIM; d += WG) {
        REAL acc = 0;
        for (int j = 0; j < Tk; j++) acc = fma(srow[j], v[vbase + (long)j * v_st + d], acc);
        orow[d] = l > 0 ? acc / l : (REAL)0;
    }
#endif
}
#endif

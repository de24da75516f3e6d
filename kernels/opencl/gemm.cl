/* C [M, N] = act(A [M, K] @ W [N, K]^T (+ bias [N])) (+ R [M, N]): the PyTorch Linear layout, both
 * operands K-contiguous; act (common.h ACT_* code, or -1 for none) is the activation that follows the
 * projection, R the residual stream added last: act(acc + bias) + R, the rounding of separate ops.
 *
 * gemm_nt: a TM x TN tile of C per work-group, staged through local-memory tiles of TK columns of K;
 * work-group (TN / RN, TM / RM); each work-item accumulates an RM x RN register block whose rows and
 * columns are strided by the work-group shape (conflict-free local reads, coalesced stores).
 * Sizes need not be multiples of the tiles: out-of-range loads read 0 and stores are skipped.
 * Build defines: TM TN TK RM RN (and REAL). W_HALF: W is stored as half (common.h WLOAD).
 *
 * gemv_nt: for few rows of A (decode steps). One work-group of GV work-items per output column n,
 * reducing over K; up to GEMV_MAX_M rows of A per launch.
 */
#include "common.h"

/* The value stored at C[m, n] for the dot product acc. */
#define EPILOGUE(acc, m, n) \
    (activate_or_not((acc) + (has_bias ? bias[n] : (REAL)0), act) + (has_residual ? R[(long)(m) * N + (n)] : (REAL)0))

inline REAL activate_or_not(REAL y, int act) { return act < 0 ? y : activate(y, act); }

#ifdef TM
#define LX (TN / RN)
#define LY (TM / RM)
#define NTHREADS (LX * LY)

__kernel __attribute__((reqd_work_group_size(LX, LY, 1)))
void gemm_nt(const int M, const int N, const int K, __global const REAL *A, __global const WTYPE *W,
             __global const REAL *bias, const int has_bias, const int act, __global const REAL *R,
             const int has_residual, __global REAL *C) {
    __local REAL As[TK][TM + 1];
    __local REAL Ws[TK][TN + 1];
    const int tx = get_local_id(0), ty = get_local_id(1);
    const int tid = ty * LX + tx;
    const int n0 = get_group_id(0) * TN, m0 = get_group_id(1) * TM;
    REAL acc[RM][RN];
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) acc[i][j] = 0;

    for (int k0 = 0; k0 < K; k0 += TK) {
        for (int e = tid; e < TM * TK; e += NTHREADS) {
            const int r = e / TK, c = e % TK;
            const int gm = m0 + r, gk = k0 + c;
            As[c][r] = (gm < M && gk < K) ? A[(long)gm * K + gk] : (REAL)0;
        }
        for (int e = tid; e < TN * TK; e += NTHREADS) {
            const int r = e / TK, c = e % TK;
            const int gn = n0 + r, gk = k0 + c;
            Ws[c][r] = (gn < N && gk < K) ? WLOAD(W, (long)gn * K + gk) : (REAL)0;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int k = 0; k < TK; k++) {
            REAL a[RM], b[RN];
            for (int i = 0; i < RM; i++) a[i] = As[k][ty + i * LY];
            for (int j = 0; j < RN; j++) b[j] = Ws[k][tx + j * LX];
            for (int i = 0; i < RM; i++)
                for (int j = 0; j < RN; j++) acc[i][j] = fma(a[i], b[j], acc[i][j]);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    for (int i = 0; i < RM; i++) {
        const int m = m0 + ty + i * LY;
        if (m >= M) continue;
        for (int j = 0; j < RN; j++) {
            const int n = n0 + tx + j * LX;
            if (n < N) C[(long)m * N + n] = EPILOGUE(acc[i][j], m, n);
        }
    }
}
#endif

#ifdef GV
#define GEMV_MAX_M 8

__kernel __attribute__((reqd_work_group_size(GV, 1, 1)))
void gemv_nt(const int M, const int N, const int K, __global const REAL *A, __global const WTYPE *W,
             __global const REAL *bias, const int has_bias, const int act, __global const REAL *R,
             const int has_residual, __global REAL *C) {
    __local REAL scratch[GEMV_MAX_M][GV];
    const int n = get_group_id(0), lid = get_local_id(0);
    REAL acc[GEMV_MAX_M];
    for (int m = 0; m < GEMV_MAX_M; m++) acc[m] = 0;
    __global const WTYPE *wr = W + (long)n * K;
    for (int k = lid; k < K; k += GV) {
        const REAL w = WLOAD(wr, k);
        for (int m = 0; m < M; m++) acc[m] = fma(A[(long)m * K + k], w, acc[m]);
    }
    for (int m = 0; m < M; m++) scratch[m][lid] = acc[m];
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = GV / 2; s > 0; s >>= 1) {
        if (lid < s)
            for (int m = 0; m < M; m++) scratch[m][lid] += scratch[m][lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid < M) C[(long)lid * N + n] = EPILOGUE(scratch[lid][0], lid, n);
}
#endif

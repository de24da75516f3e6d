/* Fused per-row loss value + gradient: the exact formulas of refslm.losses.loss_rows (its docstring
 * is normative). One work-group (power-of-two size) per row of student [N, V]:
 *   pass 1: the log normaliser (shift + log sum) of z = student / T (and u = teacher / T), sums in ACC;
 *   pass 2: per-entry value term e_j and gradient term a_j (a_j kept in grad), sums of e and a;
 *   pass 3: grad_j = (a_j - q_j * sum a) * row_weight / T; every grad_j NaN when sum a is not finite (a
 *           reverse-KL-type value of +inf), as refslm.losses.
 * Rows with kept[i] == 0 get value 0 and gradient 0. A kept row whose log normaliser is not finite sets
 * status[i] = 1 (student) or 2 (teacher); the host raises.
 */
#include "common.h"

#define KIND_CROSS_ENTROPY 0
#define KIND_FORWARD_KL 1
#define KIND_REVERSE_KL 2
#define KIND_JSD 3
#define KIND_SKEW_KL 4
#define KIND_SKEW_REVERSE_KL 5

/* x log(x / y) from log x and log y: 0 where x = 0, +inf where x > 0 = y. */
inline REAL x_log_x_over_y(REAL log_x, REAL log_y) {
    if (isinf(log_x) && log_x < 0) return 0;
    if (isinf(log_y) && log_y < 0) return INFINITY;
    return exp(log_x) * (log_x - log_y);
}

/* log(w a + (1 - w) b) from log a, log b and log w, log(1 - w) (0 < w < 1). */
inline REAL log_mixture(REAL log_a, REAL log_b, REAL log_w, REAL log_1mw) {
    const REAL x = log_a + log_w, y = log_b + log_1mw;
    const REAL m = fmax(x, y);
    if (isinf(m) && m < 0) return m;
    return m + log1p(exp(-fabs(x - y)));
}

/* exp(l0 + l1 + l2), 0 where l0 or l1 is -inf. */
inline REAL safe_exp_sum(REAL l0, REAL l1, REAL l2) {
    if ((isinf(l0) && l0 < 0) || (isinf(l1) && l1 < 0)) return 0;
    return exp(l0 + l1 + l2);
}

/* The row's softmax normaliser of x / T as shift + log_total: shift = the max if finite (else 0), log_total =
 * log(sum exp(x / T - shift)) summed in ACC, kept apart as refslm.losses keeps them, so that log_softmax
 * (log_softmax_at) subtracts the shift first and keeps full precision when |shift| is large (logits ~1e4 in
 * float32). log_total is not finite for a row of NaN, +inf, or only -inf. */
typedef struct { REAL shift, log_total; } LogNormaliser;

inline LogNormaliser row_log_normaliser(__global const REAL *x, const int V, const REAL T, __local REAL *rscratch,
                                        __local ACC *ascratch) {
    const int lid = get_local_id(0), wg = get_local_size(0);
    REAL m = -INFINITY;
    for (int j = lid; j < V; j += wg) m = fmax(m, x[j] / T);
    m = group_max(m, rscratch);
    LogNormaliser n;
    n.shift = isfinite(m) ? m : (REAL)0;
    ACC total = 0;
    for (int j = lid; j < V; j += wg) total += (ACC)exp(x[j] / T - n.shift);
    n.log_total = (REAL)log(group_sum_acc(total, ascratch));
    return n;
}

/* log softmax of one entry x / T of a row with normaliser n: (x / T - shift) - log_total. */
inline REAL log_softmax_at(const REAL x_over_T, const LogNormaliser n) { return (x_over_T - n.shift) - n.log_total; }

__kernel void loss_rows(const int V, const int kind, const REAL T, const REAL beta, const REAL log_w,
                        const REAL log_1mw, const REAL smooth_off, const REAL smooth_on,
                        __global const REAL *student, __global const REAL *teacher, __global const long *targets,
                        __global const uchar *kept, __global const REAL *grad_scale, __global ACC *values,
                        __global REAL *grad, __global int *status, __local REAL *rscratch,
                        __local ACC *ascratch) {
    const long row = get_group_id(0);
    const int lid = get_local_id(0), wg = get_local_size(0);
    __global const REAL *s = student + row * V;
    __global const REAL *t = teacher + row * V;
    __global REAL *g = grad + row * V;
    if (!kept[row]) {
        for (int j = lid; j < V; j += wg) g[j] = 0;
        if (lid == 0) {
            values[row] = 0;
            status[row] = 0;
        }
        return;
    }
    const LogNormaliser nq = row_log_normaliser(s, V, T, rscratch, ascratch);
    LogNormaliser np = {0, 0};
    if (kind != KIND_CROSS_ENTROPY) np = row_log_normaliser(t, V, T, rscratch, ascratch);
    if (lid == 0) status[row] = !isfinite(nq.log_total) ? 1 : (!isfinite(np.log_total) ? 2 : 0);
    const long target = kind == KIND_CROSS_ENTROPY ? targets[row] : -1;

    ACC value = 0, a_sum = 0;
    for (int j = lid; j < V; j += wg) {
        const REAL log_q = log_softmax_at(s[j] / T, nq);
        REAL e, a;
        if (kind == KIND_CROSS_ENTROPY) {
            const REAL w = j == target ? smooth_off + smooth_on : smooth_off;
            e = w > 0 ? -w * log_q : (REAL)0;
            a = -w;
        } else {
            const REAL log_p = log_softmax_at(t[j] / T, np);
            if (kind == KIND_FORWARD_KL) {
                e = x_log_x_over_y(log_p, log_q);
                a = -exp(log_p);
            } else if (kind == KIND_REVERSE_KL) {
                e = x_log_x_over_y(log_q, log_p);
                a = e;
            } else if (kind == KIND_JSD) {
                const REAL log_m = log_mixture(log_p, log_q, log_w, log_1mw);
                a = ((REAL)1 - beta) * x_log_x_over_y(log_q, log_m);
                e = beta * x_log_x_over_y(log_p, log_m) + a;
            } else if (kind == KIND_SKEW_KL) {
                const REAL log_r = log_mixture(log_p, log_q, log_w, log_1mw);
                e = x_log_x_over_y(log_p, log_r);
                a = -((REAL)1 - beta) * safe_exp_sum(log_q, log_p, -log_r);
            } else { /* KIND_SKEW_REVERSE_KL: r = (1 - beta) p + beta q */
                const REAL log_r = log_mixture(log_q, log_p, log_w, log_1mw);
                e = x_log_x_over_y(log_q, log_r);
                a = e - beta * safe_exp_sum(log_q, log_q, -log_r);
            }
        }
        value += (ACC)e;
        a_sum += (ACC)a;
        g[j] = a;
    }
    value = group_sum_acc(value, ascratch);
    const ACC a_acc = group_sum_acc(a_sum, ascratch);
    const REAL a_total = isfinite(a_acc) ? (REAL)a_acc : NAN;  /* value +inf: the whole gradient row is NaN */
    if (lid == 0) values[row] = value;
    const REAL scale = grad_scale[row];
    for (int j = lid; j < V; j += wg) g[j] = (g[j] - exp(log_softmax_at(s[j] / T, nq)) * a_total) * scale;
}

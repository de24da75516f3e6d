"""Fused loss kernels for the numba backend: refslm.losses.loss_rows, parallel over rows.

Each kept row is read from memory once: its logits go into float64 row buffers (which stay in the
core's cache), where the max, the logsumexp, the loss terms and their sums are computed, and the
gradient is written once, in place. Extra memory: five float64 rows of V per thread. The element
math runs in float64 for both dtypes (the reference runs it in the logits' dtype; float64 only
removes rounding), and every special case (-inf logits, x log(x/y) at 0 and +inf, zero-weight rows)
follows the reference's definitions.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .numba_math import ParallelKernel, fexp, row_max, sum_reassoc

KIND_CODES = {"cross_entropy": 0, "forward_kl": 1, "reverse_kl": 2, "jsd": 3, "skew_kl": 4, "skew_reverse_kl": 5}
_CROSS_ENTROPY, _FORWARD_KL, _REVERSE_KL, _JSD, _SKEW_KL, _SKEW_REVERSE_KL = range(6)
_NEG_INF = -np.inf


@njit(cache=True, error_model="numpy")
def _log_softmax_row(logits, temperature, log_prob, prob):
    """logits [V] -> log_prob = z - logsumexp(z), prob = softmax(z) with z = logits / T (float64 buffers).

    Returns the logsumexp (not finite for a row of NaN, +inf, or only -inf: the caller rejects it).
    """
    v = logits.shape[0]
    for j in range(v):
        log_prob[j] = logits[j] / temperature
    top = row_max(log_prob, v)
    shift = top if np.isfinite(top) else 0.0
    for j in range(v):
        prob[j] = fexp(log_prob[j] - shift)
    total = sum_reassoc(prob, v)
    lse = shift + math.log(total) if total > 0 else _NEG_INF
    if np.isfinite(lse):
        for j in range(v):
            log_prob[j] -= lse
            prob[j] /= total
    return lse


@njit(cache=True, error_model="numpy")
def _x_log_x_over_y(log_x, x, log_y):
    """x log(x / y) from log x (and x) and log y: 0 where log x = -inf, +inf where log x > -inf = log y."""
    if log_x == _NEG_INF:
        return 0.0
    if log_y == _NEG_INF:
        return np.inf
    return x * (log_x - log_y)


@njit(cache=True, error_model="numpy")
def _logaddexp(a, b):
    """log(exp a + exp b), as numpy.logaddexp (equal arguments, infinities included, give a + log 2)."""
    if a == b:
        return a + math.log(2.0)
    diff = a - b
    if diff > 0:
        return a + math.log1p(fexp(-diff))
    return b + math.log1p(fexp(diff))


@njit(cache=True, error_model="numpy")
def _log_mixture(log_a, log_b, weight_a):
    """log(weight_a a + (1 - weight_a) b) from log a and log b, 0 <= weight_a <= 1."""
    if weight_a == 1.0:
        return log_a
    if weight_a == 0.0:
        return log_b
    return _logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


@njit(cache=True, error_model="numpy")
def _safe_exp(log_a, log_b, log_c):
    """exp(log_a + log_b - log_c), 0 where log_a or log_b is -inf."""
    if log_a == _NEG_INF or log_b == _NEG_INF:
        return 0.0
    return fexp(log_a + log_b - log_c)


@njit(cache=True, error_model="numpy")
def _divergence_terms(kind, log_q, q, log_p, p, beta, e, a):
    """Per-entry value terms e and gradient terms a of a divergence (see refslm.losses._terms), float64 [V]."""
    v = log_q.shape[0]
    if kind == _FORWARD_KL:
        for j in range(v):
            e[j] = _x_log_x_over_y(log_p[j], p[j], log_q[j])
            a[j] = -p[j]
    elif kind == _REVERSE_KL:
        for j in range(v):
            e[j] = _x_log_x_over_y(log_q[j], q[j], log_p[j])
            a[j] = e[j]
    elif kind == _JSD:
        for j in range(v):
            log_m = _log_mixture(log_p[j], log_q[j], beta)
            a[j] = (1.0 - beta) * _x_log_x_over_y(log_q[j], q[j], log_m)
            e[j] = beta * _x_log_x_over_y(log_p[j], p[j], log_m) + a[j]
    elif kind == _SKEW_KL:
        for j in range(v):
            log_r = _log_mixture(log_p[j], log_q[j], beta)
            e[j] = _x_log_x_over_y(log_p[j], p[j], log_r)
            a[j] = -(1.0 - beta) * _safe_exp(log_q[j], log_p[j], log_r)
    else:  # skew_reverse_kl
        for j in range(v):
            log_r = _log_mixture(log_q[j], log_p[j], beta)
            e[j] = _x_log_x_over_y(log_q[j], q[j], log_r)
            a[j] = e[j] - beta * _safe_exp(log_q[j], log_q[j], log_r)


@njit(cache=True, error_model="numpy")
def _cross_entropy_row(log_q, q, target, label_smoothing, scale, grad_row):
    """Value of -sum_j w_j log q_j with w = (1 - eps) onehot(target) + eps / V; grad_row <- scale (q - w)."""
    v = log_q.shape[0]
    eps = label_smoothing
    smooth = eps / v
    value = 0.0
    if eps > 0:
        value -= smooth * sum_reassoc(log_q, v)
    if eps < 1:
        value -= (1.0 - eps) * log_q[target]
    w_sum = v * smooth + (1.0 - eps)
    for j in range(v):
        grad_row[j] = (q[j] * w_sum - smooth) * scale
    grad_row[target] = (q[target] * w_sum - (smooth + (1.0 - eps))) * scale
    return value


@ParallelKernel
def loss_rows_kernel(kind, student, teacher, targets, row_weight, temperature, beta, label_smoothing,
                     grad, values, student_lse, teacher_lse, n_chunks):
    """student/teacher [N, V] (teacher [0, V] for cross_entropy), targets [N] int64 -> values [N] float64,
    grad [N, V] in place, and the logsumexps [N] of both (NaN for skipped rows) for the caller's checks.

    Rows with row_weight 0 get value 0 and a zero gradient; a kept row whose logsumexp is not finite
    is left as is (the caller raises). A row whose value is +inf with an undefined gradient (reverse
    KL with student mass on a teacher -inf entry) gets an all-NaN gradient row. Rows are split into
    n_chunks contiguous chunks run in parallel, each with its own row buffers.
    """
    n, v = student.shape
    for chunk in prange(n_chunks):
        log_q = np.empty(v)
        q = np.empty(v)
        log_p = np.empty(v)
        p = np.empty(v)
        e = np.empty(v)
        a = np.empty(v)
        for i in range(chunk * n // n_chunks, (chunk + 1) * n // n_chunks):
            values[i] = 0.0
            student_lse[i] = np.nan
            teacher_lse[i] = np.nan
            if row_weight[i] == 0:
                grad[i] = 0
                continue
            student_lse[i] = _log_softmax_row(student[i], temperature, log_q, q)
            if kind != _CROSS_ENTROPY:
                teacher_lse[i] = _log_softmax_row(teacher[i], temperature, log_p, p)
            if not (np.isfinite(student_lse[i]) and (kind == _CROSS_ENTROPY or np.isfinite(teacher_lse[i]))):
                continue
            scale = row_weight[i] / temperature
            if kind == _CROSS_ENTROPY:
                values[i] = _cross_entropy_row(log_q, q, targets[i], label_smoothing, scale, grad[i])
                continue
            _divergence_terms(kind, log_q, q, log_p, p, beta, e, a)
            values[i] = sum_reassoc(e, v)
            a_sum = sum_reassoc(a, v)
            grad_row = grad[i]
            if not np.isfinite(a_sum):
                grad_row[:] = np.nan
                continue
            for j in range(v):
                grad_row[j] = (a[j] - q[j] * a_sum) * scale

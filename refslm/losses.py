"""Distillation and language-modelling losses, each as (value, gradient w.r.t. the student logits).

SPEC.md section "Losses" is the normative text; `loss_rows` is the per-row kernel every backend
implements. Three forms compute the same numbers:
- direct: whole rows in memory (`loss_rows`, the definition);
- streaming: online logsumexp over vocabulary chunks, never more than chunk_rows x chunk_vocab
  temporaries (`loss_rows_streaming`);
- fused: hidden states and the output projection in, [N, V] logits never materialised
  (`fused_linear_loss`).

Shape letters: N rows (tokens), B batch, T time, V vocabulary, C model width.
Notation below: z = student logits / temperature, u = teacher logits / temperature,
log q = log_softmax(z) (student), log p = log_softmax(u) (teacher).
"""

from __future__ import annotations

import numpy as np

from .ops import check_float

KINDS = ("cross_entropy", "forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl")
NEG_INF = -np.inf


# ---------------------------------------------------------------- elementwise terms (log space)


def _x_log_x_over_y(log_x: np.ndarray, log_y: np.ndarray) -> np.ndarray:
    """[...] -> [...]: x log(x / y) from log x and log y; 0 where x = 0, +inf where x > 0 = y.

    Decided on the logs, not on exp(log x): a probability that underflows in the compute dtype
    still counts as > 0, so the +inf cases are the same in float32 and float64.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        term = np.exp(log_x) * (log_x - log_y)
    term = np.where(np.isneginf(log_y), np.inf, term)
    return np.where(np.isneginf(log_x), 0.0, term).astype(log_x.dtype, copy=False)


def _log_mixture(log_a: np.ndarray, log_b: np.ndarray, weight_a: float) -> np.ndarray:
    """[...] -> [...]: log(weight_a * a + (1 - weight_a) * b) from log a and log b, 0 <= weight_a <= 1."""
    if weight_a in (0.0, 1.0):
        return log_a if weight_a == 1.0 else log_b
    dtype = log_a.dtype.type
    return np.logaddexp(log_a + dtype(np.log(weight_a)), log_b + dtype(np.log1p(-weight_a)))


def _safe_exp_sum(*logs: np.ndarray) -> np.ndarray:
    """[...] -> [...]: exp(sum of logs), 0 where any of the first two logs is -inf (never NaN)."""
    with np.errstate(invalid="ignore"):
        total = sum(logs[1:], logs[0])
        out = np.exp(total)
    return np.where(np.isneginf(logs[0]) | np.isneginf(logs[1]), 0.0, out).astype(logs[0].dtype, copy=False)


def _terms(kind: str, log_q: np.ndarray, other: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-entry value terms and gradient terms of one loss kind, both [n, v].

    log_q [n, v] is the student log-distribution; `other` is the teacher log-distribution log p, or
    for cross_entropy the target distribution w (probabilities, not logs).
    Returns (e, a): the row value is sum_j e_j and the gradient w.r.t. z is a - q * sum_j a_j, where
    a_j = q_j * dL/dq_j (constants that cancel in a - q sum a are dropped).
    """
    if kind == "jsd" and beta == 0.0 or kind in ("skew_kl", "skew_reverse_kl") and beta == 0.0:
        kind = "reverse_kl" if kind == "skew_reverse_kl" else "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "cross_entropy":  # e = -w log q, a = -w
        e = np.where(other > 0, -other * log_q, 0.0).astype(log_q.dtype, copy=False)
        return e, -other
    if kind == "forward_kl":  # e = p log(p/q), a = -p
        return _x_log_x_over_y(other, log_q), -np.exp(other)
    if kind == "reverse_kl":  # e = q log(q/p), a = e
        e = _x_log_x_over_y(log_q, other)
        return e, e
    if kind == "jsd":  # m = beta p + (1-beta) q; e = beta p log(p/m) + (1-beta) q log(q/m); a = (1-beta) q log(q/m)
        log_m = _log_mixture(other, log_q, beta)
        student_part = _x_log_x_over_y(log_q, log_m)
        a = log_q.dtype.type(1.0 - beta) * student_part
        return log_q.dtype.type(beta) * _x_log_x_over_y(other, log_m) + a, a
    if kind == "skew_kl":  # r = beta p + (1-beta) q; e = p log(p/r); a = -(1-beta) q p / r
        log_r = _log_mixture(other, log_q, beta)
        return _x_log_x_over_y(other, log_r), -log_q.dtype.type(1.0 - beta) * _safe_exp_sum(log_q, other, -log_r)
    if kind == "skew_reverse_kl":  # r = (1-beta) p + beta q; e = q log(q/r); a = e - beta q^2 / r
        log_r = _log_mixture(log_q, other, beta)
        e = _x_log_x_over_y(log_q, log_r)
        return e, e - log_q.dtype.type(beta) * _safe_exp_sum(log_q, log_q, -log_r)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _target_weights(targets: np.ndarray, label_smoothing: float, vocab: int, start: int, stop: int,
                    dtype: np.dtype) -> np.ndarray:
    """targets [n] -> w [n, stop-start]: columns start..stop-1 of (1 - eps) onehot(target) + eps / vocab."""
    w = np.full((targets.shape[0], stop - start), label_smoothing / vocab, dtype=dtype)
    rows = np.flatnonzero((targets >= start) & (targets < stop))
    w[rows, targets[rows] - start] += dtype.type(1.0 - label_smoothing)
    return w


# ---------------------------------------------------------------- the per-row kernel


def loss_rows(kind: str, student: np.ndarray, teacher: np.ndarray | None, targets: np.ndarray | None,
              row_weight: np.ndarray, *, temperature: float, beta: float, label_smoothing: float,
              grad_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-row losses and the gradient of their weighted sum (direct form; the normative kernel).

    Inputs: student [N, V] float32|float64 logits; teacher [N, V] same dtype (every kind except
    cross_entropy) or None; targets [N] int64 in [0, V) (cross_entropy) or None; row_weight [N]
    float64. Rows may be strided views; the last axis is contiguous. Every row i with
    row_weight[i] != 0 must hold finite values or -inf and at least one finite value (ValueError
    otherwise); rows with row_weight[i] == 0 are not evaluated: values[i] = 0, grad[i] = 0.
    Returns values [N] float64 and grad [N, V] in student's dtype (written into grad_out [N, V] when
    given, and grad_out is returned), with grad[i] = row_weight[i] * d values[i] / d student[i].

    With T = temperature > 0, z = student / T, u = teacher / T, log q = log_softmax(z),
    log p = log_softmax(u), and x log(x/y) read as 0 when x = 0 and +inf when x > 0 = y:
      cross_entropy    w = (1 - eps) onehot(target) + eps / V   (eps = label_smoothing in [0, 1])
                       values = -sum_j w_j log q_j                              a = -w
      forward_kl       values = sum_j p_j log(p_j / q_j)       = KL(p || q)     a = -p
      reverse_kl       values = sum_j q_j log(q_j / p_j)       = KL(q || p)     a = q log(q / p)
      jsd              (TRL GKD) 0 < beta < 1: m = beta p + (1 - beta) q (built in log space),
                       values = beta KL(p || m) + (1 - beta) KL(q || m)       a = (1 - beta) q log(q / m);
                       beta = 0 is forward_kl and beta = 1 is reverse_kl exactly
      skew_kl          (DistiLLM, beta = skew alpha) r = beta p + (1 - beta) q,
                       values = KL(p || r)                                      a = -(1 - beta) q p / r
      skew_reverse_kl  (DistiLLM, beta = skew alpha) r = (1 - beta) p + beta q,
                       values = KL(q || r)                                      a = q log(q / r) - beta q^2 / r
                       (both skews with beta = 0 are forward_kl / reverse_kl exactly)
    and grad[i] = row_weight[i] / T * (a - q * sum_j a_j), where a_j = q_j dvalues/dq_j up to a
    per-row constant times q_j (which cancels). Value sums accumulate in float64; the element math
    runs in student's dtype. temperature multiplies nothing else: the T^2 factor, reductions and
    masks belong to the caller (fold them into row_weight and scale the values).

    Infinite values: forward_kl and cross_entropy give +inf where the student has -inf on an entry
    the teacher (target) gives mass; their gradient stays finite (the formula above, as PyTorch
    autograd gives). reverse_kl gives +inf where the student has mass on a teacher -inf entry; that
    row's gradient is NaN (undefined: the loss is +inf on a whole neighbourhood). jsd and the
    skews with 0 < beta are always finite.
    """
    student, teacher, targets, row_weight = _check_rows(kind, student, teacher, targets, row_weight,
                                                        temperature, beta, label_smoothing, grad_out)
    n, vocab = student.shape
    grad = np.empty_like(student) if grad_out is None else grad_out
    z = student / student.dtype.type(temperature)
    log_q = z - _logsumexp_rows(z, "student", row_weight)[:, None]
    if kind == "cross_entropy":
        other = _target_weights(targets, label_smoothing, vocab, 0, vocab, student.dtype)
    else:
        u = teacher / teacher.dtype.type(temperature)
        other = u - _logsumexp_rows(u, "teacher", row_weight)[:, None]
    e, a = _terms(kind, log_q, other, beta)
    values = np.sum(e, axis=-1, dtype=np.float64)
    a_sum = np.sum(a, axis=-1, dtype=np.float64)
    scale = (row_weight / temperature)[:, None].astype(student.dtype)
    with np.errstate(invalid="ignore"):
        grad[...] = (a - np.exp(log_q) * a_sum[:, None].astype(student.dtype)) * scale
    return _zero_dropped(values, grad, row_weight)


def _zero_dropped(values: np.ndarray, grad: np.ndarray, row_weight: np.ndarray,
                  grad_rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """values [n], grad [N, V]: rows with row_weight == 0 (grad rows grad_rows) set to exactly 0."""
    dropped = row_weight == 0
    if dropped.any():
        values[dropped] = 0.0
        grad[grad_rows][dropped] = 0
    return values, grad


def _logsumexp_rows(z: np.ndarray, name: str, row_weight: np.ndarray) -> np.ndarray:
    """z [n, v] -> [n] in z's dtype: log sum_j exp(z_j), the sum accumulated in float64."""
    m = np.max(z, axis=-1)
    shift = np.where(np.isfinite(m), m, 0.0).astype(z.dtype)
    with np.errstate(invalid="ignore"):
        total = np.sum(np.exp(z - shift[:, None]), axis=-1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        lse = shift + np.log(total)
    _check_logsumexp(lse, name, row_weight)
    return lse.astype(z.dtype)


def _check_logsumexp(lse: np.ndarray, name: str, row_weight: np.ndarray) -> None:
    """Raise ValueError if a kept row's logsumexp is not finite (NaN, +inf, or no finite entry)."""
    bad = ~np.isfinite(lse) & (row_weight != 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} logits row {i} must hold finite values or -inf with at least one finite value "
                         "(found NaN, +inf, or only -inf)")


def _check_rows(kind, student, teacher, targets, row_weight, temperature, beta, label_smoothing, grad_out):
    """Validate loss_rows arguments; returns (student, teacher, targets int64, row_weight float64)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    check_float("student", student)
    if student.ndim != 2 or student.shape[1] == 0:
        raise ValueError(f"student must have shape [N, V] with V >= 1, got {student.shape}")
    n, vocab = student.shape
    if kind == "cross_entropy":
        if targets is None:
            raise ValueError("targets [N] are required for kind 'cross_entropy'")
        targets = np.asarray(targets)
        if targets.dtype.kind not in "iu" or targets.shape != (n,):
            raise ValueError(f"targets must be an integer array of shape ({n},), got {targets.dtype} {targets.shape}")
        kept = targets[np.asarray(row_weight) != 0]
        if kept.size and (kept.min() < 0 or kept.max() >= vocab):
            raise ValueError(f"targets must lie in [0, {vocab}), got values in [{kept.min()}, {kept.max()}]")
        targets = targets.astype(np.int64, copy=False)
    else:
        if teacher is None:
            raise ValueError(f"teacher [N, V] logits are required for kind {kind!r}")
        check_float("teacher", teacher)
        if teacher.shape != student.shape or teacher.dtype != student.dtype:
            raise ValueError(f"teacher must match student's shape {student.shape} and dtype {student.dtype}, "
                             f"got {teacher.shape} {teacher.dtype}")
    row_weight = np.asarray(row_weight, dtype=np.float64)
    if row_weight.shape != (n,):
        raise ValueError(f"row_weight must have shape ({n},), got {row_weight.shape}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if grad_out is not None and (not isinstance(grad_out, np.ndarray) or grad_out.shape != student.shape
                                 or grad_out.dtype != student.dtype):
        raise ValueError(f"grad_out must be an ndarray of shape {student.shape} and dtype {student.dtype}")
    return student, teacher, targets, row_weight

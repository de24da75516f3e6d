"""Distillation and language-modelling losses, each as (value, gradient w.r.t. the student logits).

SPEC.md section "Losses" is the normative text; `loss_rows` is the per-row kernel every backend
implements. Three forms compute the same numbers:
- direct: whole rows in memory (`loss_rows`, the definition);
- streaming: online logsumexp over vocabulary chunks, never more than chunk_rows x chunk_vocab
  temporaries (the `chunk_size` option of every loss; `loss_rows_streaming` is the same for one
  `loss_rows` call);
- fused: hidden states and the output projection in, [N, V] logits never materialised
  (`fused_linear_loss`).

Shape letters: N rows (tokens), B batch, T time, V vocabulary, C model width.
Notation below: z = student logits / temperature, u = teacher logits / temperature,
log q = log_softmax(z) (student), log p = log_softmax(u) (teacher).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import numpy as np

from .ops import check_bool, check_float, check_int, check_number, check_real

KINDS = ("cross_entropy", "forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl")
NEG_INF = -np.inf
ACCUMULATE_ROWS = 256  # rows per block when a second loss term adds into the gradient (_evaluate_direct)


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
    with np.errstate(invalid="ignore"):  # NaN only in rows the loss drops (kept rows are finite or -inf)
        return np.logaddexp(log_a + dtype(np.log(weight_a)), log_b + dtype(np.log1p(-weight_a)))


def _safe_exp_sum(*logs: np.ndarray) -> np.ndarray:
    """[...] -> [...]: exp(sum of logs), 0 where any of the first two logs is -inf (never NaN)."""
    with np.errstate(invalid="ignore"):
        total = sum(logs[1:], logs[0])
        out = np.exp(total)
    return np.where(np.isneginf(logs[0]) | np.isneginf(logs[1]), 0.0, out).astype(logs[0].dtype, copy=False)


# (kind, beta) that are exactly a plain KL (TRL's special cases for jsd; the skews at alpha 0)
_PLAIN_KL_CASES = {("jsd", 0.0): "forward_kl", ("jsd", 1.0): "reverse_kl", ("skew_kl", 0.0): "forward_kl",
                   ("skew_reverse_kl", 0.0): "reverse_kl"}


def _terms(kind: str, log_q: np.ndarray, other: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-entry value terms and gradient terms of one loss kind, both [n, v].

    log_q [n, v] is the student log-distribution; `other` is the teacher log-distribution log p, or
    for cross_entropy the target distribution w (probabilities, not logs).
    Returns (e, a): the row value is sum_j e_j and the gradient w.r.t. z is a - q * sum_j a_j, where
    a_j = q_j * dL/dq_j (constants that cancel in a - q sum a are dropped).
    """
    kind = plain_kind(kind, beta)
    if kind == "cross_entropy":  # e = -w log q, a = -w (0 where w = 0, even where log q = -inf)
        with np.errstate(invalid="ignore"):
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
    """Per-row losses and the gradient of their weighted sum (direct form; the kernel every backend implements,
    its contract stated in SPEC.md section 6).

    Inputs: student [N, V] float32|float64 logits; teacher [N, V] same dtype (every kind except
    cross_entropy) or None; targets [N] int64 in [0, V) (cross_entropy) or None; row_weight [N]
    float64. Rows may be strided views; the last axis is contiguous. Every row i with
    row_weight[i] != 0 must hold finite values or -inf and at least one finite value (ValueError
    otherwise); rows with row_weight[i] == 0 are not evaluated: values[i] = 0, grad[i] = 0.
    Returns values [N] float64 and grad [N, V] in student's dtype, C-contiguous (written into grad_out [N, V]
    when given, and grad_out is returned), with grad[i] = row_weight[i] * d values[i] / d student[i].

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
    student, teacher, targets, row_weight = check_rows(kind, student, teacher, targets, row_weight,
                                                        temperature, beta, label_smoothing, grad_out)
    n, vocab = student.shape
    grad = rows_grad(student, grad_out)
    z = student / student.dtype.type(temperature)
    log_q = _log_softmax(z, *_log_normaliser_rows(z, "student", row_weight))
    if kind == "cross_entropy":
        other = _target_weights(targets, label_smoothing, vocab, 0, vocab, student.dtype)
    else:
        u = teacher / teacher.dtype.type(temperature)
        other = _log_softmax(u, *_log_normaliser_rows(u, "teacher", row_weight))
    e, a = _terms(kind, log_q, other, beta)
    values = np.sum(e, axis=-1, dtype=np.float64)
    a_sum = np.sum(a, axis=-1, dtype=np.float64)
    grad[...] = _gradient(a, log_q, a_sum, row_weight / temperature)
    return _zero_dropped(values, grad, row_weight)


def rows_grad(student: np.ndarray, grad_out: np.ndarray | None) -> np.ndarray:
    """loss_rows' gradient array [N, V]: grad_out when given, else a new C-contiguous array of student's shape and
    dtype, whatever student's memory layout."""
    return np.empty(student.shape, student.dtype) if grad_out is None else grad_out


def _gradient(a: np.ndarray, log_q: np.ndarray, a_sum: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """[n, v] gradient scale * (a - q * a_sum); a row whose a_sum is infinite (value +inf) is all NaN."""
    a_sum = np.where(np.isfinite(a_sum), a_sum, np.nan).astype(a.dtype)
    with np.errstate(invalid="ignore"):
        return (a - np.exp(log_q) * a_sum[:, None]) * scale[:, None].astype(a.dtype)


def _zero_dropped(values: np.ndarray, grad: np.ndarray, row_weight: np.ndarray,
                  grad_rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """values [n], grad [N, V]: rows with row_weight == 0 (grad rows grad_rows) set to exactly 0."""
    dropped = row_weight == 0
    if dropped.any():
        values[dropped] = 0.0
        grad[grad_rows][dropped] = 0
    return values, grad


def _log_softmax(z: np.ndarray, shift: np.ndarray, log_total: np.ndarray) -> np.ndarray:
    """z [n, v], shift [n], log_total [n] -> [n, v]: (z - shift) - log_total.

    logsumexp(z) = shift + log_total; subtracting the shift first keeps full precision when
    |shift| is large (logits ~1e4 in float32), where z - (shift + log_total) would lose it. A row whose
    log_total is not finite (NaN, +inf or no finite logit: only rows the loss drops, since kept rows are
    checked) becomes NaN without a warning: dropped rows may hold anything (SPEC 6.3).
    """
    with np.errstate(invalid="ignore"):
        return (z - shift[:, None]) - log_total[:, None]


def _log_normaliser_rows(z: np.ndarray, name: str, row_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z [n, v] -> (shift, log_total) [n] in z's dtype, logsumexp(z) = shift + log_total.

    shift is the row max (0 for a row of -inf); the sum of exp(z - shift) accumulates in float64.
    """
    m = np.max(z, axis=-1)
    shift = np.where(np.isfinite(m), m, 0.0).astype(z.dtype)
    with np.errstate(invalid="ignore"):
        total = np.sum(np.exp(z - shift[:, None]), axis=-1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_total = np.log(total)
    check_logsumexp(shift + log_total, name, row_weight)
    return shift, log_total.astype(z.dtype)


def check_logsumexp(lse: np.ndarray, name: str, row_weight: np.ndarray) -> None:
    """Raise ValueError if a kept row's logsumexp is not finite (NaN, +inf, or no finite entry)."""
    bad = ~np.isfinite(lse) & (row_weight != 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} logits row {i} must hold finite values or -inf with at least one finite value "
                         "(found NaN, +inf, or only -inf)")


def check_rows(kind, student, teacher, targets, row_weight, temperature, beta, label_smoothing, grad_out):
    """Validate host (NumPy) loss_rows arguments; -> (student, teacher, targets int64 | None, row_weight float64)."""
    check_float("student", student)
    if teacher is not None:
        check_float("teacher", teacher)
    targets, row_weight = check_rows_contract(kind, student.shape, student.dtype,
                                              None if teacher is None else (teacher.shape, teacher.dtype),
                                              targets, row_weight, temperature, beta, label_smoothing)
    if grad_out is not None and (not isinstance(grad_out, np.ndarray) or grad_out.shape != student.shape
                                 or grad_out.dtype != student.dtype):
        raise ValueError(f"grad_out must be an ndarray of shape {student.shape} and dtype {student.dtype}")
    return student, teacher, targets, row_weight


def check_rows_contract(kind: str, shape: tuple[int, ...], dtype, teacher: tuple[tuple[int, ...], object] | None,
                        targets, row_weight, temperature: float, beta: float,
                        label_smoothing: float) -> tuple[np.ndarray | None, np.ndarray]:
    """The loss_rows argument rules, from shapes and dtypes alone (any backend's arrays).

    shape/dtype: the student's; teacher: (shape, dtype) or None. -> (targets int64 [N] or None for
    divergences, row_weight float64 [N]). Raises ValueError naming the argument (TypeError for a
    setting that is no number).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if len(shape) != 2 or shape[1] == 0:
        raise ValueError(f"student must have shape [N, V] with V >= 1, got {tuple(shape)}")
    n, vocab = shape
    row_weight = np.asarray(row_weight, dtype=np.float64)
    if row_weight.shape != (n,):
        raise ValueError(f"row_weight must have shape ({n},), got {row_weight.shape}")
    if not (np.isfinite(row_weight) & (row_weight >= 0)).all():
        raise ValueError("row_weight must hold finite numbers >= 0 (mask x reduction x coefficient)")
    if kind == "cross_entropy":
        if targets is None:
            raise ValueError("targets [N] are required for kind 'cross_entropy'")
        targets = np.asarray(targets)
        if targets.dtype.kind not in "iu" or targets.shape != (n,):
            raise ValueError(f"targets must be an integer array of shape ({n},), got {targets.dtype} {targets.shape}")
        kept = targets[row_weight != 0]
        if kept.size and (kept.min() < 0 or kept.max() >= vocab):
            raise ValueError(f"targets must lie in [0, {vocab}), got values in [{kept.min()}, {kept.max()}]")
        targets = targets.astype(np.int64, copy=False)
    else:
        if teacher is None:
            raise ValueError(f"teacher [N, V] logits are required for kind {kind!r}")
        if tuple(teacher[0]) != tuple(shape) or teacher[1] != dtype:
            raise ValueError(f"teacher must match student's shape {tuple(shape)} and dtype {dtype}, "
                             f"got {tuple(teacher[0])} {teacher[1]}")
        targets = None
    _check_temperature_in(dtype, temperature)
    _check_fraction("beta", beta)
    _check_fraction("label_smoothing", label_smoothing)
    return targets, row_weight


def plain_kind(kind: str, beta: float) -> str:
    """The kind a (kind, beta) computes: jsd at beta 0 / 1 and the skews at beta 0 are exactly plain KLs."""
    return _PLAIN_KL_CASES.get((kind, beta), kind)


# ---------------------------------------------------------------- the streaming kernel


def loss_rows_streaming(kind: str, student: np.ndarray, teacher: np.ndarray | None, targets: np.ndarray | None,
                        row_weight: np.ndarray, *, temperature: float, beta: float, label_smoothing: float,
                        chunk_rows: int, chunk_vocab: int,
                        grad_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`loss_rows` (same arguments and results) computed chunk_rows x chunk_vocab at a time.

    Per block of rows: an online-logsumexp pass over vocabulary chunks (student and teacher), a
    value pass (sums of the value terms e and gradient terms a), and a gradient pass writing
    a - q sum a into grad_out chunk by chunk. Temporaries never exceed a few chunk_rows x
    chunk_vocab arrays. Equal to `loss_rows` up to rounding (the logsumexp shifts differ).
    """
    student, teacher, targets, row_weight = check_rows(kind, student, teacher, targets, row_weight,
                                                        temperature, beta, label_smoothing, grad_out)
    chunk_rows, chunk_vocab = _check_chunks((chunk_rows, chunk_vocab))
    grad = rows_grad(student, grad_out)
    values = np.zeros(student.shape[0])
    for rows in _blocks(student.shape[0], chunk_rows):
        values[rows] = _stream_block(kind, student[rows], None if teacher is None else teacher[rows],
                                     None if targets is None else targets[rows], row_weight[rows], temperature,
                                     beta, label_smoothing, chunk_vocab, grad[rows], accumulate=False)
    return values, grad


def _blocks(size: int, step: int) -> list[slice]:
    """Consecutive slices of at most step covering range(size)."""
    return [slice(start, min(start + step, size)) for start in range(0, size, step)]


def _stream_block(kind, student, teacher, targets, row_weight, temperature, beta, label_smoothing, chunk_vocab,
                  grad, *, accumulate: bool) -> np.ndarray:
    """One block of rows of loss_rows_streaming: -> values [r] float64; grad [r, V] written or added to."""
    dtype = student.dtype.type
    vocab = student.shape[1]
    columns = _blocks(vocab, chunk_vocab)
    norm_s = _online_log_normaliser(student, temperature, columns, "student", row_weight)
    norm_t = None if teacher is None else _online_log_normaliser(teacher, temperature, columns, "teacher", row_weight)

    def chunk_terms(cols: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        log_q = _log_softmax(student[:, cols] / dtype(temperature), *norm_s)
        if teacher is None:
            other = _target_weights(targets, label_smoothing, vocab, cols.start, cols.stop, student.dtype)
        else:
            other = _log_softmax(teacher[:, cols] / dtype(temperature), *norm_t)
        return (log_q, *_terms(kind, log_q, other, beta))

    values = np.zeros(student.shape[0])
    a_sum = np.zeros(student.shape[0])
    for cols in columns:
        _, e, a = chunk_terms(cols)
        values += np.sum(e, axis=-1, dtype=np.float64)
        a_sum += np.sum(a, axis=-1, dtype=np.float64)
    dropped = row_weight == 0
    for cols in columns:
        log_q, _, a = chunk_terms(cols)
        g = _gradient(a, log_q, a_sum, row_weight / temperature)
        g[dropped] = 0
        if accumulate:
            grad[:, cols] += g
        else:
            grad[:, cols] = g
    values[dropped] = 0.0
    return values


def _online_log_normaliser(x: np.ndarray, temperature: float, columns: list[slice], name: str,
                           row_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [r, V] -> (shift, log_total) [r] in x's dtype, logsumexp(x / T) = shift + log_total.

    One pass over column chunks keeping a running max and a rescaled float64 sum.
    """
    dtype = x.dtype.type
    shift = np.full(x.shape[0], NEG_INF)
    total = np.zeros(x.shape[0])
    with np.errstate(invalid="ignore", over="ignore"):
        for cols in columns:
            z = x[:, cols] / dtype(temperature)
            new_shift = np.maximum(shift, np.max(z, axis=-1))
            safe = np.where(np.isfinite(new_shift), new_shift, 0.0)
            total = total * np.exp(shift - safe) + np.sum(np.exp(z - safe.astype(x.dtype)[:, None]), axis=-1,
                                                         dtype=np.float64)
            shift = new_shift
        shift = np.where(np.isfinite(shift), shift, 0.0)
        with np.errstate(divide="ignore"):
            log_total = np.log(total)
    check_logsumexp(shift + log_total, name, row_weight)
    return shift.astype(x.dtype), log_total.astype(x.dtype)


def _check_ignore_index(ignore_index) -> int:
    """An int of the int64 range (the ids it is compared with are int64) -> int."""
    return check_int("ignore_index", ignore_index, -2**63, 2**63)


def _check_chunks(chunk_size) -> tuple[int, int]:
    """chunk_size -> (chunk_rows, chunk_vocab): a pair of ints >= 1 (TypeError for a non-int entry such as 2.7,
    which would otherwise be truncated)."""
    if not isinstance(chunk_size, (tuple, list)) or len(chunk_size) != 2:
        raise ValueError(f"chunk_size must be (chunk_rows, chunk_vocab), got {chunk_size!r}")
    return check_int("chunk_size[0] (chunk_rows)", chunk_size[0], 1), check_int("chunk_size[1] (chunk_vocab)",
                                                                             chunk_size[1], 1)


# ---------------------------------------------------------------- plans: which terms, which row weights

REDUCTIONS = ("none", "sum", "mean", "batchmean")
DIVERGENCES = KINDS[1:]


@dataclass(frozen=True)
class LossTerm:
    """One kernel call: sum_i row_weight[i] * values_i of `kind` on student columns [0, columns)."""

    kind: str
    row_weight: np.ndarray  # [N] float64: mask, reduction denominator, alpha and T^2 folded in
    columns: int
    temperature: float = 1.0
    beta: float = 0.0
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class LossPlan:
    """Terms summed into one loss over N rows; teacher [N, Vt] / targets [N] as the terms need."""

    terms: tuple[LossTerm, ...]
    teacher: np.ndarray | None
    targets: np.ndarray | None
    leading: tuple[int, ...]  # the rows' shape, [N] or [B, T]: the value's shape for reduction "none"
    per_row: bool

    def rows(self, rows: slice) -> LossPlan:
        """The same plan restricted to a block of rows."""
        terms = tuple(replace(t, row_weight=t.row_weight[rows]) for t in self.terms)
        return replace(self, terms=terms, teacher=None if self.teacher is None else self.teacher[rows],
                       targets=None if self.targets is None else self.targets[rows])


@dataclass(frozen=True)
class LinearHead:
    """Student logits given as hidden [..., C] @ weight[V, C]^T, for the fused form.

    Passing a LinearHead as `student` to any loss computes it chunk_rows rows at a time without
    materialising [N, V]; the gradient returned is then (grad_hidden [..., C], grad_weight [V, C]).
    """

    hidden: np.ndarray
    weight: np.ndarray
    chunk_rows: int = 1024

    def __post_init__(self):
        check_float("hidden", self.hidden)
        check_float("lm_head", self.weight)
        if self.hidden.ndim not in (2, 3) or self.weight.ndim != 2 or self.weight.shape[1] != self.hidden.shape[-1]:
            raise ValueError(f"hidden must be [N, C] or [B, T, C] and lm_head [V, C] with the same C, got "
                             f"{self.hidden.shape} and {self.weight.shape}")
        if self.hidden.dtype != self.weight.dtype:
            raise ValueError(f"hidden and lm_head must share a dtype, got {self.hidden.dtype} and {self.weight.dtype}")
        if not isinstance(self.chunk_rows, numbers.Integral) or isinstance(self.chunk_rows, bool) \
                or self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be an int >= 1, got {self.chunk_rows!r}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.hidden.shape[:-1], self.weight.shape[0])

    @property
    def dtype(self) -> np.dtype:
        return self.hidden.dtype


def _check_student(student) -> tuple[tuple[int, ...], int]:
    """student logits [N, V] | [B, T, V] (or a LinearHead) -> (leading shape, V)."""
    if not isinstance(student, LinearHead):
        check_float("student", student)
        if student.ndim not in (2, 3) or student.shape[-1] == 0:
            raise ValueError(f"student logits must be [N, V] or [B, T, V] with V >= 1, got {student.shape}")
    return tuple(student.shape[:-1]), student.shape[-1]


def _check_teacher(student, teacher, vocab_policy: str) -> tuple[np.ndarray, int]:
    """-> (teacher as [N, Vt], the number of leading vocabulary columns both share)."""
    check_float("teacher", teacher)
    if teacher.shape[:-1] != student.shape[:-1] or teacher.dtype != student.dtype:
        raise ValueError(f"teacher logits must have student's leading shape {student.shape[:-1]} and dtype "
                         f"{student.dtype}, got {teacher.shape} {teacher.dtype}")
    if vocab_policy not in ("error", "truncate"):
        raise ValueError(f"vocab_policy must be 'error' or 'truncate', got {vocab_policy!r}")
    if teacher.shape[-1] != student.shape[-1] and vocab_policy == "error":
        raise ValueError(f"student vocabulary {student.shape[-1]} != teacher vocabulary {teacher.shape[-1]}; pass "
                         "vocab_policy='truncate' to cut both to the smaller one")
    return teacher.reshape(-1, teacher.shape[-1]), min(teacher.shape[-1], student.shape[-1])


def _check_ids(name: str, ids, leading: tuple[int, ...]) -> np.ndarray:
    """Integer ids of the rows' shape -> [N] int64."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu" or ids.shape != leading:
        raise ValueError(f"{name} must be an integer array of shape {leading}, got {ids.dtype} {ids.shape}")
    if ids.dtype == np.uint64 and ids.size and ids.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds {ids.max()}, beyond int64 (token ids and ignore_index are int64)")
    return ids.reshape(-1).astype(np.int64, copy=False)


def _kept_rows(leading: tuple[int, ...], mask, labels, ignore_index: int) -> np.ndarray | None:
    """[N] bool of the rows that count (mask True, or labels != ignore_index), or None when unmasked."""
    if mask is not None and labels is not None:
        raise ValueError("give mask or labels, not both")
    if labels is not None:
        return _check_ids("labels", labels, leading) != _check_ignore_index(ignore_index)
    return None if mask is None else _check_mask(mask, leading)


def _check_mask(mask, leading: tuple[int, ...]) -> np.ndarray:
    """A bool mask of the rows' shape (True keeps) -> [N] bool."""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ or mask.shape != leading:
        raise ValueError(f"mask must be a bool array of shape {leading}, got {mask.dtype} {mask.shape}")
    return mask.reshape(-1)


def row_weights(leading: tuple[int, ...], kept: np.ndarray | None, reduction: str, coefficient: float) -> np.ndarray:
    """[N] float64 weights w with loss = sum_i w_i values_i for a reduction (SPEC "Losses", Reductions).

    none / sum: w = c * kept; mean: c * kept / #kept; batchmean: c / leading[0] when unmasked
    (kept None, PyTorch), c * kept / #kept when masked (TRL). Zero kept rows: all weights 0.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    n = int(np.prod(leading))
    keep = np.ones(n, dtype=bool) if kept is None else kept
    if reduction in ("none", "sum"):
        denominator = 1
    elif reduction == "batchmean" and kept is None:
        denominator = leading[0]
    else:
        denominator = int(keep.sum())
    if denominator == 0:
        return np.zeros(n)
    return keep * (coefficient / denominator)


def _check_temperature(temperature: float, scale_by_t2: bool) -> float:
    """-> the coefficient of the divergence: T^2 if scale_by_t2 (True or False) else 1. T must be finite and > 0."""
    t = check_number("temperature", temperature)
    check_bool("scale_by_t2", scale_by_t2)
    if scale_by_t2 and not math.isfinite(t * t):
        raise ValueError(f"temperature**2 (scale_by_t2) overflows float64, got temperature {temperature!r}")
    return t * t if scale_by_t2 else 1.0


def _check_temperature_in(dtype, temperature: float) -> None:
    """The logits are divided by T in their dtype, so T must be a finite number > 0 within that dtype's normal range
    (float32: [1.18e-38, 3.40e38]; T compared as given), else ValueError naming temperature, not the logits: below,
    T is subnormal or 0 in the dtype and logits / T overflow; above, T rounds to inf."""
    t = check_number("temperature", temperature)
    info = np.finfo(dtype)
    if not float(info.tiny) <= t <= float(info.max):  # compared in float64 (as given)
        raise ValueError(f"temperature {temperature!r} is outside the normal range [{info.tiny:.3g}, {info.max:.3g}] "
                         f"of {info.dtype.name}, the dtype of the logits it divides")


def _check_fraction(name: str, x: float) -> float:
    """A real number in [0, 1] (beta, alpha, label_smoothing) -> float."""
    x = check_real(name, x)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {x}")
    return x


# ---------------------------------------------------------------- evaluating a plan: direct, streaming, fused


def evaluate(plan: LossPlan, student, *, backend="numpy", chunk_size=None, grad_out=None):
    """Value and gradient of a plan: direct (backend kernel), streaming (chunk_size) or fused (LinearHead).

    student: logits [N, V] | [B, T, V], or a LinearHead. Returns (value, grad): value a float64
    scalar, or [N] | [B, T] float64 for reduction "none"; grad of student's shape and dtype, C-contiguous
    whatever student's layout (written into grad_out when given), or (grad_hidden, grad_weight) for a
    LinearHead.
    """
    from .backends import get_backend

    kernel = get_backend(backend)
    if isinstance(student, LinearHead):
        if chunk_size is not None or grad_out is not None:
            raise ValueError("chunk_size and grad_out do not apply to a LinearHead (use its chunk_rows)")
        per_row, grad = _evaluate_fused(plan, student, kernel)
    else:
        grad = _grad_buffer(student, grad_out)
        if grad_out is not None and any(a is not None and np.may_share_memory(grad_out, a)
                                        for a in (student, plan.teacher)):
            raise ValueError("grad_out must not overlap student or teacher logits (they are read after it is "
                             "written)")
        student2d, grad2d = student.reshape(-1, student.shape[-1]), grad.reshape(-1, student.shape[-1])
        if chunk_size is None:
            per_row = _evaluate_direct(plan, student2d, kernel, grad2d)
        elif kernel.name != "numpy":
            raise ValueError(f"chunk_size selects the NumPy streaming form; backend {kernel.name!r} tiles itself")
        else:
            per_row = _evaluate_streaming(plan, student2d, _check_chunks(chunk_size), grad2d)
    value = per_row.reshape(plan.leading) if plan.per_row else np.float64(per_row.sum())
    return value, grad


def _grad_buffer(student: np.ndarray, grad_out: np.ndarray | None) -> np.ndarray:
    """The gradient array of evaluate: grad_out, or a new C-contiguous array like student whatever student's
    layout (its [N, V] view is written in place by the kernels)."""
    if grad_out is None:
        return rows_grad(student, None)
    if (not isinstance(grad_out, np.ndarray) or grad_out.shape != student.shape or grad_out.dtype != student.dtype
            or not grad_out.flags.c_contiguous):
        raise ValueError(f"grad_out must be a C-contiguous ndarray of shape {student.shape} and dtype {student.dtype}")
    return grad_out


def _kernel_arguments(plan: LossPlan, term: LossTerm, student: np.ndarray) -> tuple:
    """Positional arguments of loss_rows for one term: (kind, student, teacher, targets, row_weight)."""
    cols = slice(0, term.columns)
    teacher = None if term.kind == "cross_entropy" else plan.teacher[:, cols]
    targets = plan.targets if term.kind == "cross_entropy" else None
    return term.kind, student[:, cols], teacher, targets, term.row_weight


def _evaluate_direct(plan: LossPlan, student: np.ndarray, kernel, grad: np.ndarray) -> np.ndarray:
    """Direct form: each term through kernel.loss_rows on whole rows; -> per-row weighted values [N].

    The first term writes the gradient in place. On host backends a later term (kd_loss's CE) adds
    into it a block of ACCUMULATE_ROWS rows at a time through one scratch buffer, so the extra memory
    is one [ACCUMULATE_ROWS, V] block instead of a second [N, V] gradient.
    """
    on_host = isinstance(kernel.asarray(np.zeros(1)), np.ndarray)
    per_row = np.zeros(student.shape[0])
    for k, term in enumerate(plan.terms):
        if k > 0 and on_host:
            scratch = np.empty((min(ACCUMULATE_ROWS, student.shape[0]), term.columns), dtype=student.dtype)
            for rows in _blocks(student.shape[0], ACCUMULATE_ROWS):
                block = plan.rows(rows)
                values, g = _term_rows(kernel, block, k, student[rows], scratch[:rows.stop - rows.start])
                grad[rows, :term.columns] += g
                per_row[rows] += block.terms[k].row_weight * values
            continue
        into = grad[:, :term.columns] if k == 0 and on_host else None
        values, g = _term_rows(kernel, plan, k, student, into)
        if k == 0:
            grad[:, term.columns:] = 0
            if into is None:
                grad[:, :term.columns] = kernel.to_numpy(g)
        else:
            grad[:, :term.columns] += kernel.to_numpy(g)
        per_row += term.row_weight * values
    return per_row


def _term_rows(kernel, plan: LossPlan, k: int, student: np.ndarray, grad_out) -> tuple[np.ndarray, object]:
    """kernel.loss_rows for plan.terms[k] on student rows [n, V]; -> (values [n], grad [n, columns])."""
    term = plan.terms[k]
    kind, s, t, targets, weight = _kernel_arguments(plan, term, student)
    return kernel.loss_rows(kind, kernel.asarray(s), None if t is None else kernel.asarray(t), targets, weight,
                            temperature=term.temperature, beta=term.beta, label_smoothing=term.label_smoothing,
                            grad_out=grad_out)


def _evaluate_streaming(plan: LossPlan, student: np.ndarray, chunks: tuple[int, int], grad: np.ndarray) -> np.ndarray:
    """Streaming form: blocks of chunk_rows rows, each term streamed over chunk_vocab columns."""
    chunk_rows, chunk_vocab = chunks
    for term in plan.terms:  # validate once, before any work
        check_rows(*_kernel_arguments(plan, term, student), term.temperature, term.beta, term.label_smoothing, None)
    per_row = np.zeros(student.shape[0])
    for rows in _blocks(student.shape[0], chunk_rows):
        block = plan.rows(rows)
        if block.terms[0].columns < student.shape[1]:
            grad[rows] = 0
        for k, term in enumerate(block.terms):
            kind, s, t, targets, weight = _kernel_arguments(block, term, student[rows])
            values = _stream_block(kind, s, t, targets, weight, term.temperature, term.beta, term.label_smoothing,
                                   chunk_vocab, grad[rows, :term.columns],
                                   accumulate=k > 0 or term.columns < student.shape[1])
            per_row[rows] += weight * values
    return per_row


def _evaluate_fused(plan: LossPlan, head: LinearHead, kernel) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Fused form: per block of rows, logits = hidden @ W^T, the direct form, then the two matmuls back."""
    hidden = head.hidden.reshape(-1, head.hidden.shape[-1])
    weight = head.weight
    grad_hidden = np.empty_like(hidden)
    grad_weight = np.zeros_like(weight)
    per_row = np.zeros(hidden.shape[0])
    logits = np.empty((min(head.chunk_rows, hidden.shape[0]), weight.shape[0]), dtype=hidden.dtype)
    grad_logits = np.empty_like(logits)
    for rows in _blocks(hidden.shape[0], head.chunk_rows):
        r = rows.stop - rows.start
        np.matmul(hidden[rows], weight.T, out=logits[:r])
        per_row[rows] = _evaluate_direct(plan.rows(rows), logits[:r], kernel, grad_logits[:r])
        np.matmul(grad_logits[:r], weight, out=grad_hidden[rows])
        grad_weight += grad_logits[:r].T @ hidden[rows]
    return per_row, (grad_hidden.reshape(head.hidden.shape), grad_weight)


# ---------------------------------------------------------------- public losses


def cross_entropy(student, targets, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                  reduction: str = "mean", backend="numpy", chunk_size=None, grad_out=None):
    """Cross-entropy of student logits [N, V] | [B, T, V] against target ids [N] | [B, T].

    Rows whose target equals ignore_index are dropped (value 0, gradient 0); the others must lie in
    [0, V). label_smoothing eps mixes the one-hot target with eps / V (PyTorch's definition).
    reduction "mean" (default, PyTorch) and "batchmean" divide by the kept rows, "sum" sums,
    "none" gives per-row values. backend names the kernel (direct form); chunk_size
    (chunk_rows, chunk_vocab) selects the streaming form; a LinearHead student the fused form.
    Returns (value, grad_student_logits); see `evaluate`.
    """
    leading, _ = _check_student(student)
    targets = _check_ids("targets", targets, leading)
    weights = row_weights(leading, targets != _check_ignore_index(ignore_index), reduction, 1.0)
    term = LossTerm("cross_entropy", weights, student.shape[-1],
                    label_smoothing=_check_fraction("label_smoothing", label_smoothing))
    plan = LossPlan((term,), None, targets, leading, reduction == "none")
    return evaluate(plan, student, backend=backend, chunk_size=chunk_size, grad_out=grad_out)


def divergence(kind: str, student, teacher, *, beta: float = 0.0, mask=None, labels=None, ignore_index: int = -100,
               temperature: float = 1.0, scale_by_t2: bool = False, reduction: str = "batchmean",
               vocab_policy: str = "error", backend="numpy", chunk_size=None, grad_out=None):
    """A divergence between teacher and student logits ([N, V] | [B, T, V], same dtype), per token.

    kind: "forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl" (see loss_rows); beta is
    the JSD interpolation or the skew alpha. Rows: mask (bool, True keeps) or labels with
    ignore_index select the tokens that count. temperature T divides both logits; scale_by_t2
    multiplies the loss by T^2. reduction: "batchmean" (default) = sum / leading dimension when
    unmasked (PyTorch) and sum / kept tokens when masked (TRL); "mean" = sum / kept tokens; "sum";
    "none" (per-token values, masked ones 0). vocab_policy "error" rejects different vocabulary
    sizes, "truncate" cuts both to the smaller one (gradient 0 on the student's extra columns).
    Returns (value, grad_student_logits); see `evaluate` for backend / chunk_size / grad_out.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence kind must be one of {DIVERGENCES}, got {kind!r}")
    leading, _ = _check_student(student)
    teacher2d, columns = _check_teacher(student, teacher, vocab_policy)
    coefficient = _check_temperature(temperature, scale_by_t2)
    weights = row_weights(leading, _kept_rows(leading, mask, labels, ignore_index), reduction, coefficient)
    term = LossTerm(kind, weights, columns, float(temperature), _check_fraction("beta", beta))
    plan = LossPlan((term,), teacher2d, None, leading, reduction == "none")
    return evaluate(plan, student, backend=backend, chunk_size=chunk_size, grad_out=grad_out)


def forward_kl(student, teacher, **options):
    """KL(p_teacher || q_student) per token; options as `divergence` but beta. -> (value, grad_student_logits)."""
    return divergence("forward_kl", student, teacher, **_no_beta("forward_kl", options))


def reverse_kl(student, teacher, **options):
    """KL(q_student || p_teacher) per token (the paper's choice); options as `divergence` but beta."""
    return divergence("reverse_kl", student, teacher, **_no_beta("reverse_kl", options))


def _no_beta(name: str, options: dict) -> dict:
    """A plain KL has no beta, and a skew's weight is alpha: a beta passed to them (meant for generalized_jsd,
    or for `divergence`, which calls the skews' weight beta) is an error, not silently ignored."""
    if "beta" in options:
        owner = "its weight is alpha" if name.startswith("skew") else "it belongs to generalized_jsd and the skews"
        raise TypeError(f"{name} takes no beta ({owner}), got beta={options['beta']!r}")
    return options


def generalized_jsd(student, teacher, beta: float = 0.5, **options):
    """TRL GKD's generalized JSD: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.

    beta 0 is forward_kl and beta 1 reverse_kl exactly (as TRL special-cases them); options as
    `divergence`.
    """
    return divergence("jsd", student, teacher, beta=beta, **options)


def skew_kl(student, teacher, alpha: float = 0.1, **options):
    """DistiLLM skew KL: KL(p || alpha p + (1 - alpha) q); options as `divergence`."""
    return divergence("skew_kl", student, teacher, beta=_check_fraction("alpha", alpha),
                      **_no_beta("skew_kl", options))


def skew_reverse_kl(student, teacher, alpha: float = 0.1, **options):
    """DistiLLM skew reverse KL: KL(q || (1 - alpha) p + alpha q); options as `divergence`."""
    return divergence("skew_reverse_kl", student, teacher, beta=_check_fraction("alpha", alpha),
                      **_no_beta("skew_reverse_kl", options))


def kd_loss(student, teacher, targets, *, alpha: float = 0.9, divergence: str | None = None, mode: str = "paper",
            beta: float = 0.5, temperature: float = 1.0, scale_by_t2: bool = False, ignore_index: int = 0,
            mask=None, label_smoothing: float = 0.0, vocab_policy: str | None = None, backend="numpy",
            chunk_size=None, grad_out=None):
    """The paper's objective alpha * KD + (1 - alpha) * CE on one set of student logits.

    student [N, V] | [B, T, V], teacher [..., Vt], targets [N] | [B, T] ids (ignore_index, default
    Mu's pad id 0, marks padding). The kept tokens are targets != ignore_index, or, when mask (bool [N] |
    [B, T], True keeps; e.g. KDBatch.valid_mask, which keeps a target token replaced by UNK = pad = 0) is
    given, mask's True entries (ignore_index is then not used, as in `divergence`); their targets must lie
    in [0, V). CE is on the student's full vocabulary at temperature 1, mean over kept tokens. KD per mode:
      "paper": divergence (default "reverse_kl", as the paper's text says; any divergence kind, beta
        its parameter), temperature / scale_by_t2, over the kept tokens, sum / kept tokens; vocab_policy
        default "error".
      "public_code": exactly microsoft/encoder-decoder-slm: forward KL, no mask, batchmean over all
        B*T rows, both vocabularies cut to the smaller one; divergence, temperature, scale_by_t2, mask,
        label_smoothing and vocab_policy must be left at their defaults (or name that behaviour).
    alpha 0 is the CE alone and alpha 1 the KD alone (the other term is not evaluated).
    Returns (value, grad_student_logits); see `evaluate` for backend / chunk_size / grad_out.
    """
    leading, vocab = _check_student(student)
    alpha = _check_fraction("alpha", alpha)
    targets = _check_ids("targets", targets, leading)
    kept = targets != _check_ignore_index(ignore_index) if mask is None else _check_mask(mask, leading)
    if kept.any() and not (0 <= targets[kept].min() and targets[kept].max() < vocab):  # checked even at alpha 1
        which = "that are not ignore_index" if mask is None else "where mask is True"
        raise ValueError(f"targets {which} must lie in [0, {vocab}), got values in "
                         f"[{targets[kept].min()}, {targets[kept].max()}]")
    if mode == "paper":
        kind, policy, kd_kept = divergence or "reverse_kl", vocab_policy or "error", kept
    elif mode == "public_code":
        if divergence not in (None, "forward_kl") or vocab_policy not in (None, "truncate") or temperature != 1.0 \
                or scale_by_t2 or label_smoothing != 0.0 or mask is not None:
            raise ValueError("mode='public_code' is forward KL at temperature 1 without T^2, label smoothing, a mask "
                             "or a vocabulary error: leave divergence, temperature, scale_by_t2, mask, "
                             "label_smoothing and vocab_policy unset")
        kind, policy, kd_kept = "forward_kl", "truncate", None
    else:
        raise ValueError(f"mode must be 'paper' or 'public_code', got {mode!r}")
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {kind!r}")
    teacher2d, columns = _check_teacher(student, teacher, policy)
    coefficient = alpha * _check_temperature(temperature, scale_by_t2)
    rows = (int(np.prod(leading)),)  # KD batchmean counts every token (the code flattens to [B*T, V])
    terms = (LossTerm(kind, row_weights(rows, kd_kept, "batchmean", coefficient), columns, float(temperature),
                      _check_fraction("beta", beta)),
             LossTerm("cross_entropy", row_weights(leading, kept, "mean", 1.0 - alpha), vocab,
                      label_smoothing=_check_fraction("label_smoothing", label_smoothing)))
    plan = LossPlan(terms, teacher2d, targets, leading, False)
    return evaluate(plan, student, backend=backend, chunk_size=chunk_size, grad_out=grad_out)


LOSSES = {"cross_entropy": cross_entropy, "forward_kl": forward_kl, "reverse_kl": reverse_kl,
          "generalized_jsd": generalized_jsd, "skew_kl": skew_kl, "skew_reverse_kl": skew_reverse_kl,
          "kd_loss": kd_loss}


def fused_linear_loss(hidden: np.ndarray, lm_head: np.ndarray, *inputs, loss: str = "kd_loss",
                      chunk_rows: int = 1024, **options):
    """Liger-style fused head + loss: hidden [N, C] | [B, T, C], lm_head [V, C] -> (value, grad_hidden, grad_lm_head).

    Logits hidden @ lm_head^T are formed chunk_rows rows at a time and never held whole. loss names
    one of LOSSES; inputs are its positional arguments after the student (teacher logits and/or
    targets) and options its keywords, e.g.
    fused_linear_loss(h, W, teacher_logits, targets, loss="kd_loss", alpha=0.9).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    value, (grad_hidden, grad_lm_head) = LOSSES[loss](LinearHead(hidden, lm_head, chunk_rows), *inputs, **options)
    return value, grad_hidden, grad_lm_head

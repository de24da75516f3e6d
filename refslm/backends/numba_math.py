"""Scalar math and small building blocks shared by the numba kernels (imported only by the numba backend).

Numba's LLVM vectorises loops only when they hold no library call and no floating-point reduction
(we never ask for fast-math that changes the meaning of a number: no nnan/ninf). So:
- `fexp` is exp as a range reduction plus polynomial (no libm call, so loops around it vectorise):
  float64 within 1 ulp (degree-13 Taylor on |r| <= ln2/2), float32 evaluated in float64 with a
  degree-8 polynomial (error 2e-10 relative, then rounded once to float32). `fexp_fast` is the same
  for float64 but evaluates float32 in float32 (`exp_f32`, at most 1.2 ulp, twice the vector width):
  attention's softmax weights, where exp is a fifth of the kernel's time, use it.
- Sums run through `sum_reassoc`, the only function compiled with the 'reassoc' flag: a sum in a
  different order, exactly what BLAS and NumPy's pairwise sum also do; no other flag.
- `row_max` keeps 64 running maxima in a stack array (a vectorisable elementwise loop).
- `stack_tile` is a fixed-size scratch array on the stack; LLVM keeps it in registers, which is what
  makes the attention micro-kernels reach BLAS-like speed.
"""

from __future__ import annotations

import math
from types import FunctionType

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.np.numpy_support import carray

LANES = 64  # width of stack tiles: 4 zmm registers of float32 (not unrolled by LLVM, so loops vectorise)
TILE_ELEMS = 4 * LANES  # a stack tile holds up to 4 rows of LANES

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # fdlibm split of ln 2: n * _LN2_HI is exact for |n| < 2^11
_LN2_LO = 1.90821492927058770002e-10
_EXP_MAX_X = 709.782712893384  # largest x with finite exp(x)
_TAYLOR_13 = tuple(1.0 / math.factorial(k) for k in range(13, -1, -1))  # float64: error < 1 ulp on |r| <= ln2/2
_TAYLOR_8 = _TAYLOR_13[5:]  # float32 results: error 2e-10 relative, far below float32's half-ulp


def _pow2_intrinsic(int_type, float_type, bias: int, mantissa_bits: int):
    """An intrinsic 2.0 ** n (int_type n in the normal exponent range -> float_type), built from the
    exponent bits (no table, no libm)."""
    @intrinsic
    def pow2(typingctx, n):
        def codegen(context, builder, signature, args):
            biased = builder.add(args[0], context.get_constant(int_type, bias))
            bits = builder.shl(biased, context.get_constant(int_type, mantissa_bits))
            return builder.bitcast(bits, context.get_value_type(float_type))
        return float_type(int_type), codegen
    return pow2


_pow2 = _pow2_intrinsic(types.int64, types.float64, 1023, 52)  # n in [-1022, 1023]
_pow2_f32 = _pow2_intrinsic(types.int32, types.float32, 127, 23)  # n in [-126, 127]


@njit(cache=True, error_model="numpy")
def exp_poly(x, coefficients):
    """exp(x) for float64 x (coefficients _TAYLOR_13: float64 accuracy; _TAYLOR_8: enough for a
    float32 result): n = round(x / ln2), r = x - n ln2 (|r| <= ln2 / 2), exp(r) by Taylor,
    then scaled by 2^n in two exact steps (the second may round into the subnormal range)."""
    xc = min(max(x, -746.0), _EXP_MAX_X)
    n = math.floor(xc * _LOG2E + 0.5)
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    p = 0.0
    for c in coefficients:
        p = p * r + c
    ni = np.int64(n)
    n1 = min(max(ni, -1022), 1023)
    y = (p * _pow2(n1)) * _pow2(ni - n1)
    y = math.inf if x > _EXP_MAX_X else y
    return x if x != x else y  # NaN stays NaN


def fexp(x):
    """exp(x) in x's float type; vectorisable (see the module docstring for the accuracy)."""
    return math.exp(x)


@overload(fexp)
def _fexp_overload(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: np.float32(exp_poly(np.float64(x), _TAYLOR_8))
    return lambda x: exp_poly(np.float64(x), _TAYLOR_13)


_F32_LN2_HI = 0.693145751953125  # ln 2 split for float32: n * _F32_LN2_HI is exact for |n| < 2^8
_F32_LN2_LO = 1.428606765330187e-06
_F32_EXP_MAX_X = 88.72283  # largest float32 x with finite exp(x)


@njit(cache=True, error_model="numpy")
def exp_f32(x):
    """exp(x) for float32 x computed in float32 (twice the vector width of exp_poly): n = round(x / ln2),
    r = x - n ln2, degree-7 Taylor in Horner form, scaled by 2^n in two exact steps. Error at most 1.19
    ulp (measured over 6e6 points in [-87, 88]; NumPy's own float32 exp: 2.4); exp(-inf) = 0, NaN stays NaN."""
    xc = min(max(x, np.float32(-104.0)), np.float32(_F32_EXP_MAX_X))
    n = np.floor(xc * np.float32(_LOG2E) + np.float32(0.5))  # float32 (math.floor would promote to float64)
    r = (xc - n * np.float32(_F32_LN2_HI)) - n * np.float32(_F32_LN2_LO)
    p = np.float32(1 / 5040)
    p = p * r + np.float32(1 / 720)
    p = p * r + np.float32(1 / 120)
    p = p * r + np.float32(1 / 24)
    p = p * r + np.float32(1 / 6)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1)
    p = p * r + np.float32(1)
    ni = np.int32(n)
    n1 = min(max(ni, np.int32(-126)), np.int32(127))
    y = (p * _pow2_f32(n1)) * _pow2_f32(ni - n1)
    y = np.float32(np.inf) if x > np.float32(_F32_EXP_MAX_X) else y
    return x if x != x else y


def fexp_fast(x):
    """exp(x) in x's float type: exp_f32 for float32 (1.2 ulp), fexp for float64 (1 ulp)."""
    return math.exp(x)


@overload(fexp_fast)
def _fexp_fast_overload(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: exp_f32(x)
    return lambda x: fexp(x)  # float64: fexp itself


def exp_coefficients(out):
    """The Taylor coefficients `exp_poly` needs for results in out's dtype (a compile-time constant)."""


@overload(exp_coefficients)
def _exp_coefficients_overload(out):
    coefficients = _TAYLOR_8 if out.dtype.bitwidth == 32 else _TAYLOR_13
    return lambda out: coefficients


@njit(cache=True, error_model="numpy")
def tanh_from_exp(y, coefficients):
    """tanh(y) = sign(y) (1 - 2 / (exp(2|y|) + 1)) in float64, exp from exp_poly(., coefficients)."""
    t = 1.0 - 2.0 / (exp_poly(2.0 * abs(y), coefficients) + 1.0)
    return t if y >= 0 else -t


@njit(cache=True, error_model="numpy")
def sigmoid(x, coefficients):
    """1 / (1 + exp(-x)) in float64, as e / (1 + e) with e = exp(-|x|) for x < 0 (no overflow)."""
    e = exp_poly(-abs(x), coefficients)
    return 1.0 / (1.0 + e) if x >= 0 else e / (1.0 + e)


@njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def sum_reassoc(x, n):
    """sum(x[:n]) in x's dtype, the order left to the vectoriser (the function's only flag is 'reassoc')."""
    total = x.dtype.type(0)
    for i in range(n):
        total += x[i]
    return total


@intrinsic
def _stack_pointer(typingctx, dtype):
    """A pointer to TILE_ELEMS uninitialised elements of dtype in the calling function's stack frame."""
    def codegen(context, builder, signature, args):
        ty = context.get_value_type(dtype.dtype)
        return cgutils.alloca_once(builder, ty, size=context.get_constant(types.intp, TILE_ELEMS))
    return types.CPointer(dtype.dtype)(dtype), codegen


@njit(inline="always")
def stack_tile(rows, dtype):
    """[rows, LANES] scratch array of dtype on the stack (rows <= 4); uninitialised."""
    return carray(_stack_pointer(dtype), (rows, LANES))


@njit(cache=True, error_model="numpy")
def max_of_lanes(x):
    """max(x[:LANES]) by a halving tree of elementwise maxima (vectorisable)."""
    tree = stack_tile(1, x.dtype)[0]
    tree[:] = x[:LANES]
    width = LANES // 2
    while width:
        for u in range(width):
            tree[u] = tree[u + width] if tree[u + width] > tree[u] else tree[u]
        width //= 2
    return tree[0]


@njit(cache=True, error_model="numpy")
def row_max(x, n):
    """max(x[:n]) (-inf for n == 0); 64 running maxima, so the main loop vectorises."""
    lanes = stack_tile(1, x.dtype)[0]
    for u in range(LANES):
        lanes[u] = -np.inf
    full = n - n % LANES
    for i0 in range(0, full, LANES):
        for u in range(LANES):
            v = x[i0 + u]
            lanes[u] = v if v > lanes[u] else lanes[u]
    best = max_of_lanes(lanes)
    for i in range(full, n):
        best = x[i] if x[i] > best else best
    return best


PARALLEL_MIN_WORK = 1 << 20  # below this many element operations a parallel launch costs more than it saves


class ParallelKernel:
    """A kernel compiled twice from one function: parallel (prange over threads) and serial.

    Calling it with a work estimate picks the parallel build only for large work: a parallel launch
    costs tens of microseconds (milliseconds when the cores are oversubscribed), more than a decode
    step's small kernels take on one core. The serial build is a renamed copy, so the two never
    share an on-disk cache entry.
    """

    def __init__(self, fn):
        twin = FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_serial"
        self.__doc__ = fn.__doc__
        self.parallel = njit(cache=True, error_model="numpy", parallel=True)(fn)
        self.serial = njit(cache=True, error_model="numpy")(twin)

    def __call__(self, work, *args):
        """Run on args with the parallel build when work >= PARALLEL_MIN_WORK, else the serial one."""
        return (self.parallel if work >= PARALLEL_MIN_WORK else self.serial)(*args)

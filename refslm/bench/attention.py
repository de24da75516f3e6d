"""`refslm bench attention`: fused attention per backend vs the NumPy reference, in one run.

Default: 1 batch x 6 heads x 2048 tokens x head_dim 64 (the paper's 330M attention shape), float32,
causal and bidirectional self-attention. Reports median wall time, peak extra memory seen by
tracemalloc (NumPy buffers; the numba kernel's per-thread scratch is allocated by numba's runtime,
invisible to tracemalloc, and is printed as its exact size instead), the speed-up over NumPy, and
the rate of the two products beside NumPy's BLAS GEMM rate measured in the same run.
"""

from __future__ import annotations

import os

import numpy as np

from ..backends import get_backend
from . import add_backend_argument, gemm_gflops, peak_extra_bytes, positive_int, selected_backends, time_call


def arguments(parser) -> None:
    parser.add_argument("--heads", type=positive_int, default=6)
    parser.add_argument("--tokens", type=positive_int, default=2048)
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--repeat", type=positive_int, default=5, help="timed runs per case (median reported)")
    add_backend_argument(parser)  # numpy is always the baseline


def _numba_scratch_bytes(args, threads: int) -> int:
    """Bytes of per-thread scratch the fused numba kernel holds at once (independent of T)."""
    from ..backends.numba_attention import KEY_BLOCK, LANES, QUERY_TILE

    dp = -(-args.head_dim // LANES) * LANES
    elems = dp * QUERY_TILE + 2 * KEY_BLOCK * dp + KEY_BLOCK * QUERY_TILE + QUERY_TILE * dp + 4 * QUERY_TILE
    return threads * elems * np.dtype(args.dtype).itemsize


def run(args) -> int:
    rng = np.random.default_rng(0)
    shape = (1, args.heads, args.tokens, args.head_dim)
    q, k, v = (rng.standard_normal(shape).astype(args.dtype) for _ in range(3))
    backends = [get_backend(n) for n in ["numpy"] + [n for n in selected_backends(args) if n != "numpy"]]
    print(f"attention {shape} {args.dtype}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"[T, T] scores = {args.heads * args.tokens ** 2 * np.dtype(args.dtype).itemsize / 2**20:.0f} MiB")
    print(f"{'case':<15}{'backend':<9}{'median s':>10}{'peak extra MiB':>16}{'vs numpy':>10}{'GFLOP/s':>9}")
    rate = gemm_gflops(args.dtype, args.repeat)
    for causal in (True, False):
        products = 4 * args.heads * args.tokens ** 2 * args.head_dim / (2 if causal else 1)  # QK^T and PV, FLOP
        case = "causal" if causal else "bidirectional"
        baseline = None
        for backend in backends:
            name = backend.name
            qb, kb, vb = (backend.asarray(x) for x in (q, k, v))

            def call(backend=backend, qb=qb, kb=kb, vb=vb, causal=causal):
                return backend.to_numpy(backend.attention(qb, kb, vb, key_mask=None, causal=causal, q_start=0,
                                                          interleaved=False, mask_fill="finite_min"))

            timing = time_call(call, repeat=args.repeat)
            peak = peak_extra_bytes(call)
            if name == "numba":
                import numba

                peak += _numba_scratch_bytes(args, numba.get_num_threads())
            baseline = baseline or timing["median_s"]
            print(f"{case:<15}{name:<9}{timing['median_s']:>10.4f}{peak / 2**20:>16.2f}"
                  f"{baseline / timing['median_s']:>9.2f}x{products / timing['median_s'] / 1e9:>9.1f}")
    print("peak extra memory includes the [1, H, T, D] output; numba adds its per-thread scratch (exact size).")
    print(f"GFLOP/s counts the QK^T and PV products only (causal: the visible half); NumPy's BLAS GEMM "
          f"([1024, 1024] @ [1024, 4096]) ran at {rate:.0f} GFLOP/s in this run.")
    return 0

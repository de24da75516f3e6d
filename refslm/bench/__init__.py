"""`refslm bench SUITE`: benchmarks reported as ratios against baselines run in the same process.

Each suite is a module refslm.bench.SUITE with `arguments(parser)` and `run(args) -> int`.
Shared helpers: `time_call` (median wall time), `gemm_gflops` (the BLAS rate now) and
`peak_extra_bytes` (tracemalloc peak above the starting point; NumPy reports its buffers to
tracemalloc).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable

SUITES = {
    "loss": "value + gradient of the KD losses (paper setting 4096 x 32064)",
    "attention": "fused attention vs the NumPy reference",
    "gemm": "matrix multiply GFLOP/s per backend",
    "model": "first-token latency and decode tokens/s of a model per backend",
    "paper": "the paper's encoder-decoder vs decoder-only efficiency claims",
}


def time_call(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> dict[str, float]:
    """Run fn warmup times, then repeat times; -> {'median_s', 'min_s', 'max_s'}."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def gemm_gflops(dtype: str, repeat: int) -> float:
    """This machine's float GEMM rate now, GFLOP/s: NumPy's BLAS on [1024, 1024] @ [1024, 4096] (median)."""
    import numpy as np

    a = np.full((1024, 1024), 0.5, dtype=dtype)
    b = np.full((4096, 1024), 0.25, dtype=dtype)
    seconds = time_call(lambda: a @ b.T, repeat=repeat + 1, warmup=1)["median_s"]
    return 2 * a.shape[0] * a.shape[1] * b.shape[0] / seconds / 1e9


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated (NumPy buffers included) while fn runs, above what was live before."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return max(0, peak - base)


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)  # counts, sizes, repeats
seed_int = int_at_least(0)


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated ints >= 1, e.g. '256,512'."""
    values = [positive_int(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1, got {text!r}")
    return values


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (ceilings in GFLOP/s, GB/s)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def add_backend_argument(parser) -> None:
    """`--backend NAME [NAME ...]`, also repeatable; default (None): every installed backend."""
    from ..backends import backend_names

    parser.add_argument("--backend", nargs="+", action="extend", metavar="NAME", choices=backend_names(),
                        help="backends to run: numpy, numba, opencl (default: every installed one)")


def selected_backends(args) -> list[str]:
    """The --backend names in order without repeats, or every installed backend when none was given.

    A named backend that cannot run here (package missing, no device) raises BackendUnavailable, which
    `bench_command` reports as an error: a requested backend is never skipped in silence.
    """
    from ..backends import available_backends, get_backend

    if not args.backend:
        return available_backends()
    names = list(dict.fromkeys(args.backend))
    for name in names:
        get_backend(name)
    return names


def bench_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name, help_text in SUITES.items():
        importlib.import_module(f"refslm.bench.{name}").arguments(sub.add_parser(name, help=help_text))


def bench_command(args) -> int:
    """Run the suite; -> its exit status, or 2 with the reason on stderr when a backend it needs cannot run
    here (as `refslm verify` does)."""
    from ..backends import BackendUnavailable

    try:
        return int(importlib.import_module(f"refslm.bench.{args.suite}").run(args) or 0)
    except BackendUnavailable as exc:
        print(f"refslm bench {args.suite}: error: {exc}", file=sys.stderr)
        return 2

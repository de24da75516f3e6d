"""`refslm bench gemm`: matrix-multiply GFLOP/s of the linear op per backend, beside NumPy's BLAS.

For each size n: y = x @ W^T with x [n, n], W [n, n] (the Linear layout), inputs resident on the
backend's device, timed with refslm.bench.time_call (median; the OpenCL queue is drained inside the
timed call). Also one decode-shaped GEMV (x [1, K], W [N, K]) reported as GB/s of weight read.
Every result is checked against float64 NumPy (max |error| / max |reference|). Optional OpenCL GEMM
tiles ('TM,TN,TK,RM,RN') are swept with --tiles.
"""

from __future__ import annotations

import argparse

import numpy as np

from ..backends import get_backend
from . import add_backend_argument, positive_int, positive_ints, selected_backends, time_call


def gemv_shape(text: str) -> list[int]:
    """argparse type: 'N,K', two ints >= 1."""
    shape = positive_ints(text)
    if len(shape) != 2:
        raise argparse.ArgumentTypeError(f"expected N,K (two ints >= 1), got {text!r}")
    return shape


def arguments(parser) -> None:
    parser.add_argument("--sizes", type=positive_ints, default="256,512,1024",
                        help="comma-separated square sizes n (default %(default)s)")
    parser.add_argument("--gemv", type=gemv_shape, default="4096,1024",
                        help="N,K of the decode GEMV (default %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    add_backend_argument(parser)
    parser.add_argument("--tiles", default="", help="OpenCL GEMM tiles to sweep, ';'-separated 'TM,TN,TK,RM,RN'")
    parser.add_argument("--repeat", type=positive_int, default=5)


def _runners(names: list[str], tiles: list[str]):
    """-> [(label, backend, finish)]; finish() waits for the backend's queued work."""
    runners = []
    for backend in map(get_backend, names):
        if backend.name != "opencl":
            runners.append((backend.name, backend, lambda: None))
            continue
        print(f"opencl device: {backend.device_name}, default tile {backend.gemm_tile}")
        runners.append((f"opencl {_tile_label(backend.gemm_tile)}", backend, backend.queue.finish))
        for tile in tiles:
            from ..backends.opencl_backend import OpenCLBackend

            variant = OpenCLBackend(device=f"{backend.device.name}", gemm_tile=tile)
            runners.append((f"opencl {_tile_label(variant.gemm_tile)}", variant, variant.queue.finish))
    return runners


def _tile_label(tile) -> str:
    return f"tile {tile.tm}x{tile.tn}x{tile.tk}/{tile.rm}x{tile.rn}"


def _measure(backend, finish, x: np.ndarray, w: np.ndarray, repeat: int) -> tuple[float, np.ndarray]:
    """-> (median seconds of one linear, its result on the host)."""
    xd, wd = backend.asarray(x), backend.asarray(w)

    def call():
        out = backend.linear(xd, wd)
        finish()
        return out

    seconds = time_call(call, repeat=repeat)["median_s"]
    return seconds, backend.to_numpy(backend.linear(xd, wd))


def _error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-300))


def _row(case: str, label: str, seconds: float, rate: str, ratio: float, err: float) -> None:
    print(f"{case:>18} {label:>34} {seconds * 1e3:10.3f} {rate:>15} {ratio:8.2f} {err:9.2e}")


def run(args) -> int:
    dtype = np.dtype(args.dtype)
    sizes = args.sizes
    tiles = [t for t in args.tiles.split(";") if t]
    runners = _runners(selected_backends(args), tiles)
    rng = np.random.default_rng(0)
    ok = True
    print(f"{'case':>18} {'backend':>34} {'median ms':>10} {'rate':>15} {'vs numpy':>8} {'rel err':>9}")
    for n in sizes:
        x = rng.standard_normal((n, n)).astype(dtype)
        w = rng.standard_normal((n, n)).astype(dtype)
        ref = x.astype(np.float64) @ w.astype(np.float64).T
        base = None
        for label, backend, finish in runners:
            seconds, got = _measure(backend, finish, x, w, args.repeat)
            gflops = 2 * n**3 / seconds / 1e9
            base = base or gflops
            err = _error(got, ref)
            ok &= err < (1e-4 if dtype == np.float32 else 1e-12)
            _row(f"gemm n={n}", label, seconds, f"{gflops:.1f} GFLOP/s", gflops / base, err)
    n_out, k = args.gemv
    x = rng.standard_normal((1, k)).astype(dtype)
    w = rng.standard_normal((n_out, k)).astype(dtype)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    base = None
    for label, backend, finish in runners[:2] if len(runners) > 1 else runners:
        seconds, got = _measure(backend, finish, x, w, args.repeat)
        gbs = w.nbytes / seconds / 1e9
        base = base or gbs
        err = _error(got, ref)
        ok &= err < (1e-4 if dtype == np.float32 else 1e-12)
        label = label.split(" tile")[0]
        _row(f"gemv {n_out}x{k}", label, seconds, f"{gbs:.1f} GB/s", gbs / base, err)
    if not ok:
        print("FAILED: a result differs from float64 NumPy beyond the dtype's tolerance")
    return 0 if ok else 1

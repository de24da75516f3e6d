"""Benchmark harness: the measuring helpers and every `refslm bench` suite end to end at tiny sizes.

Nothing here asserts a speed (timings vary on shared machines); it checks that each suite runs,
reports every requested backend, and that the helpers measure what they claim.
"""

import re

import numpy as np
import pytest
from test_backends import hide_package

from refslm.backends import available_backends
from refslm.bench import peak_extra_bytes, time_call
from refslm.cli import main


def test_peak_extra_bytes_sees_a_numpy_allocation():
    nbytes = 8 * 1_000_000
    assert peak_extra_bytes(lambda: np.ones(1_000_000)) >= nbytes
    kept = np.ones(1_000_000)  # live before the measurement: not "extra"
    assert peak_extra_bytes(lambda: kept.sum()) < nbytes // 8


def test_time_call_reports_median_min_max(monkeypatch):
    clock = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])  # three timed calls of 3, 1 and 2 s
    monkeypatch.setattr("refslm.bench.time.perf_counter", lambda: next(clock))
    calls = []
    stats = time_call(lambda: calls.append(1), repeat=3, warmup=2)
    assert len(calls) == 5  # warm-up calls are not timed
    assert stats == {"median_s": 2.0, "min_s": 1.0, "max_s": 3.0}


BACKENDS = [b for b in ("numpy", "numba") if b in available_backends()]


@pytest.mark.parametrize("argv,row", [  # row: a result line of backend {name}, with a number after it
    (["loss", "--rows", "16", "--vocab", "40", "--repeat", "1", "--no-torch"], r"^{name} direct +\d"),
    (["attention", "--tokens", "24", "--heads", "2", "--head-dim", "8", "--repeat", "1"], r"^causal +{name} +\d"),
    (["gemm", "--sizes", "32", "--gemv", "64,32", "--repeat", "1"], r"^ *gemm n=32 +{name} +\d"),
    (["model", "--preset", "tiny", "--input-len", "8", "--new-tokens", "2", "--repeat", "1"], r"^{name} +\d"),
])
def test_bench_suite_runs_and_reports_each_backend(argv, row, capsys):
    assert main(["bench", *argv, "--backend", *BACKENDS]) == 0
    out = capsys.readouterr().out
    for name in BACKENDS:
        assert re.search(row.format(name=name), out, re.MULTILINE), f"bench {argv[0]} printed no row for {name}"


@pytest.mark.parametrize("argv", [
    ["loss", "--rows", "16", "--vocab", "40", "--repeat", "1", "--no-torch", "--backend", "numba"],
    ["attention", "--tokens", "24", "--heads", "2", "--head-dim", "8", "--repeat", "1", "--backend", "numba"],
    ["gemm", "--sizes", "32", "--gemv", "64,32", "--repeat", "1", "--backend", "numba"],
    ["model", "--preset", "tiny", "--input-len", "8", "--new-tokens", "2", "--repeat", "1", "--backend", "numpy",
     "numba"],
    ["paper", "--quick", "--backend", "numba"],
])
def test_bench_requested_backend_that_cannot_run_is_an_error(argv, monkeypatch, capsys):
    """gemm and attention printed "skipped" and an empty table and exited 0, model exited 0 beside numpy (1
    alone), loss raised a traceback, paper exited 0: now each says why and exits 2, as `refslm verify` does."""
    hide_package(monkeypatch, "numba", "numba")
    assert main(["bench", *argv]) == 2
    out, err = capsys.readouterr()
    assert "random weights built" not in out and "median" not in out  # refused before any model or timing
    assert f"refslm bench {argv[0]}: error: backend 'numba' is not available" in err
    assert "pip install 'refslm[numba]'" in err


def test_bench_unknown_suite_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "speed"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_bench_attention_prints_the_products_rate_and_blas_rate(capsys):
    assert main(["bench", "attention", "--tokens", "24", "--heads", "2", "--head-dim", "8", "--repeat", "1",
                 "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "GFLOP/s" in out.splitlines()[1] and "NumPy's BLAS GEMM" in out


@pytest.mark.skipif("opencl" not in available_backends(), reason="no usable OpenCL device")
def test_bench_model_reports_opencl_launches_per_step(capsys):
    assert main(["bench", "model", "--preset", "tiny", "--input-len", "8", "--new-tokens", "2", "--repeat", "1",
                 "--backend", "opencl"]) == 0
    # tiny encoder-decoder, one decoder block: 3 + 7 self-attention + 4 cross-attention + 3 MLP kernels
    out = capsys.readouterr().out
    assert "opencl: 17 kernel launches per decode step" in out
    assert re.search(r"opencl: the device runs kernels \d+% of the decode time", out)


@pytest.mark.parametrize("argv,message", [
    (["gemm", "--sizes", "abc"], "argument --sizes: expected an int >= 1, got 'abc'"),
    (["gemm", "--sizes", "64,0"], "argument --sizes: expected an int >= 1, got 0"),
    (["gemm", "--gemv", "5"], r"argument --gemv: expected N,K \(two ints >= 1\), got '5'"),
    (["attention", "--backend", "cuda"], "argument --backend: invalid choice: 'cuda'"),
    (["loss", "--repeat", "0"], "argument --repeat: expected an int >= 1, got 0"),
    (["model", "--seed", "-1"], "argument --seed: expected an int >= 0, got -1"),
    (["model", "--bandwidth", "25", "inf"], "argument --bandwidth: expected a finite number > 0, got 'inf'"),
    (["paper", "--lengths", "128", "-4"], "argument --lengths: expected an int >= 1, got -4"),
])
def test_bench_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)

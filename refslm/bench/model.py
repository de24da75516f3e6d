"""`refslm bench model`: first-token latency and KV-cached decode tokens/s of one model, per backend.

    refslm bench model --preset paper-330m --input-len 1024 --new-tokens 32 --backend numpy --dtype float32

First token = everything up to the logits of the first new token (`refslm.generate.CachedDecoder`
construction: encoder + cross-attention K/V + decoder on BOS, or the decoder-only prefill). Decode =
`new_tokens` cached steps (greedy feed). Both are medians of `--repeat` runs after one warm-up run.
Each backend is reported against the machine ceilings of ../shared/reference/anchors.md (compute:
`--gflops` GFLOP/s of float32 GEMM on this machine class for the prefill FLOPs of refslm.flops;
bandwidth: `--bandwidth` GB/s for the weights and caches one decode step reads) and against the first
backend of the run. Backends that count their kernel launches (opencl) also report launches per
decode step, the decode time per launch and, from profiled kernel times over one more decode pass,
the share of the decode time the device spends running kernels: a low share means decoding is bound
by the host (launch cost), not by the device.
The load average is printed, since other work on the machine slows every figure.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .. import flops
from ..config import PRESETS
from . import add_backend_argument, gemm_gflops, positive_float, positive_int, seed_int, selected_backends, time_call

GEMM_GFLOPS = 185.0  # anchors.md: float32 GEMM through OpenBLAS, 2 cores, 180-190 GFLOP/s
BANDWIDTH_GBS = (25.0, 36.0)  # anchors.md: streaming read / large GEMV


def bytes_per_step(cfg, model_dtype: str, input_len: int, batch: int) -> int:
    """Bytes one decode step must read: weights used per token (linear FLOPs / 2 / batch) + its KV caches."""
    step = flops.decode_step_flops(cfg, input_len, 1, batch)
    weights = (step.projections + step.mlp + step.head) // (2 * batch)
    caches = flops.kv_cache_bytes(cfg, input_len, 2, model_dtype, batch)["total"]
    return weights * np.dtype(model_dtype).itemsize + caches


def machine_baselines(dtype: str, repeat: int) -> dict[str, float]:
    """This machine now: GEMM GFLOP/s (bench.gemm_gflops) and GEMV GB/s (a 256 MB matrix)."""
    w = np.full((256 * 2**20 // (4096 * np.dtype(dtype).itemsize), 4096), 0.5, dtype=dtype)
    x = np.full(4096, 0.5, dtype=dtype)
    gemv_s = time_call(lambda: w @ x, repeat=repeat + 1, warmup=1)["median_s"]
    return {"gemm_gflops": gemm_gflops(dtype, repeat), "gemv_gbs": w.nbytes / gemv_s / 1e9}


def measure(model, ids: np.ndarray, new_tokens: int, repeat: int) -> dict[str, float]:
    """-> {'first_token_s', 'decode_s' (new_tokens steps), 'decode_tok_s'} for one model on its backend."""
    from ..generate import CachedDecoder

    first = time_call(lambda: CachedDecoder(model, ids, new_tokens), repeat=repeat, warmup=1)["median_s"]
    decoder = CachedDecoder(model, ids, new_tokens * (repeat + 2))
    token = np.full(ids.shape[0], 5, dtype=np.int64)

    def decode() -> None:
        for _ in range(new_tokens):
            decoder.step(token)

    launches = getattr(model.backend, "launches", None)  # kernels enqueued (opencl)
    decode_s = time_call(decode, repeat=repeat, warmup=1)["median_s"]
    result = {"first_token_s": first, "decode_s": decode_s, "decode_tok_s": ids.shape[0] * new_tokens / decode_s}
    if launches is not None:
        result["launches_per_step"] = (model.backend.launches - launches) / ((repeat + 1) * new_tokens)
    if hasattr(model.backend, "kernel_seconds"):  # opencl: how much of a decode step the device computes
        wall, busy = model.backend.kernel_seconds(decode)
        result["kernel_busy_fraction"] = busy / wall
    return result


def format_table(rows: list[dict], ceilings: dict) -> str:
    """One row per backend: speed as a fraction of each ceiling ('anchor' = anchors.md, 'now' = the
    GEMM / GEMV baselines measured in this run) and the ratio to the first backend."""
    base = rows[0]
    head = (f"{'backend':<8} {'first token s':>13} {'GFLOP/s':>8} {'/anchor':>8} {'/now':>6} {'decode tok/s':>12} "
            f"{'/anchor':>8} {'/now':>6} {'first, x ' + base['backend']:>15} {'decode, x ' + base['backend']:>16}")
    lines = [head, "-" * len(head)]
    for r in rows:
        gflops = ceilings["prefill_flops"] / r["first_token_s"] / 1e9
        tok_s = r["decode_tok_s"]
        lines.append(
            f"{r['backend']:<8} {r['first_token_s']:>13.3f} {gflops:>8.1f} {gflops / ceilings['gflops']:>8.2f} "
            f"{gflops / ceilings['gemm_gflops']:>6.2f} {tok_s:>12.1f} {tok_s / ceilings['decode_tok_s'][1]:>8.2f} "
            f"{tok_s / ceilings['decode_now']:>6.2f} {base['first_token_s'] / r['first_token_s']:>14.2f}x "
            f"{tok_s / base['decode_tok_s']:>15.2f}x")
    low, high = ceilings["decode_tok_s"]
    lines += [
        f"anchor ceilings (anchors.md): first token >= {ceilings['first_token_s']:.2f} s "
        f"({ceilings['prefill_flops'] / 1e9:.0f} GFLOP at {ceilings['gflops']:.0f} GFLOP/s); decode <= {low:.0f}-"
        f"{high:.0f} tok/s ({ceilings['step_bytes'] / 1e9:.3f} GB read per step at {ceilings['bandwidth'][0]:.0f}-"
        f"{ceilings['bandwidth'][1]:.0f} GB/s; '/anchor' uses {high:.0f}).",
        f"measured now: GEMM {ceilings['gemm_gflops']:.0f} GFLOP/s -> first token >= "
        f"{ceilings['prefill_flops'] / ceilings['gemm_gflops'] / 1e9:.2f} s; GEMV {ceilings['gemv_gbs']:.1f} GB/s -> "
        f"decode <= {ceilings['decode_now']:.0f} tok/s."]
    return "\n".join(lines)


def arguments(parser) -> None:
    """Options of `refslm bench model`."""
    parser.add_argument("--preset", default="paper-330m", choices=sorted(PRESETS), help="model configuration")
    parser.add_argument("--input-len", type=positive_int, default=1024, help="encoder input / prompt length")
    parser.add_argument("--new-tokens", type=positive_int, default=32, help="decode steps timed")
    parser.add_argument("--batch", type=positive_int, default=1)
    add_backend_argument(parser)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--repeat", type=positive_int, default=2, help="timed runs (median reported) after one warm-up")
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--gflops", type=positive_float, default=GEMM_GFLOPS, help="compute ceiling, GFLOP/s")
    parser.add_argument("--bandwidth", type=positive_float, nargs=2, default=BANDWIDTH_GBS, metavar=("LOW", "HIGH"),
                        help="memory bandwidth ceiling range, GB/s")


def run(args) -> int:
    """Build the model once (random weights from --seed), time every backend, print the table."""
    from ..models import from_params, init

    for option in ("input_len", "new_tokens", "batch", "repeat"):
        if getattr(args, option) < 1:
            raise SystemExit(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    cfg = PRESETS[args.preset]()
    backends = selected_backends(args)
    print(f"refslm bench model: {args.preset}, input {args.input_len}, {args.new_tokens} new tokens, batch "
          f"{args.batch}, {args.dtype}, backends {backends}, median of {args.repeat}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    t0 = time.perf_counter()
    host = init(cfg, seed=args.seed, dtype=args.dtype)
    print(f"random weights built in {time.perf_counter() - t0:.1f} s")
    ids = np.random.default_rng(args.seed).integers(3, cfg.vocab_size, size=(args.batch, args.input_len))
    rows = []
    for name in backends:
        try:
            model = host if name == "numpy" else from_params(cfg, host.params, dtype=args.dtype, backend=name)
        except TypeError as exc:  # the backend cannot compute in --dtype (an OpenCL device without fp64)
            print(f"skipping backend {name}: {exc}")
            continue
        rows.append({"backend": name, **measure(model, ids, args.new_tokens, args.repeat)})
    if not rows:
        print("no backend could run")
        return 1
    prefill = flops.prefill_flops(cfg, args.input_len, args.batch).total
    step_bytes = bytes_per_step(cfg, args.dtype, args.input_len, args.batch)
    ceilings = {"prefill_flops": prefill, "gflops": args.gflops, "first_token_s": prefill / (args.gflops * 1e9),
                "step_bytes": step_bytes, "bandwidth": args.bandwidth,
                "decode_tok_s": tuple(args.batch * bw * 1e9 / step_bytes for bw in args.bandwidth)}
    ceilings.update(machine_baselines(args.dtype, args.repeat))
    ceilings["decode_now"] = args.batch * ceilings["gemv_gbs"] * 1e9 / step_bytes
    print(format_table(rows, ceilings))
    for r in rows:
        if "launches_per_step" in r:
            print(f"{r['backend']}: {r['launches_per_step']:.0f} kernel launches per decode step, "
                  f"{r['decode_s'] / args.new_tokens / r['launches_per_step'] * 1e6:.1f} us of decode time per launch")
        if "kernel_busy_fraction" in r:
            print(f"{r['backend']}: the device runs kernels {100 * r['kernel_busy_fraction']:.0f}% of the decode "
                  "time (profiled kernel times; the rest is host work and transfers)")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0

"""`refslm bench paper`: the paper's encoder-decoder vs decoder-only efficiency claims, measured.

For each size (the paper's 330M model and a small model with the same 2/3 - 1/3 split) it builds
the encoder-decoder (ED) from random weights and the matched decoder-only baseline (DO: the same
Mu blocks without cross-attention, the layer count that brings its parameter count closest to the
ED's). For each installed backend and input length it measures, median of --repeat runs (ED and DO
runs alternate):
first-token latency (`generate` of one token), end-to-end time and throughput (new tokens / end-to-end
time of `generate` of --new-tokens tokens), and once per size and length on the NumPy backend the
peak memory of a generation (tracemalloc, `peak_extra_bytes`, plus the weights) and its matmul FLOPs
counted by `CountingBackend`, checked against the analytic `refslm.flops` counts. Ratios ED/DO are
set beside the paper's figures. Writes paper.csv, paper.json and (with matplotlib) paper.png to --out.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .. import flops
from ..config import DecoderOnlyConfig, EncoderDecoderConfig, paper_330m
from . import (
    add_backend_argument,
    peak_extra_bytes,
    positive_int,
    seed_int,
    selected_backends,
    time_call,
)

# The paper's claims as ED/DO ratios (lower is better except throughput).
PAPER = {
    "first_token": (0.53, "47% lower first-token latency"),
    "throughput": (4.7, "4.7x throughput"),
    "memory": ((0.84, 0.89), "11-16% less memory"),
    "flops": (0.78, "~78% of the FLOPs (256 new tokens)"),
}
FULL = dict(sizes=("small", "330m"), lengths=(128, 256, 512, 1024, 2048), new_tokens=256, repeat=3)
QUICK = dict(sizes=("small",), lengths=(32, 64, 128), new_tokens=16, repeat=3)


def paper_small() -> EncoderDecoderConfig:
    """A ~6.6M-parameter model with the paper's 2/3 - 1/3 split: 6 encoder + 3 decoder blocks at 1/4 width.

    n_embd 256, qkv_embd 96 (6 query heads, 3 KV heads of 16), hidden 1024, vocabulary 4096 (the
    embedding keeps roughly the 330M model's share of the parameters).
    """
    return EncoderDecoderConfig(n_encoder_layer=6, n_decoder_layer=3, n_embd=256, qkv_embd=96, hidden_dim=1024,
                                n_head=6, n_kv_head=3, vocab_size=4096, eos_token_id=2)


SIZES = {"small": paper_small, "330m": paper_330m}


def matched_decoder_only(ed: EncoderDecoderConfig) -> DecoderOnlyConfig:
    """The Mu decoder-only baseline of ed: same attention/MLP fields, the n_layer whose total parameter
    count (refslm.flops.param_counts) is closest to ed's (the smaller on a tie)."""
    shared = {f.name: getattr(ed, f.name) for f in dataclasses.fields(DecoderOnlyConfig)
              if f.init and hasattr(ed, f.name)}
    target = flops.param_counts(ed)["total"]

    def build(n_layer: int) -> DecoderOnlyConfig:
        return DecoderOnlyConfig(**shared, n_layer=n_layer, layout="mu")

    one = flops.param_counts(build(1))["total"]
    per_block = flops.param_counts(build(2))["total"] - one
    guess = max(1, (target - (one - per_block)) // per_block)
    candidates = [n for n in (guess, guess + 1) if n >= 1]
    return build(min(candidates, key=lambda n: (abs(flops.param_counts(build(n))["total"] - target), n)))


# ---------------------------------------------------------------- measurement


def _input_ids(cfg: Any, batch: int, length: int, seed: int) -> np.ndarray:
    """[batch, length] int64 random ids avoiding pad (0), BOS and EOS (no padding, no early stop)."""
    rng = np.random.default_rng(seed)
    return rng.integers(3, cfg.vocab_size, size=(batch, length), dtype=np.int64)


def _time_pair(models: dict[str, Any], ids: np.ndarray, new_tokens: int, repeat: int) -> dict[str, dict[str, float]]:
    """Per model: median first-token latency (`generate` of 1 token), end-to-end time and tokens/s of greedy
    generation. The models take turns run by run, so a change in machine load hits both alike."""
    times: dict[str, dict[str, list[float]]] = {kind: {"first_token_s": [], "e2e_s": []} for kind in models}
    for _ in range(repeat):
        for kind, model in models.items():
            for metric, count in (("first_token_s", 1), ("e2e_s", new_tokens)):
                timing = time_call(lambda m=model, n=count: m.generate(ids, n, greedy=True), repeat=1, warmup=0)
                times[kind][metric].append(timing["median_s"])
    result = {}
    for kind, series in times.items():
        first, e2e = statistics.median(series["first_token_s"]), statistics.median(series["e2e_s"])
        result[kind] = {"first_token_s": first, "e2e_s": e2e, "throughput_tok_s": ids.shape[0] * new_tokens / e2e}
    return result


def _memory_and_flops(model: Any, ids: np.ndarray, new_tokens: int) -> dict[str, Any]:
    """One generation on a counting copy of the model (NumPy backend) under tracemalloc."""
    from ..models import from_params
    from .counting import CountingBackend

    cfg = model.config
    counter = CountingBackend(cfg, "numpy")
    counted = from_params(cfg, model.params, dtype=model.dtype, backend=counter)
    peak = peak_extra_bytes(lambda: counted.generate(ids, new_tokens, greedy=True))
    analytic = flops.generation_flops(cfg, ids.shape[1], new_tokens, ids.shape[0])
    weight_bytes = flops.param_counts(cfg)["total"] * np.dtype(model.dtype).itemsize
    batch, length = ids.shape
    kv = flops.kv_cache_bytes(cfg, length, new_tokens, model.dtype, batch)
    decode_bytes = sum(flops.decode_step_bytes(cfg, length, n, model.dtype, batch) for n in range(1, new_tokens))
    return {"peak_extra_bytes": peak, "memory_bytes": weight_bytes + peak, "kv_cache_bytes": kv["total"],
            "weights_kv_bytes": weight_bytes + kv["total"], "decode_bytes": decode_bytes,
            "prefill_flops": flops.prefill_flops(cfg, length, batch).total,
            "flops": analytic.total, "flops_counted": counter.flops.total,
            "flops_by_component": analytic.as_dict(), "flops_counted_by_component": counter.flops.as_dict()}


def _warm_up(model: Any) -> None:
    """One short generation, so JIT compilation and kernel builds are not timed."""
    model.generate(_input_ids(model.config, 1, 8, 0), 2, greedy=True)


def measure(sizes: list[str], lengths: list[int], new_tokens: int, repeat: int, backends: list[str],
            dtype: str = "float32", batch: int = 1, seed: int = 0, log=print) -> dict[str, Any]:
    """Run the sweep; -> {'meta': ..., 'rows': [one dict per size x backend x length]}."""
    rows, size_meta = [], {}
    for size in sizes:
        configs = {"ed": SIZES[size]()}
        configs["do"] = matched_decoder_only(configs["ed"])
        size_meta[size] = {kind: {"config": cfg.to_dict(), "params": flops.param_counts(cfg)}
                           for kind, cfg in configs.items()}
        rows += _measure_size(size, configs, lengths, new_tokens, repeat, backends, dtype, batch, seed, log)
    meta = {"argv": sys.argv[1:], "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__, "backends": backends, "dtype": dtype,
            "batch": batch, "repeat": repeat, "new_tokens": new_tokens, "lengths": lengths, "sizes": size_meta,
            "paper": PAPER,
            "memory_note": "peak_extra_bytes: tracemalloc peak of one generate on the NumPy backend; "
                           "memory_bytes = weights + peak_extra_bytes"}
    return {"meta": meta, "rows": rows}


def _measure_size(size: str, configs: dict[str, Any], lengths: list[int], new_tokens: int, repeat: int,
                  backends: list[str], dtype: str, batch: int, seed: int, log) -> list[dict[str, Any]]:
    """Memory and FLOPs once per length (NumPy), then the timings per backend and length.

    A backend that fails to build or warm up raises BackendUnavailable (`refslm bench` reports it, exit 2).
    """
    from ..models import from_params, init

    host = {kind: init(cfg, seed=seed, dtype=dtype) for kind, cfg in configs.items()}
    inputs = {length: _input_ids(configs["ed"], batch, length, seed + length) for length in lengths}
    static = {}
    for length in lengths:
        static[length] = {kind: _memory_and_flops(host[kind], inputs[length], new_tokens) for kind in configs}
        log(f"  {size} L={length}: memory and FLOP counts done (NumPy, tracemalloc)")
    rows = []
    for backend in backends:
        models = {kind: from_params(configs[kind], host[kind].params, dtype=dtype, backend=backend)
                  for kind in configs}
        for model in models.values():
            _warm_up(model)
        for length in lengths:
            timed = _time_pair(models, inputs[length], new_tokens, repeat)
            result = {kind: {**timed[kind], **static[length][kind]} for kind in configs}
            row = _row(size, backend, length, new_tokens, batch, result)
            log(f"  {size} {backend} L={length}: first token ED/DO {row['first_token_ratio']:.3f}, "
                f"throughput {row['throughput_ratio']:.2f}x, memory {row['memory_ratio']:.3f}, "
                f"FLOPs {row['flops_ratio']:.3f}")
            rows.append(row)
    return rows


METRICS = ("first_token_s", "e2e_s", "throughput_tok_s", "peak_extra_bytes", "memory_bytes", "kv_cache_bytes",
           "weights_kv_bytes", "prefill_flops", "decode_bytes", "flops", "flops_counted")
RATIOS = {"first_token": "first_token_s", "throughput": "throughput_tok_s", "e2e": "e2e_s",
          "memory": "memory_bytes", "peak_extra": "peak_extra_bytes", "kv_cache": "kv_cache_bytes",
          "weights_kv": "weights_kv_bytes", "prefill_flops": "prefill_flops", "decode_bytes": "decode_bytes",
          "flops": "flops"}
# What each claim's ratio would be on an ideal machine, from the analytic counts of the same row:
# compute-bound prefill, memory-bandwidth-bound decode (DO bytes / ED bytes), weights + KV cache, FLOPs.
ANALYTIC = {"first_token": lambda r: r["prefill_flops_ratio"], "throughput": lambda r: 1.0 / r["decode_bytes_ratio"],
            "memory": lambda r: r["weights_kv_ratio"], "flops": lambda r: r["flops_ratio"]}


def _row(size: str, backend: str, length: int, new_tokens: int, batch: int, result: dict) -> dict[str, Any]:
    """Flat row: measured ED and DO values, their ratios, and whether the FLOP counts agree."""
    row: dict[str, Any] = dict(size=size, backend=backend, input_len=length, new_tokens=new_tokens, batch=batch)
    for metric in METRICS:
        row[f"{metric}_ed"] = result["ed"][metric]
        row[f"{metric}_do"] = result["do"][metric]
    for name, metric in RATIOS.items():
        row[f"{name}_ratio"] = result["ed"][metric] / result["do"][metric]
    for component in flops.COMPONENTS:
        for kind in ("ed", "do"):
            row[f"flops_{component}_{kind}"] = result[kind]["flops_by_component"][component]
    row["flops_match"] = all(result[k]["flops"] == result[k]["flops_counted"] for k in ("ed", "do"))
    return row


# ---------------------------------------------------------------- reporting


def _fmt_paper(value: Any) -> str:
    return f"{value[0]:.2f}-{value[1]:.2f}" if isinstance(value, tuple) else f"{value:.2f}"


def format_table(result: dict[str, Any]) -> str:
    """The per-length table and the paper-vs-measured summary, as text."""
    rows = result["rows"]
    lines = ["size   backend  L     first-token ms ED / DO  (ratio)   tok/s ED / DO  (ratio)   "
             "memory MB ED / DO (ratio)   KV MB ED / DO   GFLOP ED / DO  (ratio)"]
    for r in rows:
        lines.append(
            f"{r['size']:<6} {r['backend']:<8} {r['input_len']:<5} "
            f"{1e3 * r['first_token_s_ed']:8.1f} / {1e3 * r['first_token_s_do']:8.1f} ({r['first_token_ratio']:.3f})   "
            f"{r['throughput_tok_s_ed']:6.1f} / {r['throughput_tok_s_do']:6.1f} ({r['throughput_ratio']:.2f}x)   "
            f"{r['memory_bytes_ed'] / 2**20:7.1f} / {r['memory_bytes_do'] / 2**20:7.1f} ({r['memory_ratio']:.3f})   "
            f"{r['kv_cache_bytes_ed'] / 2**20:6.2f} / {r['kv_cache_bytes_do'] / 2**20:6.2f}   "
            f"{r['flops_ed'] / 1e9:7.2f} / {r['flops_do'] / 1e9:7.2f} ({r['flops_ratio']:.3f})")
    lines += ["", "claim (ED/DO)     paper   measured (over lengths)   analytic bound   size, backend"]
    for size, backend in dict.fromkeys((r["size"], r["backend"]) for r in rows):
        subset = [r for r in rows if r["size"] == size and r["backend"] == backend]
        for name, (value, text) in PAPER.items():
            measured = [r[f"{name}_ratio"] for r in subset]
            bound = [ANALYTIC[name](r) for r in subset]
            lines.append(f"{name:<12} {_fmt_paper(value):>10}   {min(measured):6.3f} - {max(measured):6.3f}"
                         f"        {min(bound):6.3f} - {max(bound):6.3f}   {size}, {backend}  ({text})")
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    """paper.csv (one row per size x backend x length), paper.json (meta + rows), paper.png if matplotlib."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "paper.csv", out / "paper.json"]
    with open(written[0], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(result["rows"][0]))
        writer.writeheader()
        writer.writerows(result["rows"])
    written[1].write_text(json.dumps(result, indent=1, default=str))
    png = plot(result, out / "paper.png")
    return written + ([png] if png else [])


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """First-token latency and memory against input length, ED vs DO per size and backend (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for size, backend in dict.fromkeys((r["size"], r["backend"]) for r in rows):
        subset = [r for r in rows if r["size"] == size and r["backend"] == backend]
        lengths = [r["input_len"] for r in subset]
        for kind, style in (("ed", "-o"), ("do", "--s")):
            label = f"{kind.upper()} {size} {backend}"
            ax_t.plot(lengths, [1e3 * r[f"first_token_s_{kind}"] for r in subset], style, label=label)
            ax_m.plot(lengths, [r[f"memory_bytes_{kind}"] / 2**20 for r in subset], style, label=label)
    lengths = sorted({r["input_len"] for r in rows})
    for ax, ylabel in ((ax_t, "first-token latency (ms)"), (ax_m, "memory: weights + peak (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_yscale("log")
        ax.set_xlabel("input length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle("encoder-decoder (ED) vs decoder-only (DO), random weights")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- command line


def arguments(parser) -> None:
    """Options of `refslm bench paper`."""
    parser.add_argument("--quick", action="store_true",
                        help=f"small model only: lengths {QUICK['lengths']}, {QUICK['new_tokens']} new tokens")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), help=f"model sizes (default {FULL['sizes']})")
    parser.add_argument("--lengths", nargs="+", type=positive_int, help=f"input lengths (default {FULL['lengths']})")
    parser.add_argument("--new-tokens", type=positive_int, help=f"tokens generated (default {FULL['new_tokens']})")
    parser.add_argument("--repeat", type=positive_int,
                        help=f"timed runs per measurement, median reported (default {FULL['repeat']})")
    add_backend_argument(parser)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--out", type=Path, help="folder for paper.csv, paper.json, paper.png")


def run(args) -> int:
    """Resolve defaults (--quick or full), measure, print the table, write outputs; 1 if FLOP counts disagree."""
    defaults = QUICK if args.quick else FULL
    settings = {name: getattr(args, name) or defaults[name] for name in ("sizes", "lengths", "new_tokens", "repeat")}
    for option, values, least in (("--lengths", settings["lengths"], 1), ("--new-tokens", [settings["new_tokens"]], 2),
                                  ("--repeat", [settings["repeat"]], 1), ("--batch", [args.batch], 1)):
        if min(values) < least:
            raise SystemExit(f"{option} must be >= {least}, got {values}")
    backends = selected_backends(args)
    print(f"refslm bench paper: sizes {settings['sizes']}, lengths {settings['lengths']}, "
          f"{settings['new_tokens']} new tokens, median of {settings['repeat']}, backends {backends}")
    result = measure(list(settings["sizes"]), list(settings["lengths"]), settings["new_tokens"], settings["repeat"],
                     backends, dtype=args.dtype, batch=args.batch, seed=args.seed)
    print(format_table(result))
    if args.out:
        for path in write_outputs(result, args.out):
            print(f"wrote {path}")
    bad = [r for r in result["rows"] if not r["flops_match"]]
    if bad:
        print(f"ERROR: analytic and counted FLOPs disagree in {len(bad)} rows (see flops_counted_* columns)")
        return 1
    return 0

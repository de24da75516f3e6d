"""`refslm bench loss`: value + gradient of the paper's KD objective (reverse KL + CE), every form.

Default size is the paper's KD setting, 4096 rows x 32064 vocabulary (Phi-3.5 teacher), float32:
kd_loss(alpha=0.9, divergence="reverse_kl") in the direct NumPy form, the streaming form, every
other installed backend, and PyTorch (kl_div + cross_entropy + backward) when installed. Median
wall time and peak extra memory (the gradient buffer is preallocated and not counted for the
refslm forms, measured with tracemalloc; PyTorch allocates its own, measured as the peak resident
growth of one step in a fresh process); ratios are against the direct NumPy form.
"""

from __future__ import annotations

import numpy as np

from . import (
    add_backend_argument,
    peak_extra_bytes,
    positive_int,
    selected_backends,
    time_call,
)


def arguments(parser) -> None:
    parser.add_argument("--rows", type=positive_int, default=4096, help="tokens (B*T), default 4096")
    parser.add_argument("--vocab", type=positive_int, default=32064, help="vocabulary, default 32064")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--chunk-rows", type=positive_int, default=256, help="streaming form: rows per chunk")
    parser.add_argument("--chunk-vocab", type=positive_int, default=4096,
                        help="streaming form: vocabulary columns per chunk")
    parser.add_argument("--repeat", type=positive_int, default=3, help="timed runs per form (median reported)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    add_backend_argument(parser)  # the NumPy direct and streaming forms are always the baseline


def _inputs(rows: int, vocab: int, dtype: str):
    rng = np.random.default_rng(0)
    student = (rng.standard_normal((rows, vocab), dtype=np.float32) * 2).astype(dtype)
    teacher = (rng.standard_normal((rows, vocab), dtype=np.float32) * 2).astype(dtype)
    targets = rng.integers(1, vocab, rows)  # no padding: every token kept
    return student, teacher, targets


def _refslm_case(student, teacher, targets, **options):
    from ..losses import kd_loss

    grad = np.empty_like(student)
    return lambda: kd_loss(student, teacher, targets, alpha=0.9, divergence="reverse_kl", grad_out=grad, **options)


def _torch_case(student, teacher, targets):
    import torch

    F = torch.nn.functional
    s, t, y = torch.from_numpy(student), torch.from_numpy(teacher), torch.from_numpy(targets)

    def step():
        x = s.clone().requires_grad_(True)
        kd = F.kl_div(F.log_softmax(t, -1), F.log_softmax(x, -1), reduction="batchmean", log_target=True)
        loss = 0.9 * kd + 0.1 * F.cross_entropy(x, y, ignore_index=0)
        loss.backward()
        return x.grad

    return step


def _torch_peak_rss_bytes(rows: int, vocab: int, dtype: str) -> int:
    """Peak resident-memory growth of one PyTorch step, in a fresh process (tracemalloc misses torch's allocator)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_torch_rss_child, (rows, vocab, dtype))


def _torch_rss_child(rows: int, vocab: int, dtype: str) -> int:
    step = _torch_case(*_inputs(rows, vocab, dtype))
    before = _resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak (VmHWM) to the current RSS
        f.write("5")
    step()
    return (_resident_kib("VmHWM") - before) * 1024


def _resident_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB (VmRSS: now, VmHWM: peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def run(args) -> int:
    student, teacher, targets = _inputs(args.rows, args.vocab, args.dtype)
    cases = [("numpy direct", _refslm_case(student, teacher, targets), "tracemalloc"),
             (f"numpy streaming {args.chunk_rows}x{args.chunk_vocab}",
              _refslm_case(student, teacher, targets, chunk_size=(args.chunk_rows, args.chunk_vocab)), "tracemalloc")]
    for name in selected_backends(args):
        if name != "numpy":
            cases.append((f"{name} direct", _refslm_case(student, teacher, targets, backend=name), "tracemalloc"))
    if not args.no_torch:
        try:
            cases.append(("torch kl_div+cross_entropy+backward", _torch_case(student, teacher, targets), "peak RSS"))
        except ImportError:
            print("torch not installed: PyTorch baseline skipped")

    print(f"refslm bench loss: kd_loss alpha 0.9 reverse KL + CE, value + gradient, {args.rows} x {args.vocab} "
          f"{args.dtype}, median of {args.repeat}")
    print(f"{'form':44s} {'time s':>9s} {'x direct':>9s} {'peak extra MiB':>15s} {'x direct':>9s}  memory measure")
    baseline = None
    for name, fn, measure in cases:
        seconds = time_call(fn, repeat=args.repeat)["median_s"]
        extra = peak_extra_bytes(fn) if measure == "tracemalloc" else _torch_peak_rss_bytes(args.rows, args.vocab,
                                                                                             args.dtype)
        baseline = baseline or (seconds, extra)
        print(f"{name:44s} {seconds:9.3f} {seconds / baseline[0]:9.2f} {extra / 2**20:15.1f} "
              f"{extra / baseline[1]:9.3f}  {measure}", flush=True)
    return 0

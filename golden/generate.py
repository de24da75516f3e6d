#!/usr/bin/env python
"""Write the golden suite: golden/cases/<case>.safetensors and golden/manifest.json.

Every expected tensor is computed here with PyTorch in float64, written from SPEC.md and the facts of
the paper's public implementation; the Llama and Phi-3 decoder-only goldens are computed by Hugging
Face transformers' own LlamaForCausalLM / Phi3ForCausalLM. This file never imports refslm.

    python golden/generate.py            # regenerate everything (byte-identical on a rerun)
    python golden/generate.py --out DIR  # write the suite elsewhere (e.g. to compare with the committed one)

Tolerances (SPEC.md section 8), measured per output, normwise (e = max|y' - y| / max|y|):
  e_run:  the same torch code run in float32 (inputs rounded to float32, all math in float32);
  e_cond: the float64 computation on inputs perturbed by relative errors of +-2^-24 (the float32 unit
          roundoff) with random signs, worst of PERTURBATIONS draws (the conditioning: what any
          backward-stable float32 algorithm may lose, however accurate torch happens to be on these
          exactly representable inputs).
r32 = ladder(SAFETY * max(e_run, e_cond)), never below FLOOR32; r64 = the same scaled by eps64/eps32,
never below FLOOR64. Each output passes when every element satisfies
|got - expected| <= atol + rtol * |expected| with rtol = r and atol = ladder(r * max|expected|) (max over
the finite expected values; r when they are all 0).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
FORMAT_VERSION = 1

F64 = torch.float64
EPS32 = float(torch.finfo(torch.float32).eps)
EPS64 = float(torch.finfo(torch.float64).eps)
SAFETY = 4.0
FLOOR32 = 1e-6
FLOOR64 = 1e-12
PERTURBATIONS = 3

Tensors = dict[str, torch.Tensor]


@dataclass
class Case:
    """One golden case: named inputs (input.* and param.*) and a dtype-generic torch computation.

    compute(inputs) receives the inputs with every float tensor in one dtype (float64 for the golden,
    float32 for the tolerance measurement) and returns {"output.<name>": tensor}.
    """

    name: str
    kind: str
    description: str
    inputs: Tensors
    compute: Callable[[Tensors], Tensors]
    attributes: dict = field(default_factory=dict)
    config: dict | None = None


# ------------------------------------------------------------------ deterministic random data


def generator(name: str) -> torch.Generator:
    """A torch Generator seeded from the case name (stable across runs and machines)."""
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def randint(g: torch.Generator, low: int, high: int, *shape: int) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=g, dtype=torch.int64)


# ------------------------------------------------------------------ torch definitions of the ops (SPEC.md section 2)


def t_rmsnorm(x, weight, eps, unit_offset=False):
    """x / sqrt(mean(x^2) + eps) * w (w -> 1 + w when unit_offset); math in x's dtype (float32 or float64)."""
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normed * ((1.0 + weight) if unit_offset else weight)


def t_gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def t_activation(x, kind):
    if kind == "gelu_tanh":
        return t_gelu_tanh(x)
    if kind == "gelu_erf":
        return F.gelu(x)
    if kind == "silu":
        return F.silu(x)
    raise ValueError(kind)


def t_linear(x, weight, bias=None):
    return F.linear(x, weight, bias)


def ntk_theta(theta, head_dim, seq_len, factor, block_size):
    """Dynamic NTK base: theta * (factor L / block - (factor - 1))^(D/(D-2)), L = max(seq_len, block)."""
    if factor <= 1.0:
        return theta
    length = max(seq_len, block_size)
    return theta * ((factor * length / block_size) - (factor - 1.0)) ** (head_dim / (head_dim - 2))


def t_rope_cos_sin(positions, head_dim, theta, layout, linear_factor=1.0, ext_factors=None, scale=1.0):
    """positions [..., T] -> cos, sin [..., T, D] float64 (longrope: inv_freq / ext_factors, cos/sin * scale)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=F64) / head_dim)
    if ext_factors is not None:
        inv_freq = inv_freq / torch.tensor(ext_factors, dtype=F64)
    angles = (positions.to(F64) / linear_factor)[..., None] * inv_freq
    full = torch.cat([angles, angles], -1) if layout == "rotate_half" else angles.repeat_interleave(2, -1)
    if scale != 1.0:
        return full.cos() * scale, full.sin() * scale
    return full.cos(), full.sin()


def t_rotate(x, layout):
    if layout == "rotate_half":
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], -1)
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)


def t_apply_rope(x, cos, sin, layout):
    """x [B, H, T, D], cos/sin [B or 1, T, D] float64 (cast to x's dtype) -> x cos + rotate(x) sin."""
    c, s = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]
    return x * c + t_rotate(x, layout) * s


def t_repeat_kv(x, n_rep, interleaved):
    """[B, Hkv, T, D] -> [B, Hkv*n_rep, T, D]; interleaved: h -> h // n_rep, block: h -> h % Hkv."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1) if interleaved else x.repeat(1, n_rep, 1, 1)


def t_attention(q, k, v, key_mask=None, causal=False, q_start=0, interleaved=False, mask_fill="finite_min",
                segment_ids=None):
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], key_mask [B, Tk], segment_ids [B, Tk] -> [B, Hq, Tq, D]
    (SPEC.md attention; query i is the token at time q_start + i for segments)."""
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    n_rep = hq // k.shape[1]
    k, v = t_repeat_kv(k, n_rep, interleaved), t_repeat_kv(v, n_rep, interleaved)
    allowed = torch.ones(b, 1, tq, tk, dtype=torch.bool)
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
    if causal:
        allowed = allowed & (torch.arange(tk)[None, :] <= q_start + torch.arange(tq)[:, None])
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, None, q_start:q_start + tq, None] == segment_ids[:, None, None, :])
    fill = torch.finfo(q.dtype).min if mask_fill == "finite_min" else -math.inf
    scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, fill) / math.sqrt(d)
    weights = torch.softmax(scores, -1)
    if mask_fill == "-inf":  # a row with no allowed key is defined as zeros
        weights = torch.where(allowed.any(-1, keepdim=True), weights, torch.zeros((), dtype=q.dtype))
    return weights @ v


def split_heads(x, n_head):
    return x.unflatten(-1, (n_head, -1)).transpose(1, 2)


def merge_heads(x):
    return x.transpose(1, 2).flatten(2)


# ------------------------------------------------------------------ manifest helpers


def ladder_up(x: float) -> float:
    """Smallest value of the 1-2-5 ladder (..., 1e-6, 2e-6, 5e-6, 1e-5, ...) that is >= x."""
    if x <= 0:
        return 0.0
    exponent = math.floor(math.log10(x))
    for mantissa in (1, 2, 5, 10):
        value = float(f"{mantissa}e{exponent}")
        if value >= x * (1 - 1e-12):
            return value
    raise AssertionError(x)


def normwise_error(expected: torch.Tensor, approx: torch.Tensor) -> float:
    """max|approx - expected| / max|expected| over the finite entries; infinities must agree exactly."""
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(approx)), "a perturbed or float32 run changed which outputs are finite"
    assert torch.equal(expected[~finite], approx.to(F64)[~finite]), "a perturbed or float32 run changed infinities"
    values = expected[finite]
    if not values.numel():
        return 0.0
    scale = float(values.abs().max()) or 1.0
    return float((approx.to(F64)[finite] - values).abs().max()) / scale


def measured_tolerances(expected: torch.Tensor, approx32: torch.Tensor, perturbed: list[torch.Tensor]) -> dict:
    """{'float64': {'rtol', 'atol'}, 'float32': {...}, measured errors} (module docstring)."""
    if not expected.is_floating_point():
        assert torch.equal(expected, approx32), "the float32 run changed an exact (integer) output"
        return {"exact": True}
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    e_run = normwise_error(expected, approx32)
    e_cond = max(normwise_error(expected, p) for p in perturbed)
    tolerances = {}
    for dtype, floor, factor in (("float64", FLOOR64, EPS64 / EPS32), ("float32", FLOOR32, 1.0)):
        r = max(floor, ladder_up(SAFETY * max(e_run, e_cond) * factor))
        tolerances[dtype] = {"rtol": r, "atol": ladder_up(r * (scale or 1.0))}
    tolerances["measured"] = {"float32_run": float(f"{e_run:.3g}"), "input_rounding": float(f"{e_cond:.3g}")}
    return tolerances


def perturb(tensors: Tensors, seed: str) -> Tensors:
    """Float tensors times (1 + d), d = +-2^-24 with independent random signs per element."""
    g = generator(seed)
    out = {}
    for key, value in tensors.items():
        if value.is_floating_point():
            d = (torch.randint(0, 2, value.shape, generator=g, dtype=F64) * 2 - 1) * 2.0 ** -24
            value = torch.where(torch.isfinite(value), value * (1 + d), value)
        out[key] = value
    return out


def to_dtype(tensors: Tensors, dtype: torch.dtype) -> Tensors:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}


def build(case: Case) -> tuple[dict, Tensors]:
    """Compute a case in float64 and float32 -> (manifest entry without hash, tensors to store)."""
    for name, value in case.inputs.items():
        assert name.startswith(("input.", "param.")), name
        assert value.dtype in (F64, torch.int64), (name, value.dtype)
    expected = case.compute(to_dtype(case.inputs, F64))
    approx32 = case.compute(to_dtype(case.inputs, torch.float32))
    perturbed = [case.compute(perturb(case.inputs, f"perturb/{case.name}/{i}")) for i in range(PERTURBATIONS)]
    tensors = dict(case.inputs)
    tolerances = {}
    for name, value in expected.items():
        assert name.startswith("output."), name
        value = value.detach().contiguous()
        assert value.dtype in (F64, torch.int64), (name, value.dtype)
        assert not torch.isnan(value).any(), f"{case.name}: NaN in {name}"
        tensors[name] = value
        tolerances[name] = measured_tolerances(value, approx32[name].detach(), [p[name].detach() for p in perturbed])
    entry = {
        "name": case.name,
        "kind": case.kind,
        "description": case.description,
        "file": f"cases/{case.name}.safetensors",
        "config": case.config,
        "attributes": case.attributes,
        "inputs": list(case.inputs),
        "outputs": list(expected),
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        "dtypes": {k: "int64" if v.dtype == torch.int64 else "float64" for k, v in tensors.items()},
        "tolerances": tolerances,
    }
    return entry, {k: v.contiguous() for k, v in tensors.items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ op cases


def op_case(name, description, inputs, fn, **attributes):
    """An op case: fn(inputs) -> output.y, attributes['op'] names the op."""
    return Case(name, "op", description, inputs, lambda t: {"output.y": fn(t)}, attributes)


def op_cases() -> list[Case]:
    cases = []
    g = generator("rmsnorm")
    x = randn(g, 2, 5, 64) * torch.linspace(0.01, 30.0, 5, dtype=F64)[None, :, None]
    w = 1.0 + randn(g, 64, scale=0.2)
    for unit_offset in (False, True):
        cases.append(op_case(
            f"op_rmsnorm_{'unit_offset' if unit_offset else 'plain'}",
            f"RMSNorm eps 1e-6, weight {'1 + w' if unit_offset else 'w'}, rows of very different scale",
            {"input.x": x, "input.weight": w},
            lambda t, u=unit_offset: t_rmsnorm(t["input.x"], t["input.weight"], 1e-6, u),
            op="rmsnorm", eps=1e-6, unit_offset=unit_offset))

    g = generator("activation")
    inputs = {"typical": randn(g, 200, scale=3.0),
              "extreme": torch.tensor([-100.0, -30.0, -12.0, -1e-8, 0.0, 1e-8, 12.0, 30.0, 100.0], dtype=F64)}
    for kind in ("gelu_tanh", "gelu_erf", "silu"):
        for label, x in inputs.items():
            cases.append(op_case(f"op_activation_{kind}_{label}", f"activation {kind}, {label} arguments",
                                 {"input.x": x}, lambda t, k=kind: t_activation(t["input.x"], k),
                                 op="activation", kind=kind))

    g = generator("gated")
    gate, up = randn(g, 3, 4, 96, scale=2.0), randn(g, 3, 4, 96)
    for kind, label in (("silu", "SwiGLU"), ("gelu_tanh", "GeGLU (tanh)"), ("gelu_erf", "GeGLU (erf)")):
        cases.append(op_case(f"op_gated_{kind}", f"{label}: act(gate) * up", {"input.gate": gate, "input.up": up},
                             lambda t, k=kind: t_activation(t["input.gate"], k) * t["input.up"], op="gated", kind=kind))

    g = generator("softmax")
    typical = randn(g, 4, 33, scale=4.0)
    typical[1, :5] = -math.inf
    typical[2, 1:] = -math.inf
    extreme = randn(g, 3, 33, scale=4.0)
    extreme[0, 0], extreme[0, 1] = 1e4, -1e4
    extreme[1] = extreme[1] + 1e4
    extreme[2, 7] = -1e4
    for op, fn in (("softmax", torch.softmax), ("log_softmax", torch.log_softmax)):
        for label, x, what in (("typical", typical, "rows with -inf entries (one row with a single finite entry)"),
                               ("extreme", extreme, "+-1e4 entries and a row offset by +1e4")):
            cases.append(op_case(f"op_{op}_{label}", f"{op} over the last axis; {what}", {"input.x": x},
                                 lambda t, f=fn: f(t["input.x"], -1), op=op, axis=-1))

    g = generator("linear")
    x, w, b = randn(g, 2, 5, 64), randn(g, 48, 64, scale=0.125), randn(g, 48, scale=0.1)
    cases.append(op_case("op_linear_bias", "x @ W^T + b, W [out, in] (PyTorch layout)",
                         {"input.x": x, "input.weight": w, "input.bias": b},
                         lambda t: t_linear(t["input.x"], t["input.weight"], t["input.bias"]), op="linear"))
    cases.append(op_case("op_linear_nobias", "x @ W^T without bias", {"input.x": x, "input.weight": w},
                         lambda t: t_linear(t["input.x"], t["input.weight"]), op="linear"))
    cases.append(op_case("op_linear_gelu_tanh", "the epilogue of Mu's MLP up-projection: gelu_tanh(x @ W^T + b)",
                         {"input.x": x, "input.weight": w, "input.bias": b},
                         lambda t: t_activation(t_linear(t["input.x"], t["input.weight"], t["input.bias"]),
                                                "gelu_tanh"), op="linear", activation="gelu_tanh"))
    residual = randn(g, 2, 5, 48, scale=10.0)
    cases.append(op_case("op_linear_residual", "the epilogue of a sub-layer's output projection: residual + x @ W^T "
                         "(the residual added last)", {"input.x": x, "input.weight": w, "input.residual": residual},
                         lambda t: t_linear(t["input.x"], t["input.weight"]) + t["input.residual"], op="linear"))

    g = generator("embedding")
    ids = randint(g, 0, 50, 3, 7)
    ids[0, 0], ids[1, -1] = 0, 49
    cases.append(op_case("op_embedding", "row lookup, ids [B, T] int64 incl. first and last rows",
                         {"input.ids": ids, "input.table": randn(g, 50, 16)},
                         lambda t: F.embedding(t["input.ids"], t["input.table"]), op="embedding"))

    cases += rope_cases()
    cases += attention_cases()
    return cases


def rope_cases() -> list[Case]:
    """RoPE on [B, H, T, D]: both layouts, offsets, centred positions, NTK and linear scaling."""
    # name, description, layout, positions [B or 1, T], linear factor, dynamic NTK (factor, block_size) or None
    specs = [
        ("rotate_half", "rotate_half layout, positions 0..T-1", "rotate_half", torch.arange(11)[None], 1.0, None),
        ("interleaved", "interleaved layout (pairs 2i, 2i+1), positions 0..T-1", "interleaved",
         torch.arange(11)[None], 1.0, None),
        ("offset", "rotate_half, per-row positions with offsets (KV-cache steps 7.. and 100..)", "rotate_half",
         torch.stack([torch.arange(7, 18), torch.arange(100, 111)]), 1.0, None),
        ("centred", "rotate_half, centred encoder positions p - (L-1)//2, L = 11", "rotate_half",
         (torch.arange(11) - 5)[None], 1.0, None),
        ("ntk", "rotate_half, dynamic NTK: factor 4, block_size 8, sequence length 11 > block_size",
         "rotate_half", torch.arange(11)[None], 1.0, (4.0, 8)),
        ("linear_scaling", "interleaved, linear position scaling: positions / 2.5", "interleaved",
         torch.arange(11)[None], 2.5, None),
    ]
    cases = []
    for name, description, layout, positions, linear_factor, ntk in specs:
        g = generator(f"rope_{name}")
        x = randn(g, positions.shape[0] if positions.shape[0] > 1 else 2, 3, positions.shape[1], 16)
        attributes = dict(op="rope", layout=layout, theta=10000.0, linear_factor=linear_factor,
                          seq_len=positions.shape[1])
        theta = 10000.0
        if ntk is not None:
            theta = ntk_theta(10000.0, 16, positions.shape[1], *ntk)
            attributes.update(ntk_factor=ntk[0], block_size=ntk[1], effective_theta=theta)

        def compute(t, layout=layout, theta=theta, linear_factor=linear_factor):
            cos, sin = t_rope_cos_sin(t["input.positions"], 16, theta, layout, linear_factor)
            return {"output.y": t_apply_rope(t["input.x"], cos, sin, layout), "output.cos": cos, "output.sin": sin}

        cases.append(Case(f"op_rope_{name}", "op", description, {"input.x": x, "input.positions": positions},
                          compute, attributes))

    g = generator("rope_longrope")  # Phi-3.5's long factors (one per frequency) and attention factor
    ext_factors = [1.0 + 0.45 * i for i in range(8)]
    attention_factor = math.sqrt(1.0 + math.log(64 / 16) / math.log(16))  # block 64 over original 16
    positions = torch.arange(5, 25)[None]

    def compute_longrope(t):
        cos, sin = t_rope_cos_sin(t["input.positions"], 16, 10000.0, "rotate_half", 1.0, ext_factors, attention_factor)
        return {"output.y": t_apply_rope(t["input.x"], cos, sin, "rotate_half"), "output.cos": cos, "output.sin": sin}

    cases.append(Case("op_rope_longrope", "op", "rotate_half, longrope: inv_freq divided by per-frequency factors, "
                      "cos and sin times the attention factor sqrt(1 + ln 4 / ln 16), positions 5..24",
                      {"input.x": randn(g, 2, 3, 20, 16), "input.positions": positions}, compute_longrope,
                      dict(op="rope", layout="rotate_half", theta=10000.0, linear_factor=1.0, seq_len=20,
                           ext_factors=ext_factors, attention_factor=attention_factor)))
    return cases


def attention_cases() -> list[Case]:
    """Scaled dot-product attention in every configuration the models use."""
    specs = [  # name, description, Hq, Hkv, Tq, Tk, causal, q_start, interleaved, key mask rows, fill[, segments]
        ("mha_bidirectional", "MHA 4/4, bidirectional, no mask", 4, 4, 6, 6, False, 0, False, None, "finite_min"),
        ("gqa_block_causal", "GQA 6/2 block order (h -> h % Hkv), causal", 6, 2, 7, 7, True, 0, False, None,
         "finite_min"),
        ("gqa_interleaved_causal", "GQA 6/2 interleaved order (h -> h // 3), causal", 6, 2, 7, 7, True, 0, True,
         None, "finite_min"),
        ("mqa_padded", "MQA 4/1, bidirectional, key padding", 4, 1, 7, 7, False, 0, False, [7, 4], "finite_min"),
        ("cross_padded", "cross attention Tq 5, Tk 9, GQA 6/3 block, key padding", 6, 3, 5, 9, False, 0, False,
         [9, 3], "finite_min"),
        ("causal_padded_fully_masked", "causal + left key padding: early query rows see no key "
         "(finite_min: uniform average of all values); one row fully padded", 6, 2, 7, 7, True, 0, False,
         [-3, 0], "finite_min"),
        ("neginf_fully_masked", "-inf fill: fully masked rows are zeros; GQA 6/2 interleaved, causal, left padding",
         6, 2, 7, 7, True, 0, True, [-3, 0], "-inf"),
        ("q_start", "KV-cache step: Tq 3 queries at positions 5..7 over Tk 8 keys, causal, GQA 6/2 block",
         6, 2, 3, 8, True, 5, False, [8, 6], "finite_min"),
        ("packed_segments", "packed rows: segment_ids, causal block-diagonal attention (row 0: segments of 9, "
         "17, 10 then 4 pads; row 1: 3 left pads then 20 and 17), key padding on the pads, GQA 6/2 block, "
         "Tq = Tk = 40", 6, 2, 40, 40, True, 0, False, [36, -3], "finite_min", [[9, 17, 10, -4], [-3, 20, 17]]),
        ("packed_segments_step", "packed rows, two query rows at positions 38..39 (a cached step) over 40 keys, "
         "segment_ids as in packed_segments, -inf fill, GQA 6/2 interleaved", 6, 2, 2, 40, True, 38, True,
         [36, -3], "-inf", [[9, 17, 10, -4], [-3, 20, 17]]),
    ]
    cases = []
    for name, description, hq, hkv, tq, tk, causal, q_start, interleaved, mask_rows, fill, *segments in specs:
        g = generator(f"attention_{name}")
        inputs = {"input.q": randn(g, 2, hq, tq, 8, scale=1.5), "input.k": randn(g, 2, hkv, tk, 8, scale=1.5),
                  "input.v": randn(g, 2, hkv, tk, 8)}
        if mask_rows is not None:  # n > 0: first n keys real (right padding); n < 0: first -n keys padded; 0: all
            mask = torch.zeros(2, tk, dtype=torch.int64)
            for row, n in enumerate(mask_rows):
                if n > 0:
                    mask[row, :n] = 1
                elif n < 0:
                    mask[row, -n:] = 1
            inputs["input.key_mask"] = mask
        if segments:  # per row: segment lengths, numbered 1, 2, ... in order; -n: n padding tokens (segment 0)
            inputs["input.segment_ids"] = torch.tensor([segment_row(lengths) for lengths in segments[0]])
        attributes = dict(op="attention", causal=causal, q_start=q_start, interleaved=interleaved, mask_fill=fill)

        def compute(t, a=attributes):
            return {"output.y": t_attention(t["input.q"], t["input.k"], t["input.v"], t.get("input.key_mask"),
                                            a["causal"], a["q_start"], a["interleaved"], a["mask_fill"],
                                            t.get("input.segment_ids"))}

        cases.append(Case(f"op_attention_{name}", "op", description, inputs, compute, attributes))
    return cases


def segment_row(lengths: list[int]) -> list[int]:
    """Segment lengths (-n: n padding tokens, segment 0) -> one row of segment ids 1, 2, ... (0 on padding)."""
    row, number = [], 0
    for n in lengths:
        if n < 0:
            row += [0] * -n
        else:
            number += 1
            row += [number] * n
    return row


# ------------------------------------------------------------------ models (SPEC.md section 3)

COMMON_CONFIG = dict(  # every configuration field (refslm/config.py names), tiny sizes
    n_embd=64, qkv_embd=48, hidden_dim=128, n_head=6, n_kv_head=2, head_dim=None, is_interleaved=False,
    block_size=32, rope_theta=10000.0, rope_factor=1.0, rope_type="dynamic", rope_layout="rotate_half",
    pad_token_id=0, bos_token_id=1, eos_token_id=2, vocab_size=512, norm_eps=1e-6, mask_fill="finite_min")


def ed_config(**overrides) -> dict:
    return {**COMMON_CONFIG, "n_encoder_layer": 2, "n_decoder_layer": 1, **overrides}


def do_config(**overrides) -> dict:
    values = {**COMMON_CONFIG, "n_layer": 2, "layout": "mu", "attention_bias": True, "mlp_bias": True,
              "tie_word_embeddings": True, **overrides}
    return values


def head_dim(cfg: dict) -> int:
    if cfg["head_dim"] is not None:
        return cfg["head_dim"]
    return (cfg["qkv_embd"] or cfg["n_embd"]) // cfg["n_head"]


def mu_param_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Canonical Mu names -> shapes: encoder-decoder (n_encoder_layer in cfg) or the Mu decoder-only baseline."""
    c, f, d = cfg["n_embd"], cfg["hidden_dim"], head_dim(cfg)
    q, kv = cfg["n_head"] * d, cfg["n_kv_head"] * d
    shapes = {"transformer.wte.weight": (cfg["vocab_size"], c)}

    def attention(prefix):
        for name, out, inp in (("q_linear", q, c), ("k_linear", kv, c), ("v_linear", kv, c), ("out_linear", c, q)):
            shapes[f"{prefix}.{name}.weight"], shapes[f"{prefix}.{name}.bias"] = (out, inp), (out,)

    def block(prefix, self_attn, cross):
        for k in (1, 2, 3) if cross else (1, 2):
            shapes[f"{prefix}.ln{k}.weight"] = (c,)
        attention(f"{prefix}.{self_attn}")
        if cross:
            attention(f"{prefix}.cross_attn")
        shapes.update({f"{prefix}.mlp.fc1.weight": (f, c), f"{prefix}.mlp.fc1.bias": (f,),
                       f"{prefix}.mlp.fc2.weight": (c, f), f"{prefix}.mlp.fc2.bias": (c,)})

    if "n_encoder_layer" in cfg:
        for i in range(cfg["n_encoder_layer"]):
            block(f"transformer.e.{i}", "attn", cross=False)
        shapes["transformer.ln_e.weight"] = (c,)
    for i in range(cfg.get("n_decoder_layer", cfg.get("n_layer"))):
        block(f"transformer.h.{i}", "causal_attn", cross="n_encoder_layer" in cfg)
    shapes["transformer.ln_f.weight"] = (c,)
    if not cfg.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (cfg["vocab_size"], c)
    return shapes


def random_params(g: torch.Generator, shapes: dict[str, tuple[int, ...]], embed_scale: float = 1.0) -> Tensors:
    """Norm weights 1 + 0.2 N(0,1); biases 0.1 N(0,1); embeddings N(0, embed_scale^2); matrices N(0, 1/fan_in)."""
    params = {}
    for name, shape in shapes.items():
        if len(shape) == 1 and ("ln" in name.split(".")[-2] or "norm" in name):
            params[name] = 1.0 + randn(g, *shape, scale=0.2)
        elif len(shape) == 1:
            params[name] = randn(g, *shape, scale=0.1)
        elif "wte" in name or "embed_tokens" in name:
            params[name] = randn(g, *shape, scale=embed_scale)
        else:
            params[name] = randn(g, *shape, scale=shape[1] ** -0.5)
    return params


def decoder_positions(positions: torch.Tensor | None, t: int) -> tuple[torch.Tensor, int]:
    """Decoder positions [B or 1, T] (default 0..T-1) and the RoPE length L = max position + 1 (SPEC.md 2.3)."""
    positions = torch.arange(t)[None] if positions is None else positions
    return positions, int(positions.max()) + 1


def rope_tables(cfg: dict, positions: torch.Tensor, seq_len: int):
    """cos, sin [B or 1, T, D] float64 for positions under the config's RoPE type (SPEC.md RoPE)."""
    theta, linear = cfg["rope_theta"], 1.0
    if cfg["rope_type"] == "dynamic":
        theta = ntk_theta(theta, head_dim(cfg), seq_len, cfg["rope_factor"], cfg["block_size"])
    elif cfg["rope_type"] == "linear":
        linear = cfg["rope_factor"]
    elif cfg["rope_type"] == "longrope":  # Phi-3.5: long factors past original_max; scale from block_size
        original = cfg["rope_original_max_position"]
        factors = cfg["rope_long_factor"] if seq_len > original else cfg["rope_short_factor"]
        ratio = cfg["block_size"] / original
        scale = math.sqrt(1 + math.log(ratio) / math.log(original)) if ratio > 1 else 1.0
        return t_rope_cos_sin(positions, head_dim(cfg), theta, cfg["rope_layout"], 1.0, factors, scale)
    return t_rope_cos_sin(positions, head_dim(cfg), theta, cfg["rope_layout"], linear)


def mu_attention(p, prefix, cfg, x_q, x_kv, key_mask, causal, rope):
    """Mu attention module: projections (with biases), RoPE on q and k (rope = (cos, sin) or None), out."""
    def proj(name, x, heads):
        return split_heads(t_linear(x, p[f"{prefix}.{name}.weight"], p.get(f"{prefix}.{name}.bias")), heads)

    q, k, v = proj("q_linear", x_q, cfg["n_head"]), proj("k_linear", x_kv, cfg["n_kv_head"]), \
        proj("v_linear", x_kv, cfg["n_kv_head"])
    if rope is not None:
        q, k = t_apply_rope(q, *rope, cfg["rope_layout"]), t_apply_rope(k, *rope, cfg["rope_layout"])
    y = t_attention(q, k, v, key_mask, causal, 0, cfg["is_interleaved"], cfg["mask_fill"])
    return t_linear(merge_heads(y), p[f"{prefix}.out_linear.weight"], p[f"{prefix}.out_linear.bias"])


def mu_mlp(p, prefix, x):
    h = t_gelu_tanh(t_linear(x, p[f"{prefix}.fc1.weight"], p[f"{prefix}.fc1.bias"]))
    return t_linear(h, p[f"{prefix}.fc2.weight"], p[f"{prefix}.fc2.bias"])


def mu_decoder_stack(p, cfg, ids, n_layer, positions=None, encoded=None, enc_mask=None):
    """Mu decoder blocks over ids [B, T] (positions default 0..T-1; pads masked as keys) -> logits [B, T, V]."""
    eps, t = cfg["norm_eps"], ids.shape[1]
    rope = rope_tables(cfg, *decoder_positions(positions, t))
    mask = ids != cfg["pad_token_id"]
    x = F.embedding(ids, p["transformer.wte.weight"])
    for i in range(n_layer):
        pre = f"transformer.h.{i}"
        h = t_rmsnorm(x, p[f"{pre}.ln1.weight"], eps)
        x = x + mu_attention(p, f"{pre}.causal_attn", cfg, h, h, mask, True, rope)
        k = 2
        if encoded is not None:
            x = x + mu_attention(p, f"{pre}.cross_attn", cfg, t_rmsnorm(x, p[f"{pre}.ln2.weight"], eps), encoded,
                                 enc_mask, False, None)
            k = 3
        x = x + mu_mlp(p, f"{pre}.mlp", t_rmsnorm(x, p[f"{pre}.ln{k}.weight"], eps))
    x = t_rmsnorm(x, p["transformer.ln_f.weight"], eps)
    return x @ p.get("lm_head.weight", p["transformer.wte.weight"]).T


def mu_encode(p, cfg, ids):
    """Mu encoder: bidirectional, centred positions p - (L-1)//2, pad keys masked -> ln_e(x) [B, Te, C]."""
    eps, te = cfg["norm_eps"], ids.shape[1]
    rope = rope_tables(cfg, (torch.arange(te) - (te - 1) // 2)[None], te)
    mask = ids != cfg["pad_token_id"]
    x = F.embedding(ids, p["transformer.wte.weight"])
    for i in range(cfg["n_encoder_layer"]):
        pre = f"transformer.e.{i}"
        h = t_rmsnorm(x, p[f"{pre}.ln1.weight"], eps)
        x = x + mu_attention(p, f"{pre}.attn", cfg, h, h, mask, False, rope)
        x = x + mu_mlp(p, f"{pre}.mlp", t_rmsnorm(x, p[f"{pre}.ln2.weight"], eps))
    return t_rmsnorm(x, p["transformer.ln_e.weight"], eps), mask


def mu_logits(p, cfg, ids, decoder_ids=None, positions=None):
    """Logits [B, T, V] of the Mu encoder-decoder (decoder_ids given) or Mu decoder-only model."""
    if "n_encoder_layer" in cfg:
        encoded, enc_mask = mu_encode(p, cfg, ids)
        return mu_decoder_stack(p, cfg, decoder_ids, cfg["n_decoder_layer"], encoded=encoded, enc_mask=enc_mask)
    return mu_decoder_stack(p, cfg, ids, cfg["n_layer"], positions=positions)


def params_of(t: Tensors) -> Tensors:
    return {k[len("param."):]: v for k, v in t.items() if k.startswith("param.")}


def padded_ids(g, rows: list[tuple[int, int]], length: int, vocab: int, pad: int = 0, first: int | None = None):
    """[B, length] random ids in [3, vocab) with (left pads, right pads) per row; first: id of column 0."""
    ids = randint(g, 3, vocab, len(rows), length)
    if first is not None:
        ids[:, 0] = first
    for row, (left, right) in enumerate(rows):
        ids[row, :left] = pad
        if right:
            ids[row, length - right:] = pad
    return ids


def mu_model_cases() -> list[Case]:
    """Mu encoder-decoder and Mu decoder-only goldens (torch, written from SPEC.md)."""
    specs = [
        ("model_ed_gqa_block", "encoder-decoder, GQA 6/2 block order, encoder left and right padding, decoder "
         "right padding, centred encoder positions, tied head", ed_config(), [(0, 0), (3, 0), (0, 2)],
         [(0, 0), (0, 2), (0, 0)], 9, 7),
        ("model_ed_interleaved_ntk_neginf", "encoder-decoder, GQA 6/2 interleaved, dynamic NTK (factor 2, "
         "block_size 8 < Te 12, Td 10), -inf mask fill, a fully padded encoder row (cross-attention rows of zeros)",
         ed_config(is_interleaved=True, rope_factor=2.0, block_size=8, mask_fill="-inf"), [(2, 0), (12, 0)],
         [(0, 3), (0, 0)], 12, 10),
        ("model_ed_mqa_linear_interleaved_rope", "encoder-decoder, MQA 4/1, linear RoPE scaling factor 2, "
         "interleaved RoPE layout, qkv_embd None (= n_embd), 3 decoder layers",
         ed_config(n_head=4, n_kv_head=1, qkv_embd=None, rope_type="linear", rope_factor=2.0, rope_layout="interleaved",
                   n_encoder_layer=1, n_decoder_layer=3), [(0, 1), (1, 0)], [(0, 0), (0, 1)], 6, 5),
        ("model_do_mu_tied", "Mu decoder-only baseline, GQA 6/2 block order, tied head, left and right padding "
         "(positions 0..T-1)", do_config(), [(3, 0), (0, 2)], None, 10, None),
        ("model_do_mu_untied_ntk", "Mu decoder-only, GQA 6/2 interleaved, untied lm_head, dynamic NTK (factor 3, "
         "block_size 8 < T 12)", do_config(is_interleaved=True, tie_word_embeddings=False, rope_factor=3.0,
                                            block_size=8), [(0, 0), (0, 4)], None, 12, None),
    ]
    cases = []
    for name, description, cfg, enc_rows, dec_rows, te, td in specs:
        g = generator(name)
        params = random_params(g, mu_param_shapes(cfg))
        inputs = {"input.input_ids": padded_ids(g, enc_rows, te, cfg["vocab_size"])}
        if dec_rows is not None:
            inputs["input.decoder_input_ids"] = padded_ids(g, dec_rows, td, cfg["vocab_size"], first=1)
        inputs.update({f"param.{k}": v for k, v in params.items()})

        def compute(t, cfg=cfg):
            return {"output.logits": mu_logits(params_of(t), cfg, t["input.input_ids"],
                                               t.get("input.decoder_input_ids"))}

        kind = "encoder_decoder" if dec_rows is not None else "decoder_only"
        cases.append(Case(name, "model", description, inputs, compute, {"model_kind": kind}, cfg))
    return cases


# ------------------------------------------------------------------ Llama and Phi-3 by Hugging Face transformers

def hf_float64_patches():
    """Make transformers' Llama / Phi-3 compute in the model dtype throughout (SPEC.md section 8).

    transformers deliberately computes three pieces in float32 whatever the model dtype: RMSNorm's
    normalisation, the RoPE cos/sin tables and the eager attention softmax. For float64 goldens these
    three are replaced by the same formulas in max(float32, model dtype), RoPE tables in float64 (as
    SPEC.md defines them); every other computation (projections, SwiGLU, masks, residuals, head,
    generate) is transformers' own code.
    """
    import transformers.models.llama.modeling_llama as llama
    import transformers.models.phi3.modeling_phi3 as phi3

    def rmsnorm_forward(self, hidden):
        x = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(hidden.dtype)

    def rotary_forward(self, x, position_ids):
        cfg = self.config.refslm_golden_config
        cos, sin = rope_tables(cfg, position_ids, int(position_ids.max()) + 1)
        return cos.to(x.dtype), sin.to(x.dtype)

    def eager_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key = llama.repeat_kv(key, module.num_key_value_groups)
        value = llama.repeat_kv(value, module.num_key_value_groups)
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = torch.softmax(scores, dim=-1)
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights

    for module in (llama, phi3):
        prefix = "Llama" if module is llama else "Phi3"
        getattr(module, f"{prefix}RMSNorm").forward = rmsnorm_forward
        getattr(module, f"{prefix}RotaryEmbedding").forward = rotary_forward
        module.eager_attention_forward = eager_forward


def hf_model(cfg: dict, dtype: torch.dtype):
    """A transformers LlamaForCausalLM / Phi3ForCausalLM for a refslm decoder-only config dict (eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    rope = {"rope_theta": cfg["rope_theta"], "rope_type": "default"}
    if cfg["rope_type"] == "longrope":
        rope = {"rope_theta": cfg["rope_theta"], "rope_type": "longrope", "short_factor": cfg["rope_short_factor"],
                "long_factor": cfg["rope_long_factor"]}
    elif cfg["rope_type"] != "default" and cfg["rope_factor"] > 1:
        rope = {"rope_theta": cfg["rope_theta"], "rope_type": cfg["rope_type"], "factor": cfg["rope_factor"]}
    common = dict(vocab_size=cfg["vocab_size"], hidden_size=cfg["n_embd"], intermediate_size=cfg["hidden_dim"],
                  num_hidden_layers=cfg["n_layer"], num_attention_heads=cfg["n_head"],
                  num_key_value_heads=cfg["n_kv_head"], max_position_embeddings=cfg["block_size"],
                  rms_norm_eps=cfg["norm_eps"], tie_word_embeddings=cfg["tie_word_embeddings"],
                  pad_token_id=cfg["pad_token_id"], bos_token_id=cfg["bos_token_id"],
                  eos_token_id=cfg["eos_token_id"], rope_parameters=rope, attn_implementation="eager")
    if cfg["layout"] == "llama":
        config = LlamaConfig(head_dim=head_dim(cfg), attention_bias=cfg["attention_bias"], mlp_bias=cfg["mlp_bias"],
                             **common)
        model = LlamaForCausalLM(config)
    else:
        config = Phi3Config(original_max_position_embeddings=cfg.get("rope_original_max_position") or cfg["block_size"],
                            sliding_window=None, **common)
        model = Phi3ForCausalLM(config)
    config.refslm_golden_config = cfg
    return model.to(dtype).eval()


def hf_param_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face state-dict names -> shapes (a tied lm_head is not listed)."""
    return {name: tuple(p.shape) for name, p in hf_model(cfg, F64).named_parameters()}


def hf_load(cfg: dict, params: Tensors):
    """An HF model in the params' dtype holding exactly these parameters."""
    dtype = next(iter(params.values())).dtype
    model = hf_model(cfg, dtype)
    named = dict(model.named_parameters())
    assert set(named) == set(params), set(named) ^ set(params)
    with torch.no_grad():
        for name, value in params.items():
            named[name].copy_(value)
    return model


def hf_logits(cfg, params, ids, positions=None):
    """Logits [B, T, V] by transformers: attention_mask = ids != pad, position_ids default 0..T-1."""
    model = hf_load(cfg, params)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=(ids != cfg["pad_token_id"]).long(),
                     position_ids=positions).logits


LONGROPE = dict(layout="phi3", head_dim=None, n_head=4, tie_word_embeddings=False, mask_fill="finite_min",
                norm_eps=1e-5, rope_type="longrope", block_size=64, rope_original_max_position=16,
                rope_short_factor=[1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0],
                rope_long_factor=[1.5, 2.0, 3.0, 4.5, 6.0, 8.0, 10.0, 12.5], rope_attention_factor=None)


GIVEN_POSITION_IDS = {"model_llama_hf_left_padded_ntk"}  # cases run with position_ids = t - leading pads


def hf_model_cases() -> list[Case]:
    base = dict(qkv_embd=None, head_dim=12, n_head=4, is_interleaved=True, n_layer=2, attention_bias=False,
                mlp_bias=False, rope_type="default", mask_fill="-inf")
    specs = [
        ("model_llama_hf_untied_ntk", "Hugging Face LlamaForCausalLM: SwiGLU, GQA 4/2 (head_dim 12, q width 48 != "
         "n_embd), untied lm_head, dynamic NTK (factor 2, block_size 8 < T 12), -inf fill, right padding",
         do_config(**{**base, "layout": "llama", "tie_word_embeddings": False, "rope_type": "dynamic",
                      "rope_factor": 2.0, "block_size": 8}), [(0, 0), (0, 3)], 12),
        ("model_llama_hf_tied_bias_linear", "Hugging Face LlamaForCausalLM: attention and MLP biases, tied head, "
         "linear RoPE scaling factor 2, left padding (finite_min fill: fully masked pad rows average all values, "
         "as transformers' eager additive mask does)",
         do_config(**{**base, "layout": "llama", "attention_bias": True, "mlp_bias": True, "rope_type": "linear",
                      "rope_factor": 2.0, "mask_fill": "finite_min"}), [(3, 0), (0, 0)], 9),
        ("model_phi3_hf", "Hugging Face Phi3ForCausalLM: fused qkv_proj and gate_up_proj, GQA 4/2, head_dim = "
         "n_embd / n_head, untied head, left and right padding, finite_min fill",
         do_config(**{**base, "layout": "phi3", "head_dim": None, "n_head": 4, "tie_word_embeddings": False,
                      "mask_fill": "finite_min", "norm_eps": 1e-5}), [(2, 0), (0, 2)], 9),
        *[(f"model_phi3_hf_longrope_{name}", f"Hugging Face Phi3ForCausalLM with Phi-3.5's longrope RoPE: "
           f"original_max_position 16, max positions 64 (cos/sin scale sqrt(1 + ln 4 / ln 16)), T = {t}{why} so "
           f"the {side} factors apply, right padding", do_config(**{**base, **LONGROPE}), [(0, 0), (0, 3)], t)
          for name, side, t, why in (("short", "short", 12, ""), ("at_switch", "short", 16, " = original_max "
                                     "(the switch needs L > 16)"), ("long", "long", 20, ""))],
        ("model_llama_hf_left_padded_ntk", "Hugging Face LlamaForCausalLM, dynamic NTK (factor 2, block_size 8), "
         "T 10 with every row left padded (2 and 3 pads) and position_ids = t - leading pads (clamped at 0): "
         "L = max position + 1 = 8 <= block_size, so the base stays 10000 (T = 10 would change it); "
         "finite_min fill (the pads' fully masked rows average all values, as transformers' eager mask does)",
         do_config(**{**base, "layout": "llama", "tie_word_embeddings": False, "rope_type": "dynamic",
                      "rope_factor": 2.0, "block_size": 8, "mask_fill": "finite_min"}), [(2, 0), (3, 0)], 10),
    ]
    cases = []
    for name, description, cfg, rows, t in specs:
        g = generator(name)
        params = random_params(g, hf_param_shapes(cfg))
        inputs = {"input.input_ids": padded_ids(g, rows, t, cfg["vocab_size"]),
                  **{f"param.{k}": v for k, v in params.items()}}
        if name in GIVEN_POSITION_IDS:
            inputs["input.position_ids"] = left_pad_positions(inputs["input.input_ids"], cfg["pad_token_id"])

        def compute(t, cfg=cfg):
            ids, positions = t["input.input_ids"], t.get("input.position_ids")
            logits = hf_logits(cfg, params_of(t), ids, positions)
            if cfg["layout"] == "llama":  # cross-check: the SPEC.md formulas in this file give the same numbers
                r = 1e-12 if logits.dtype == F64 else 1e-4
                assert torch.allclose(logits, llama_logits(cfg, params_of(t), ids, positions),
                                      rtol=r, atol=r * float(logits.abs().max())), "transformers != SPEC"
            return {"output.logits": logits}

        cases.append(Case(name, "model", description, inputs, compute, {"model_kind": "decoder_only",
                                                                        "computed_by": "transformers"}, cfg))
    cases.append(packed_rows_case(do_config(**{**base, "layout": "llama", "tie_word_embeddings": False})))
    return cases


def packed_rows_case(cfg: dict) -> Case:
    """Five sequences packed into two rows of 16 (row 0: 6 + 9 tokens and one pad; row 1: 5 + 7 + 4), with
    segment_ids and positions restarting per sequence; transformers runs every sequence ALONE, and the
    golden holds those logits in row-major order of the packed tokens [31, V]."""
    name = "model_llama_hf_packed_rows"
    g = generator(name)
    params = random_params(g, hf_param_shapes(cfg))
    layout = [[6, 9, -1], [5, 7, 4]]
    segment_ids = torch.tensor([segment_row(lengths) for lengths in layout])
    input_ids = torch.where(segment_ids > 0, randint(g, 3, cfg["vocab_size"], *segment_ids.shape), cfg["pad_token_id"])
    position_ids = torch.zeros_like(segment_ids)
    for row in range(segment_ids.shape[0]):
        for s in segment_ids[row].unique():
            if s > 0:
                position_ids[row, segment_ids[row] == s] = torch.arange(int((segment_ids[row] == s).sum()))
    inputs = {"input.input_ids": input_ids, "input.position_ids": position_ids, "input.segment_ids": segment_ids,
              **{f"param.{k}": v for k, v in params.items()}}

    def compute(t):
        p, ids, segments = params_of(t), t["input.input_ids"], t["input.segment_ids"]
        alone = [hf_logits(cfg, p, ids[row][segments[row] == s][None])[0]
                 for row in range(ids.shape[0]) for s in segments[row].unique() if s > 0]
        return {"output.logits": torch.cat(alone)}

    return Case(name, "model", "Hugging Face LlamaForCausalLM over packed rows: five sequences in two rows of 16, "
                "segment_ids (attention only within a sequence) and position_ids restarting at 0 per sequence; "
                "the golden is transformers run on each sequence alone (logits of the packed tokens, [31, V], "
                "in row-major order; the pad's logits are not part of it)", inputs, compute,
                {"model_kind": "decoder_only", "computed_by": "transformers"}, cfg)


def llama_logits(cfg, p, ids, positions=None):
    """Llama from SPEC.md (SwiGLU, no cross-attention), for cross-checking transformers in this file."""
    eps, t = cfg["norm_eps"], ids.shape[1]
    rope = rope_tables(cfg, *decoder_positions(positions, t))
    mask = ids != cfg["pad_token_id"]
    x = F.embedding(ids, p["model.embed_tokens.weight"])
    for i in range(cfg["n_layer"]):
        pre = f"model.layers.{i}"

        def lin(name, h, pre=pre):
            return t_linear(h, p[f"{pre}.{name}.weight"], p.get(f"{pre}.{name}.bias"))

        h = t_rmsnorm(x, p[f"{pre}.input_layernorm.weight"], eps)
        q = t_apply_rope(split_heads(lin("self_attn.q_proj", h), cfg["n_head"]), *rope, "rotate_half")
        k = t_apply_rope(split_heads(lin("self_attn.k_proj", h), cfg["n_kv_head"]), *rope, "rotate_half")
        v = split_heads(lin("self_attn.v_proj", h), cfg["n_kv_head"])
        y = t_attention(q, k, v, mask, True, 0, True, cfg["mask_fill"])
        x = x + lin("self_attn.o_proj", merge_heads(y))
        h = t_rmsnorm(x, p[f"{pre}.post_attention_layernorm.weight"], eps)
        x = x + lin("mlp.down_proj", F.silu(lin("mlp.gate_proj", h)) * lin("mlp.up_proj", h))
    x = t_rmsnorm(x, p["model.norm.weight"], eps)
    return x @ p.get("lm_head.weight", p["model.embed_tokens.weight"]).T


# ------------------------------------------------------------------ losses (SPEC.md section 6), gradients by autograd


def x_log_x_over_y(log_x, log_y):
    """x log(x / y) from logs: 0 where x = 0, +inf where x > 0 = y; autograd-safe (no NaN from masked branches)."""
    x_zero, y_zero = torch.isneginf(log_x), torch.isneginf(log_y)
    safe_x = torch.where(x_zero, torch.zeros((), dtype=log_x.dtype), log_x)
    safe_y = torch.where(y_zero, torch.zeros((), dtype=log_y.dtype), log_y)
    term = torch.where(x_zero, torch.zeros((), dtype=log_x.dtype), safe_x.exp() * (safe_x - safe_y))
    return torch.where(y_zero & ~x_zero, torch.full((), math.inf, dtype=log_x.dtype), term)


def log_mixture(log_a, log_b, weight_a):
    """log(weight_a a + (1 - weight_a) b) from log a, log b."""
    if weight_a in (0.0, 1.0):
        return log_a if weight_a == 1.0 else log_b
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def t_loss_row_values(kind, student, teacher=None, targets=None, *, temperature=1.0, beta=0.0,
                      label_smoothing=0.0):
    """[N, V] -> [N] per-row loss values of one kind (SPEC.md Losses; refslm.losses.loss_rows docstring)."""
    log_q = torch.log_softmax(student / temperature, -1)
    if kind == "cross_entropy":
        vocab = student.shape[-1]
        w = torch.full_like(log_q, label_smoothing / vocab)
        w[torch.arange(len(targets)), targets] += 1.0 - label_smoothing
        return -(w * log_q).sum(-1)
    log_p = torch.log_softmax(teacher / temperature, -1)
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind in ("jsd", "skew_kl") and beta == 0.0:
        kind = "forward_kl"
    if kind == "skew_reverse_kl" and beta == 0.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        return x_log_x_over_y(log_p, log_q).sum(-1)
    if kind == "reverse_kl":
        return x_log_x_over_y(log_q, log_p).sum(-1)
    if kind == "jsd":
        log_m = log_mixture(log_p, log_q, beta)
        return beta * x_log_x_over_y(log_p, log_m).sum(-1) + (1 - beta) * x_log_x_over_y(log_q, log_m).sum(-1)
    if kind == "skew_kl":
        return x_log_x_over_y(log_p, log_mixture(log_p, log_q, beta)).sum(-1)
    if kind == "skew_reverse_kl":
        return x_log_x_over_y(log_q, log_mixture(log_q, log_p, beta)).sum(-1)
    raise ValueError(kind)


def reduce_rows(values, kept, reduction, leading0):
    """Reductions (SPEC.md): none -> values * kept; sum; mean = sum / #kept; batchmean = sum / leading0 when
    unmasked (kept None), sum / #kept when masked. Zero kept rows give 0."""
    keep = torch.ones_like(values, dtype=torch.bool) if kept is None else kept
    masked = torch.where(keep, values, torch.zeros((), dtype=values.dtype))
    if reduction == "none":
        return masked
    if reduction == "sum":
        return masked.sum()
    count = leading0 if reduction == "batchmean" and kept is None else int(keep.sum())
    return masked.sum() / count if count else masked.sum() * 0.0


def with_grad(t: Tensors, fn, wrt=("input.student",)) -> Tensors:
    """{'output.value': fn(...), 'output.grad*': autograd of the value (of its sum for per-row values)}."""
    leaves = {name: t[name].clone().requires_grad_(True) for name in wrt}
    value = fn({**t, **leaves})
    grads = torch.autograd.grad(value.sum(), list(leaves.values()))
    names = ["output.grad"] if len(wrt) == 1 else [f"output.grad_{n.split('.')[-1]}" for n in wrt]
    return {"output.value": value.detach(), **{n: g for n, g in zip(names, grads, strict=True)}}


def public_loss(t, function, options):
    """The public refslm.losses functions, written here from SPEC.md: -> value (scalar, or [B, T] for none)."""
    student = t["input.hidden"] @ t["input.lm_head"].T if "input.hidden" in t else t["input.student"]
    leading, vocab = student.shape[:-1], student.shape[-1]
    flat = student.reshape(-1, vocab)
    o = dict(options)
    if function == "cross_entropy":
        targets = t["input.targets"].reshape(-1)
        kept = targets != o.get("ignore_index", -100)
        values = t_loss_row_values("cross_entropy", flat[kept], targets=targets[kept],
                                   label_smoothing=o.get("label_smoothing", 0.0))
        full = torch.zeros(flat.shape[0], dtype=flat.dtype).masked_scatter(kept, values)
        out = reduce_rows(full, kept, o.get("reduction", "mean"), leading[0])
        return out.reshape(leading) if o.get("reduction") == "none" else out
    if function == "kd_loss":
        return kd_loss(t, flat, o)
    kind = {"generalized_jsd": "jsd"}.get(function, function)
    beta = o.get("alpha", 0.1) if kind.startswith("skew") else o.get("beta", 0.5 if kind == "jsd" else 0.0)
    teacher = t["input.teacher"].reshape(-1, t["input.teacher"].shape[-1])
    columns = min(vocab, teacher.shape[-1])
    temperature = o.get("temperature", 1.0)
    values = t_loss_row_values(kind, flat[:, :columns], teacher[:, :columns], temperature=temperature, beta=beta)
    kept = None
    if "input.mask" in t:
        kept = t["input.mask"].reshape(-1).bool()
    elif "input.labels" in t:
        kept = t["input.labels"].reshape(-1) != o.get("ignore_index", -100)
    coefficient = temperature ** 2 if o.get("scale_by_t2") else 1.0
    out = coefficient * reduce_rows(values, kept, o.get("reduction", "batchmean"), leading[0])
    return out.reshape(leading) if o.get("reduction") == "none" else out


def kd_loss(t, flat, o):
    """alpha * KD + (1 - alpha) * CE (SPEC.md): 'paper' (masked divergence / kept tokens, default reverse KL)
    or 'public_code' (forward KL, no mask, batchmean over all B*T rows, vocabularies cut to the smaller)."""
    alpha, temperature = o.get("alpha", 0.9), o.get("temperature", 1.0)
    targets = t["input.targets"].reshape(-1)
    kept = targets != o.get("ignore_index", 0)
    teacher = t["input.teacher"].reshape(-1, t["input.teacher"].shape[-1])
    columns = min(flat.shape[-1], teacher.shape[-1])
    public = o.get("mode", "paper") == "public_code"
    kind = "forward_kl" if public else o.get("divergence", "reverse_kl")
    beta = o.get("beta", 0.5)
    kd = t_loss_row_values(kind, flat[:, :columns], teacher[:, :columns], temperature=temperature, beta=beta)
    kd = reduce_rows(kd, None if public else kept, "batchmean", flat.shape[0])
    kd = kd * (temperature ** 2 if o.get("scale_by_t2") else 1.0)
    ce = t_loss_row_values("cross_entropy", flat[kept], targets=targets[kept],
                           label_smoothing=o.get("label_smoothing", 0.0))
    ce = ce.sum() / int(kept.sum()) if int(kept.sum()) else ce.sum() * 0.0
    return alpha * kd + (1 - alpha) * ce


def loss_case(name, description, inputs, function, options, wrt=("input.student",), **attributes):
    def compute(t):
        return with_grad(t, lambda tt: public_loss(tt, function, options), wrt)

    return Case(name, "loss", description, inputs, compute, {"function": function, "options": options, **attributes})


def loss_cases() -> list[Case]:
    g = generator("losses")
    b, t, v = 2, 5, 64
    student, teacher = randn(g, b, t, v, scale=3.0), randn(g, b, t, v, scale=3.0)
    teacher_inf = teacher.clone()
    teacher_inf[..., 40:] = -math.inf  # banned teacher entries (e.g. tokens outside the teacher tokenizer)
    targets = randint(g, 0, v, b, t)
    targets[1, 3:] = 0  # pad = ignore_index 0 for kd_loss
    labels = targets.clone()
    labels[0, 1], labels[1, 3:] = -100, -100
    mask = (randint(g, 0, 4, b, t) > 0).long()
    extreme = student.clone()
    extreme[0, 0, :3] = torch.tensor([1e4, -1e4, 1e4 - 1.0], dtype=F64)
    extreme[1, 2, 5] = -1e4
    none_kept = torch.full((b, t), -100, dtype=torch.int64)
    cases = []
    for reduction in ("mean", "sum", "none", "batchmean"):
        cases.append(loss_case(f"loss_cross_entropy_{reduction}", f"cross-entropy, ignore_index -100 on 3 tokens, "
                               f"label smoothing 0.1, reduction {reduction}", {"input.student": student,
                               "input.targets": labels}, "cross_entropy",
                               {"ignore_index": -100, "label_smoothing": 0.1, "reduction": reduction},
                               positional=["input.targets"]))
    cases.append(loss_case("loss_cross_entropy_zero_kept", "cross-entropy with every token ignored: value 0, "
                           "gradient 0 (defined, never NaN)", {"input.student": student, "input.targets": none_kept},
                           "cross_entropy", {"reduction": "mean"}, positional=["input.targets"]))
    cases.append(loss_case("loss_cross_entropy_extreme", "cross-entropy on logits with +-1e4 entries",
                           {"input.student": extreme, "input.targets": labels}, "cross_entropy", {"reduction": "mean"},
                           positional=["input.targets"]))
    divergence_specs = [
        ("forward_kl_t2_teacher_inf", "forward KL, temperature 2 with T^2 scaling, teacher -inf entries, "
         "batchmean unmasked (sum / B)", "forward_kl", {"temperature": 2.0, "scale_by_t2": True}, teacher_inf, {}),
        ("forward_kl_extreme", "forward KL, student logits with +-1e4 entries, reduction sum", "forward_kl",
         {"reduction": "sum"}, teacher, {"student": extreme}),
        ("reverse_kl_mask_mean", "reverse KL (the paper's KD), bool mask, reduction mean", "reverse_kl",
         {"reduction": "mean"}, teacher, {"mask": mask}),
        ("reverse_kl_extreme", "reverse KL, student logits with +-1e4 entries, batchmean", "reverse_kl", {},
         teacher, {"student": extreme}),
        ("jsd_labels_teacher_inf", "generalized JSD beta 0.3 (TRL GKD), labels with ignore_index, teacher -inf "
         "entries, batchmean masked (sum / kept)", "generalized_jsd", {"beta": 0.3, "ignore_index": -100},
         teacher_inf, {"labels": labels}),
        ("jsd_beta1", "generalized JSD beta 1 (= reverse KL exactly), reduction none", "generalized_jsd",
         {"beta": 1.0, "reduction": "none"}, teacher, {}),
        ("skew_kl_mask_sum", "skew KL alpha 0.1 (DistiLLM), mask, reduction sum, temperature 1.5",
         "skew_kl", {"alpha": 0.1, "reduction": "sum", "temperature": 1.5}, teacher_inf, {"mask": mask}),
        ("skew_reverse_kl_none", "skew reverse KL alpha 0.2, teacher -inf entries, reduction none",
         "skew_reverse_kl", {"alpha": 0.2, "reduction": "none"}, teacher_inf, {}),
        ("reverse_kl_none_t2", "reverse KL, temperature 2 with T^2 scaling, reduction none (value and gradient "
         "both scaled by T^2)", "reverse_kl", {"temperature": 2.0, "scale_by_t2": True, "reduction": "none"},
         teacher, {}),
        ("reverse_kl_zero_kept", "reverse KL with an all-False mask: value 0, gradient 0", "reverse_kl", {},
         teacher, {"mask": torch.zeros(b, t, dtype=torch.int64)}),
        ("forward_kl_vocab_truncate", "forward KL, teacher vocabulary 60 < student 64, vocab_policy truncate "
         "(gradient 0 on the student's extra columns)", "forward_kl", {"vocab_policy": "truncate"},
         teacher[..., :60], {}),
    ]
    for name, description, function, options, teach, extra in divergence_specs:
        inputs = {"input.student": extra.get("student", student), "input.teacher": teach}
        if "mask" in extra:
            inputs["input.mask"] = extra["mask"]
        if "labels" in extra:
            inputs["input.labels"] = extra["labels"]
        cases.append(loss_case(f"loss_{name}", description, inputs, function, options, positional=["input.teacher"]))
    kd_specs = [
        ("paper", "kd_loss paper mode: 0.9 reverse KL (masked by targets != pad 0, / kept) + 0.1 CE", {}, teacher),
        ("paper_jsd_t2", "kd_loss paper mode with generalized JSD beta 0.5, temperature 2, T^2 scaling, "
         "alpha 0.5, teacher -inf entries", {"divergence": "jsd", "temperature": 2.0, "scale_by_t2": True,
                                             "alpha": 0.5}, teacher_inf),
        ("public_code", "kd_loss public_code mode (microsoft/encoder-decoder-slm): forward KL batchmean over all "
         "B*T rows, no mask, teacher vocabulary 60 cut from student 64, + CE ignoring pad 0",
         {"mode": "public_code"}, teacher[..., :60]),
    ]
    for name, description, options, teach in kd_specs:
        cases.append(loss_case(f"loss_kd_{name}", description, {"input.student": student, "input.teacher": teach,
                                                                 "input.targets": targets}, "kd_loss", options,
                               positional=["input.teacher", "input.targets"]))
    hidden, lm_head = randn(g, b, t, 16), randn(g, v, 16, scale=0.5)
    cases.append(loss_case("loss_kd_fused_linear", "fused head + kd_loss (paper mode): hidden [B, T, C] and "
                           "lm_head [V, C] in, gradients for both, chunk_rows 3",
                           {"input.hidden": hidden, "input.lm_head": lm_head, "input.teacher": teacher,
                            "input.targets": targets}, "kd_loss", {}, wrt=("input.hidden", "input.lm_head"),
                           positional=["input.teacher", "input.targets"], form="fused", chunk_rows=3))
    cases.append(loss_case("loss_forward_kl_streaming", "forward KL through the streaming form (chunk_size "
                           "(3, 20): online logsumexp over vocabulary chunks), teacher -inf entries",
                           {"input.student": student, "input.teacher": teacher_inf}, "forward_kl", {},
                           positional=["input.teacher"], form="streaming", chunk_size=[3, 20]))
    cases += loss_rows_cases()
    return cases


def loss_rows_cases() -> list[Case]:
    """The backend kernel contract Backend.loss_rows: per-row values and row_weight-scaled gradients."""
    g = generator("loss_rows")
    n, v = 6, 40
    student, teacher = randn(g, n, v, scale=3.0), randn(g, n, v, scale=3.0)
    teacher[2, 30:] = -math.inf
    targets = randint(g, 0, v, n)
    row_weight = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.0 / 3.0, 1.0], dtype=F64)
    cases = []
    for kind, beta, smoothing in (("cross_entropy", 0.0, 0.1), ("forward_kl", 0.0, 0.0), ("reverse_kl", 0.0, 0.0),
                                  ("jsd", 0.3, 0.0), ("skew_kl", 0.1, 0.0), ("skew_reverse_kl", 0.2, 0.0)):
        teach = teacher if kind != "reverse_kl" else teacher.nan_to_num(neginf=-50.0)
        inputs = {"input.student": student, "input.row_weight": row_weight}
        inputs.update({"input.targets": targets} if kind == "cross_entropy" else {"input.teacher": teach})
        options = {"temperature": 1.5, "beta": beta, "label_smoothing": smoothing}

        def compute(t, kind=kind, options=options):
            s = t["input.student"].clone().requires_grad_(True)
            values = t_loss_row_values(kind, s, t.get("input.teacher"), t.get("input.targets"), **options)
            weight = t["input.row_weight"].to(values.dtype)
            values = torch.where(weight != 0, values, torch.zeros((), dtype=values.dtype))
            (grad,) = torch.autograd.grad((weight * values).sum(), [s])
            return {"output.values": values.detach(), "output.grad": grad}

        cases.append(Case(f"loss_rows_{kind}", "loss_rows", f"backend kernel loss_rows('{kind}'): temperature 1.5, "
                          f"beta {beta}, label smoothing {smoothing}, row weights incl. 0 and 1/3"
                          + (", teacher -inf entries" if kind != "reverse_kl" and kind != "cross_entropy" else ""),
                          inputs, compute, {"kind": kind, **options, "float64_inputs": ["input.row_weight"]}))
    return cases


# ------------------------------------------------------------------ generation (SPEC.md section 4)


def left_pad_positions(ids, pad):
    """[B, T] -> [B, T] positions t - (leading pads of the row), clamped at 0."""
    real = ids != pad
    leading = torch.where(real.any(1), real.int().argmax(1), torch.tensor(ids.shape[1]))
    return (torch.arange(ids.shape[1])[None] - leading[:, None]).clamp(min=0)


def prefix_logits(logits_of, ids, first):
    """[B, T] ids -> [B, T-first, V]: for each position p >= first, the last logits of a forward over ids[:, :p+1]."""
    return torch.stack([logits_of(ids[:, :p + 1])[:, -1] for p in range(first, ids.shape[1])], 1)


def greedy_tokens(next_logits, steps, eos):
    """Greedy decoding with full recompute: next_logits(tokens so far [B, n]) -> [B, V]; rows that emitted eos
    keep emitting it. -> (tokens [B, steps], smallest top-1 / top-2 logit gap seen)."""
    tokens, gap = [], math.inf
    finished = None
    for _ in range(steps):
        logits = next_logits(torch.stack(tokens, 1) if tokens else None)
        top2 = logits.topk(2, -1).values
        gap = min(gap, float((top2[:, 0] - top2[:, 1]).min()))
        token = logits.argmax(-1)
        if finished is not None:
            token = torch.where(finished, torch.tensor(eos), token)
        finished = token == eos if finished is None else finished | (token == eos)
        tokens.append(token)
    return torch.stack(tokens, 1), gap


def generate_cases() -> list[Case]:
    cases = []
    # encoder-decoder: cached decoder steps against a full recompute per prefix
    cfg = ed_config()
    g = generator("generate_ed_cached_steps")
    params = random_params(g, mu_param_shapes(cfg))
    inputs = {"input.input_ids": padded_ids(g, [(0, 0), (2, 0)], 8, cfg["vocab_size"]),
              "input.decoder_input_ids": padded_ids(g, [(0, 0), (0, 0)], 7, cfg["vocab_size"], first=1),
              **{f"param.{k}": v for k, v in params.items()}}

    def ed_steps(t, cfg=cfg):
        p = params_of(t)
        return {"output.logits": prefix_logits(lambda d: mu_logits(p, cfg, t["input.input_ids"], d),
                                               t["input.decoder_input_ids"], 1)}

    cases.append(Case("generate_ed_cached_steps", "generate", "encoder-decoder KV-cached decoding: prefill [BOS, "
                      "y1], then one token per step; logits at positions 1..6 equal a full recompute of each prefix",
                      inputs, ed_steps, {"model_kind": "encoder_decoder", "mode": "cached_steps", "prefill": 2}, cfg))

    # encoder-decoder greedy generation with EOS (the EOS id is one the model emits mid-way)
    g = generator("generate_ed_greedy")
    params = random_params(g, mu_param_shapes(cfg), embed_scale=0.2)
    source = padded_ids(g, [(0, 0), (3, 0), (0, 1)], 9, cfg["vocab_size"])

    def ed_next(p, cfg, src, tokens):
        bos = torch.full((src.shape[0], 1), cfg["bos_token_id"], dtype=torch.int64)
        dec = bos if tokens is None else torch.cat([bos, tokens], 1)
        return mu_logits(p, cfg, src, dec)[:, -1]

    dry, _ = greedy_tokens(lambda tok: ed_next(params, cfg, source, tok), 6, eos=-1)
    row, step = next((r, i) for r in range(dry.shape[0]) for i in range(5) if dry[r, i + 1] != dry[r, i])
    cfg_eos = {**cfg, "eos_token_id": int(dry[row, step])}  # a token the row would not repeat: EOS must be

    def ed_greedy(t, cfg=cfg_eos):
        p = params_of(t)
        tokens, gap = greedy_tokens(lambda tok: ed_next(p, cfg, t["input.input_ids"], tok), 6, cfg["eos_token_id"])
        assert gap > 1e-2, f"greedy margin {gap} too small for a robust exact-token golden"
        return {"output.tokens": tokens}

    cases.append(Case("generate_ed_greedy", "generate", "encoder-decoder greedy generation, 6 new tokens, EOS = a "
                      "token a row emits and would not repeat (the row must then keep emitting EOS); top-1/top-2 "
                      "margins > 1e-2",
                      {"input.input_ids": source, **{f"param.{k}": v for k, v in params.items()}}, ed_greedy,
                      {"model_kind": "encoder_decoder", "mode": "greedy", "max_new_tokens": 6}, cfg_eos))

    # Llama (transformers): cached steps across the dynamic-NTK boundary with a left-padded prompt
    cfg = do_config(qkv_embd=None, head_dim=12, n_head=4, is_interleaved=True, attention_bias=False, mlp_bias=False,
                    layout="llama", rope_type="dynamic", rope_factor=2.0, block_size=8, mask_fill="-inf")
    g = generator("generate_llama_hf_cached_steps_ntk")
    params = random_params(g, hf_param_shapes(cfg))
    prompt = padded_ids(g, [(1, 0), (3, 0)], 6, cfg["vocab_size"])
    continuation = randint(g, 3, cfg["vocab_size"], 2, 6)

    def llama_steps(t, cfg=cfg):
        p = params_of(t)
        ids = torch.cat([t["input.input_ids"], t["input.continuation_ids"]], 1)
        return {"output.logits": prefix_logits(
            lambda x: hf_logits(cfg, p, x, left_pad_positions(x, cfg["pad_token_id"])), ids,
            t["input.input_ids"].shape[1] - 1)}

    cases.append(Case("generate_llama_hf_cached_steps_ntk", "generate", "Llama (transformers) KV-cached decoding: "
                      "left-padded prompt, every row padded (positions t - leading pads, so the NTK length "
                      "max position + 1 is one less than the padded length), 6 steps taking it from 5 to 11 across "
                      "block_size 8 under dynamic NTK (the cache must be recomputed when the base changes); logits "
                      "equal a full recompute of each prefix",
                      {"input.input_ids": prompt, "input.continuation_ids": continuation,
                       **{f"param.{k}": v for k, v in params.items()}}, llama_steps,
                      {"model_kind": "decoder_only", "mode": "cached_steps", "computed_by": "transformers"}, cfg))

    # Llama greedy generation by transformers' own generate()
    cfg = {**cfg, "rope_type": "default", "rope_factor": 1.0, "block_size": 32, "tie_word_embeddings": False}
    g = generator("generate_llama_hf_greedy")
    params = random_params(g, hf_param_shapes(cfg))
    prompt = randint(g, 3, cfg["vocab_size"], 2, 5)

    def hf_greedy(cfg, p, ids, steps):
        model = hf_load(cfg, p)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                 do_sample=False, eos_token_id=cfg["eos_token_id"], pad_token_id=cfg["pad_token_id"],
                                 output_scores=True, return_dict_in_generate=True)
        tokens = out.sequences[:, ids.shape[1]:]
        seen = (tokens == cfg["eos_token_id"]).cumsum(1) > 0  # transformers pads finished rows: SPEC repeats EOS
        gap = min(float((s.topk(2, -1).values[:, 0] - s.topk(2, -1).values[:, 1]).min()) for s in out.scores)
        return torch.where(seen, torch.tensor(cfg["eos_token_id"]), tokens), gap

    dry, _ = hf_greedy({**cfg, "eos_token_id": 2}, params, prompt, 6)
    cfg_eos = {**cfg, "eos_token_id": int(dry[1, 3])}

    def llama_greedy(t, cfg=cfg_eos):
        tokens, gap = hf_greedy(cfg, params_of(t), t["input.input_ids"], 6)
        assert gap > 1e-2, f"greedy margin {gap} too small for a robust exact-token golden"
        return {"output.tokens": tokens}

    cases.append(Case("generate_llama_hf_greedy", "generate", "Llama greedy generation by transformers' generate(), "
                      "6 new tokens, EOS = the token row 1 emits fourth (finished rows repeat EOS)",
                      {"input.input_ids": prompt, **{f"param.{k}": v for k, v in params.items()}}, llama_greedy,
                      {"model_kind": "decoder_only", "mode": "greedy", "max_new_tokens": 6,
                       "computed_by": "transformers"}, cfg_eos))
    return cases


# ------------------------------------------------------------------ alignment (SPEC.md section 7)


def ragged(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths -> (concatenated ids, lengths), both int64."""
    return (torch.tensor([x for row in rows for x in row], dtype=torch.int64),
            torch.tensor([len(row) for row in rows], dtype=torch.int64))


def paper_alignment_case() -> Case:
    """The paper's KD batch from the public code's facts: student batch, teacher batch, index map, gather."""
    enc, dec, pad, bos = 5, 4, 0, 1
    sources = [[11, 12, 13], [21, 22, 23, 24, 25, 26, 27], [31]]  # the second is longer than enc: keep its start
    targets = [[41, 42, 2], [51, 52, 53, 2], [61]]
    g = generator("align_paper_batch")
    source_ids, source_lengths = ragged(sources)
    target_ids, target_lengths = ragged(targets)
    logits = randn(g, 3, enc + dec, 16)

    def compute(t):
        encoder_input = torch.full((3, enc), pad)
        labels = torch.full((3, dec), pad)
        teacher = torch.full((3, enc + dec), pad)
        for b, (src, tgt) in enumerate(zip(sources, targets, strict=True)):
            src = src[:enc]  # truncation_side "right": the end of a long source is dropped
            encoder_input[b, :len(src)] = torch.tensor(src)  # student: right padding
            labels[b, :len(tgt)] = torch.tensor(tgt)
            teacher[b, enc - len(src):enc] = torch.tensor(src)  # teacher: source LEFT-padded ...
            teacher[b, enc:enc + len(tgt)] = torch.tensor(tgt)  # ... then the target right-padded
        decoder_input = torch.cat([torch.full((3, 1), bos), labels[:, :-1]], 1)
        index_map = (enc - 1 + torch.arange(dec)).expand(3, dec)  # position enc-1+t predicts target token t
        valid = torch.arange(dec)[None] < torch.tensor([len(x) for x in targets])[:, None]
        gathered = torch.where(valid[..., None], t["input.teacher_logits"][torch.arange(3)[:, None], index_map],
                               torch.zeros((), dtype=t["input.teacher_logits"].dtype))
        return {"output.encoder_input_ids": encoder_input, "output.decoder_input_ids": decoder_input,
                "output.labels": labels, "output.teacher_input_ids": teacher,
                "output.teacher_attention_mask": (teacher != pad).long(), "output.index_map": index_map.contiguous(),
                "output.valid": valid.long(), "output.gathered_teacher_logits": gathered}

    return Case("align_paper_batch", "align", "the paper's KD alignment: student batch (source truncated to "
                "encoder_len 5 and right-padded, decoder input [BOS] + labels[:-1]), teacher batch (source "
                "LEFT-padded + target right-padded), index map enc-1+t, valid = real target tokens, gathered "
                "teacher logits (0 where not valid)",
                {"input.source_ids": source_ids, "input.source_lengths": source_lengths, "input.target_ids": target_ids,
                 "input.target_lengths": target_lengths, "input.teacher_logits": logits},
                compute, {"mode": "paper", "encoder_len": enc, "decoder_len": dec, "pad_id": pad, "bos_id": bos})


KIND_CODES = {"unaligned": 0, "1:1": 1, "many:1": 2}


def edit_distance(a: bytes, b: bytes) -> int:
    """Levenshtein distance by plain recursion (a second, independent implementation for the golden)."""
    @functools.cache
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def monotone_paths(n, m):
    """Every path from (0, 0) to (n-1, m-1) advancing i, j or both by one."""
    if (n, m) == (1, 1):
        return [[(0, 0)]]
    paths = []
    for di, dj in ((1, 1), (1, 0), (0, 1)):
        if n - di >= 1 and m - dj >= 1:
            paths += [p + [(n - 1, m - 1)] for p in monotone_paths(n - di, m - dj)]
    return paths


def spec_token_alignment(text_len, s_offsets, t_offsets, s_surfaces, t_surfaces):
    """SPEC.md cross-tokenizer alignment, brute force: units, shared-start blocks, the least-cost monotone path
    (asserted unique, so no tie rule is involved), closest teacher token per student token, kinds."""
    def units(offsets):
        starts = sorted({o[0] for o in offsets})
        bounds = [0, *starts[1:], text_len]
        span = {st: (bounds[k], bounds[k + 1]) for k, st in enumerate(starts)}
        return [span[o[0]] for o in offsets]

    s_spans, t_spans = units(s_offsets), units(t_offsets)
    shared = sorted({a for a, _ in s_spans} & {a for a, _ in t_spans})
    index, kind, blocks = [-1] * len(s_offsets), ["unaligned"] * len(s_offsets), []
    for lo, hi in zip(shared, [*shared[1:], text_len], strict=True):
        s_in = [i for i, sp in enumerate(s_spans) if lo <= sp[0] < hi]
        t_in = [j for j, sp in enumerate(t_spans) if lo <= sp[0] < hi]
        if lo == hi or not s_in or not t_in:
            continue
        blocks.append([s_in[0], s_in[-1] + 1, t_in[0], t_in[-1] + 1])
        cost = [[edit_distance(s_surfaces[i], t_surfaces[j]) for j in t_in] for i in s_in]
        scored = sorted((sum(cost[i][j] for i, j in p), p) for p in monotone_paths(len(s_in), len(t_in)))
        assert len(scored) == 1 or scored[0][0] < scored[1][0], "choose tokens with a unique least-cost path"
        path = scored[0][1]
        for i in range(len(s_in)):
            on_path = [j for ii, j in path if ii == i]
            closest = min(cost[i][j] for j in on_path)
            assert [cost[i][j] for j in on_path].count(closest) == 1, "choose tokens without a tie"
            j = next(j for j in on_path if cost[i][j] == closest)
            one_to_one = len(on_path) == 1 and sum(jj == j for _, jj in path) == 1 and \
                s_spans[s_in[i]] == t_spans[t_in[j]]
            index[s_in[i]], kind[s_in[i]] = t_in[j], "1:1" if one_to_one else "many:1"
    return index, kind, blocks


def cross_tokenizer_case() -> Case:
    """Two hand-made tokenizations of one text (offsets and byte surfaces), as two tokenizers would give."""
    text = "low lower unhappy! redo"
    student = [((0, 3), b"low"), ((3, 9), b" lower"), ((9, 12), b" un"), ((12, 17), b"happy"), ((17, 18), b"!"),
               ((18, 23), b" redo"), ((23, 23), b"")]  # the last: a zero-width token at the end (unaligned)
    teacher = [((0, 2), b"lo"), ((2, 3), b"w"), ((3, 7), b" low"), ((7, 9), b"er"), ((9, 13), b" unh"),
               ((13, 16), b"app"), ((16, 17), b"y"), ((17, 18), b"!"), ((18, 20), b" r"), ((20, 23), b"edo")]

    def tensors(tokens, side):
        surfaces = [list(sf) for _, sf in tokens]
        data, lengths = ragged(surfaces)
        return {f"input.{side}_offsets": torch.tensor([o for o, _ in tokens], dtype=torch.int64),
                f"input.{side}_surface_bytes": data, f"input.{side}_surface_lengths": lengths}

    def compute(t):
        index, kind, blocks = spec_token_alignment(len(text), [o for o, _ in student], [o for o, _ in teacher],
                                                   [sf for _, sf in student], [sf for _, sf in teacher])
        return {"output.teacher_index": torch.tensor(index), "output.kind": torch.tensor([KIND_CODES[k] for k in kind]),
                "output.blocks": torch.tensor(blocks, dtype=torch.int64)}

    inputs = {"input.text_codepoints": torch.tensor([ord(c) for c in text], dtype=torch.int64),
              **tensors(student, "student"), **tensors(teacher, "teacher")}
    return Case("align_cross_tokenizer", "align", "cross-tokenizer alignment (token_align.align_offsets) of two "
                "tokenizations of 'low lower unhappy! redo': shared-start blocks, DTW over Levenshtein costs of "
                "token bytes, closest teacher token (for ' redo' the second on its path, 'edo'), a zero-width token "
                "at the end; kinds coded unaligned 0, 1:1 1, many:1 2", inputs, compute,
                {"mode": "cross_tokenizer", "kind_codes": KIND_CODES})


def align_cases() -> list[Case]:
    return [paper_alignment_case(), cross_tokenizer_case()]


# ------------------------------------------------------------------ main


def all_cases() -> list[Case]:
    return (op_cases() + mu_model_cases() + hf_model_cases() + loss_cases() + generate_cases()
            + align_cases())


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the golden suite (manifest.json and cases/).")
    parser.add_argument("--out", type=Path, default=HERE, help="suite directory (default: golden/)")
    out = parser.parse_args().out
    hf_float64_patches()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    cases_dir = out / "cases"
    cases_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    names = set()
    for case in all_cases():
        assert case.name not in names, f"duplicate case name {case.name}"
        names.add(case.name)
        entry, tensors = build(case)
        path = out / entry["file"]
        save_file(tensors, str(path), metadata={"case": case.name})  # one key: the header stays byte-stable
        entry["sha256"] = sha256(path)
        entries.append(entry)
        print(f"{case.name:45s} {path.stat().st_size:9d} B")
    for stale in cases_dir.glob("*.safetensors"):
        if stale.stem not in names:
            stale.unlink()
    manifest = {"format_version": FORMAT_VERSION, "generator": "golden/generate.py",
                "tolerance_rule": {"safety": SAFETY, "perturbations": PERTURBATIONS, "floor_float32": FLOOR32,
                                   "floor_float64": FLOOR64},
                "cases": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(entries)} cases written to {cases_dir}")


if __name__ == "__main__":
    main()

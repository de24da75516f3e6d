#!/usr/bin/env python
"""Write the golden suite: golden/cases/<case>.safetensors and golden/manifest.json.

Every expected tensor is computed here with PyTorch in float64, written from SPEC.md and the facts of
the paper's public implementation; the Llama and Phi-3 decoder-only goldens are computed by Hugging
Face transformers' own LlamaForCausalLM / Phi3ForCausalLM. This file never imports refslm.

    python golden/generate.py            # regenerate everything (byte-identical on a rerun)

Tolerances (SPEC.md section 8): each case is computed a second time by the same torch code with its
float inputs rounded to float32 and all math in float32. The measured normwise float32 error
e = max|y32 - y64| / max|y64| sets r32 = ladder(SAFETY * e) (never below FLOOR32); float64 gets the
same conditioning scaled by eps64/eps32 (never below FLOOR64). Each output passes when every element
satisfies |got - expected| <= atol + rtol * |expected| with rtol = r and atol = r * max|expected|.
"""

from __future__ import annotations

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
CASES_DIR = HERE / "cases"
MANIFEST = HERE / "manifest.json"
FORMAT_VERSION = 1

F64 = torch.float64
EPS32 = float(torch.finfo(torch.float32).eps)
EPS64 = float(torch.finfo(torch.float64).eps)
SAFETY = 4.0
FLOOR32 = 1e-6
FLOOR64 = 1e-12

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


def t_rope_cos_sin(positions, head_dim, theta, layout, linear_factor=1.0):
    """positions [..., T] -> cos, sin [..., T, D] float64."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=F64) / head_dim)
    angles = (positions.to(F64) / linear_factor)[..., None] * inv_freq
    full = torch.cat([angles, angles], -1) if layout == "rotate_half" else angles.repeat_interleave(2, -1)
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


def t_attention(q, k, v, key_mask=None, causal=False, q_start=0, interleaved=False, mask_fill="finite_min"):
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], key_mask [B, Tk] -> [B, Hq, Tq, D] (SPEC.md attention)."""
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    n_rep = hq // k.shape[1]
    k, v = t_repeat_kv(k, n_rep, interleaved), t_repeat_kv(v, n_rep, interleaved)
    allowed = torch.ones(b, 1, tq, tk, dtype=torch.bool)
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
    if causal:
        allowed = allowed & (torch.arange(tk)[None, :] <= q_start + torch.arange(tq)[:, None])
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


def measured_tolerances(expected: torch.Tensor, approx32: torch.Tensor) -> dict:
    """{'float64': {'rtol', 'atol'}, 'float32': {...}} from the measured float32 error (module docstring)."""
    if not expected.is_floating_point():
        return {"exact": True}
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(approx32)), "float32 torch run changed which outputs are finite"
    assert torch.equal(expected[~finite], approx32.to(F64)[~finite]), "float32 torch run changed infinities"
    values = expected[finite]
    scale = float(values.abs().max()) if values.numel() else 0.0
    if scale == 0.0:
        scale = 1.0
    err = float((approx32.to(F64)[finite] - values).abs().max()) / scale if values.numel() else 0.0
    tolerances = {}
    for dtype, floor, factor in (("float64", FLOOR64, EPS64 / EPS32), ("float32", FLOOR32, 1.0)):
        r = max(floor, ladder_up(SAFETY * err * factor))
        tolerances[dtype] = {"rtol": r, "atol": ladder_up(r * scale)}
    tolerances["measured_float32_normwise_error"] = float(f"{err:.3g}")
    return tolerances


def to_dtype(tensors: Tensors, dtype: torch.dtype) -> Tensors:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}


def build(case: Case) -> tuple[dict, Tensors]:
    """Compute a case in float64 and float32 -> (manifest entry without hash, tensors to store)."""
    for name, value in case.inputs.items():
        assert name.startswith(("input.", "param.")), name
        assert value.dtype in (F64, torch.int64), (name, value.dtype)
    expected = case.compute(to_dtype(case.inputs, F64))
    approx32 = case.compute(to_dtype(case.inputs, torch.float32))
    tensors = dict(case.inputs)
    tolerances = {}
    for name, value in expected.items():
        assert name.startswith("output."), name
        value = value.detach().contiguous()
        assert value.dtype in (F64, torch.int64), (name, value.dtype)
        assert not torch.isnan(value).any(), f"{case.name}: NaN in {name}"
        tensors[name] = value
        tolerances[name] = measured_tolerances(value, approx32[name].detach())
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
    specs = [  # name, description, layout, positions [B or 1, T], theta, seq_len for NTK, ntk factor, block, linear
        ("rotate_half", "rotate_half layout, positions 0..T-1", "rotate_half", torch.arange(11)[None], 1, 1.0, 1.0),
        ("interleaved", "interleaved layout (pairs 2i, 2i+1), positions 0..T-1", "interleaved",
         torch.arange(11)[None], 1, 1.0, 1.0),
        ("offset", "rotate_half, per-row positions with offsets (KV-cache steps 7.. and 100..)", "rotate_half",
         torch.stack([torch.arange(7, 18), torch.arange(100, 111)]), 1, 1.0, 1.0),
        ("centred", "rotate_half, centred encoder positions p - (L-1)//2, L = 11", "rotate_half",
         (torch.arange(11) - 5)[None], 1, 1.0, 1.0),
        ("ntk", "rotate_half, dynamic NTK: factor 4, block_size 8, sequence length 11 > block_size",
         "rotate_half", torch.arange(11)[None], 4.0, 1.0, 8),
        ("linear_scaling", "interleaved, linear position scaling: positions / 2.5", "interleaved",
         torch.arange(11)[None], 1, 2.5, 1.0),
    ]
    cases = []
    for name, description, layout, positions, ntk_factor, linear_factor, block in specs:
        g = generator(f"rope_{name}")
        x = randn(g, positions.shape[0] if positions.shape[0] > 1 else 2, 3, positions.shape[1], 16)
        theta = ntk_theta(10000.0, 16, positions.shape[1], ntk_factor, block) if ntk_factor > 1 else 10000.0
        attributes = dict(op="rope", layout=layout, theta=10000.0, linear_factor=linear_factor,
                          ntk_factor=ntk_factor, block_size=block, seq_len=positions.shape[1], effective_theta=theta)

        def compute(t, layout=layout, theta=theta, linear_factor=linear_factor):
            cos, sin = t_rope_cos_sin(t["input.positions"], 16, theta, layout, linear_factor)
            return {"output.y": t_apply_rope(t["input.x"], cos, sin, layout), "output.cos": cos, "output.sin": sin}

        cases.append(Case(f"op_rope_{name}", "op", description, {"input.x": x, "input.positions": positions},
                          compute, attributes))
    return cases


def attention_cases() -> list[Case]:
    """Scaled dot-product attention in every configuration the models use."""
    specs = [  # name, description, Hq, Hkv, Tq, Tk, causal, q_start, interleaved, key mask rows, fill
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
    ]
    cases = []
    for name, description, hq, hkv, tq, tk, causal, q_start, interleaved, mask_rows, fill in specs:
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
        attributes = dict(op="attention", causal=causal, q_start=q_start, interleaved=interleaved, mask_fill=fill)

        def compute(t, a=attributes):
            return {"output.y": t_attention(t["input.q"], t["input.k"], t["input.v"], t.get("input.key_mask"),
                                            a["causal"], a["q_start"], a["interleaved"], a["mask_fill"])}

        cases.append(Case(f"op_attention_{name}", "op", description, inputs, compute, attributes))
    return cases


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


def random_params(g: torch.Generator, shapes: dict[str, tuple[int, ...]]) -> Tensors:
    """Norm weights 1 + 0.2 N(0,1); biases 0.1 N(0,1); embeddings N(0,1); other matrices N(0, 1/fan_in)."""
    params = {}
    for name, shape in shapes.items():
        if len(shape) == 1 and ("ln" in name.split(".")[-2] or "norm" in name):
            params[name] = 1.0 + randn(g, *shape, scale=0.2)
        elif len(shape) == 1:
            params[name] = randn(g, *shape, scale=0.1)
        elif "wte" in name or "embed_tokens" in name:
            params[name] = randn(g, *shape)
        else:
            params[name] = randn(g, *shape, scale=shape[1] ** -0.5)
    return params


def rope_tables(cfg: dict, positions: torch.Tensor, seq_len: int):
    """cos, sin [B or 1, T, D] float64 for positions under the config's RoPE type (SPEC.md RoPE)."""
    theta, linear = cfg["rope_theta"], 1.0
    if cfg["rope_type"] == "dynamic":
        theta = ntk_theta(theta, head_dim(cfg), seq_len, cfg["rope_factor"], cfg["block_size"])
    elif cfg["rope_type"] == "linear":
        linear = cfg["rope_factor"]
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
    rope = rope_tables(cfg, torch.arange(t)[None] if positions is None else positions, t)
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


# ------------------------------------------------------------------ main


def all_cases() -> list[Case]:
    return op_cases() + mu_model_cases()


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    CASES_DIR.mkdir(parents=True, exist_ok=True)
    entries = []
    names = set()
    for case in all_cases():
        assert case.name not in names, f"duplicate case name {case.name}"
        names.add(case.name)
        entry, tensors = build(case)
        path = HERE / entry["file"]
        save_file(tensors, str(path), metadata={"case": case.name})  # one key: the header stays byte-stable
        entry["sha256"] = sha256(path)
        entries.append(entry)
        print(f"{case.name:45s} {path.stat().st_size:9d} B")
    for stale in CASES_DIR.glob("*.safetensors"):
        if stale.stem not in names:
            stale.unlink()
    manifest = {"format_version": FORMAT_VERSION, "generator": "golden/generate.py",
                "tolerance_rule": {"safety": SAFETY, "floor_float32": FLOOR32, "floor_float64": FLOOR64},
                "cases": entries}
    MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    print(f"{len(entries)} cases written to {CASES_DIR}")


if __name__ == "__main__":
    main()

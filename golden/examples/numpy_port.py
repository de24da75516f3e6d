#!/usr/bin/env python
"""A tiny independent implementation checked end to end by `refslm verify --outputs` (README worked example).

It stands for your own port (an NPU SDK, ONNX, C++ ...): it imports NumPy only, never refslm. It
reads the golden suite exported as .npz archives, computes RMSNorm, SwiGLU and attention (GQA in
both orders, causal, key padding, finite_min or -inf fill) from SPEC.md, and writes one
<case>.npz per case holding the manifest's output names.

    refslm golden export --format npz /tmp/golden-npz
    python golden/examples/numpy_port.py /tmp/golden-npz /tmp/my-outputs [--dtype float32]
    refslm verify --outputs /tmp/my-outputs --case 'op_rmsnorm_*' --case 'op_attention_*' --case op_gated_silu
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def rmsnorm(x, weight, eps, unit_offset):
    normed = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return normed * ((1 + weight) if unit_offset else weight)


def swiglu(gate, up):
    return gate / (1 + np.exp(-gate)) * up


def attention(q, k, v, key_mask, causal, q_start, interleaved, mask_fill, segment_ids=None):
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] -> [B, Hq, Tq, D]."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = ((np.repeat(a, n_rep, axis=1) if interleaved else np.tile(a, (1, n_rep, 1, 1))) for a in (k, v))
    allowed = np.ones((q.shape[0], 1, q.shape[2], k.shape[2]), dtype=bool)
    if key_mask is not None:
        allowed &= key_mask.astype(bool)[:, None, None, :]
    if causal:
        allowed &= np.arange(k.shape[2])[None, :] <= q_start + np.arange(q.shape[2])[:, None]
    if segment_ids is not None:  # query i (the token at q_start + i) sees keys of its own segment only
        allowed &= segment_ids[:, None, q_start:q_start + q.shape[2], None] == segment_ids[:, None, None, :]
    fill = np.finfo(q.dtype).min if mask_fill == "finite_min" else -np.inf
    scores = np.where(allowed, q @ k.transpose(0, 1, 3, 2), fill) / q.dtype.type(math.sqrt(q.shape[-1]))
    any_key = allowed.any(axis=-1, keepdims=True)
    scores = np.where(any_key, scores, 0)  # a row with no key: finite_min gives the uniform average anyway
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights = weights / weights.sum(axis=-1, keepdims=True)
    if mask_fill == "-inf":
        weights = np.where(any_key, weights, 0)
    return weights @ v


def run(case: dict, t: dict) -> dict | None:
    """Outputs of one case, or None for ops this port does not implement."""
    a = case["attributes"]
    if a.get("op") == "rmsnorm":
        return {"output.y": rmsnorm(t["input.x"], t["input.weight"], a["eps"], a["unit_offset"])}
    if a.get("op") == "gated" and a["kind"] == "silu":
        return {"output.y": swiglu(t["input.gate"], t["input.up"])}
    if a.get("op") == "attention":
        return {"output.y": attention(t["input.q"], t["input.k"], t["input.v"], t.get("input.key_mask"),
                                      a["causal"], a["q_start"], a["interleaved"], a["mask_fill"],
                                      t.get("input.segment_ids"))}
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("golden", type=Path, help="directory written by `refslm golden export --format npz`")
    parser.add_argument("outputs", type=Path, help="directory to write <case>.npz outputs into")
    parser.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    args = parser.parse_args()
    manifest = json.loads((args.golden / "manifest.json").read_text())
    args.outputs.mkdir(parents=True, exist_ok=True)
    written = 0
    for case in manifest["cases"]:
        with np.load(args.golden / case["file"], allow_pickle=False) as archive:
            tensors = {n: (archive[n].astype(args.dtype) if archive[n].dtype.kind == "f" else archive[n])
                       for n in case["inputs"]}
        outputs = run(case, tensors)
        if outputs is not None:
            np.savez(args.outputs / f"{case['name']}.npz", **outputs)
            written += 1
    print(f"wrote outputs of {written} cases to {args.outputs}")


if __name__ == "__main__":
    main()

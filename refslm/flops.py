"""Analytic costs of the models: parameter counts, matmul FLOPs and KV-cache bytes.

Counting convention (the one `refslm.bench.counting.CountingBackend` instruments):
- FLOPs are matrix-multiply FLOPs only, 2*m*n*k per GEMM of an [m, k] by [k, n] product (one
  multiply and one add per term). Elementwise work (norms, activations, softmax, bias, RoPE,
  residual adds, sampling) is not counted; it is O(T*C) per layer against O(T*C^2) for the GEMMs.
- Attention counts what the reference executes: the full score matrix Q K^T over every key in the
  slice it is given, masked entries included (a causal prefill of T tokens costs T*T, not T*(T+1)/2),
  and the same again for weights @ V. GQA costs as many query heads (keys are shared, not skipped).
- Components: "projections" (q/k/v/out linears of self- and cross-attention), "attention" (scores
  and weighted values), "mlp" (fc1/fc2 or gate/up/down), "head" (the vocabulary projection).

Generation of N new tokens (batch B, input length L, no padding):
- encoder-decoder: prefill = encoder over L tokens + cross-attention K/V of the L encoder outputs in
  every decoder block + the decoder on BOS (position 0); decode step n = 1..N-1 feeds generated
  token n at decoder position n (self-attention over n+1 keys, cross-attention over L keys).
- decoder-only: prefill = the L input tokens (head on the last position only); decode step n feeds
  generated token n at position L+n-1 (attention over L+n keys).
The N-th token is sampled from the logits of step N-1, so there are N-1 decode steps (what
`refslm.generate.generate` runs). Dynamic NTK RoPE past block_size makes generation recompute the
cached prefix; the decode counts refuse that case rather than give a wrong number.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .config import DecoderOnlyConfig, EncoderDecoderConfig

Config = EncoderDecoderConfig | DecoderOnlyConfig
COMPONENTS = ("projections", "attention", "mlp", "head")


@dataclass(frozen=True)
class Flops:
    """Matmul FLOPs split by component (Python ints: no overflow)."""

    projections: int = 0
    attention: int = 0
    mlp: int = 0
    head: int = 0

    @property
    def total(self) -> int:
        return self.projections + self.attention + self.mlp + self.head

    def __add__(self, other: Flops) -> Flops:
        return Flops(*(getattr(self, c) + getattr(other, c) for c in COMPONENTS))

    def as_dict(self) -> dict[str, int]:
        """{component: flops, ..., 'total': flops}."""
        return {**dataclasses.asdict(self), "total": self.total}


def gemm(m: int, n: int, k: int) -> int:
    """FLOPs of an [m, k] @ [k, n] product: 2*m*n*k."""
    return 2 * m * n * k


# ---------------------------------------------------------------- widths


def _widths(cfg: Config) -> tuple[int, int, int, int]:
    """-> (C, query width Hq*D, key/value width Hkv*D, F)."""
    return cfg.n_embd, cfg.qkv_width, cfg.n_kv_head * cfg.resolved_head_dim, cfg.hidden_dim


def _is_swiglu(cfg: Config) -> bool:
    return isinstance(cfg, DecoderOnlyConfig) and cfg.mlp_kind == "swiglu"


def _attention_bias(cfg: Config) -> bool:
    return cfg.attention_bias if isinstance(cfg, DecoderOnlyConfig) else True


def _mlp_bias(cfg: Config) -> bool:
    return cfg.mlp_bias if isinstance(cfg, DecoderOnlyConfig) else True


def _head_is_tied(cfg: Config) -> bool:
    return cfg.tie_word_embeddings if isinstance(cfg, DecoderOnlyConfig) else True


# ---------------------------------------------------------------- parameter counts


def _attention_params(cfg: Config) -> int:
    """q [Q, C], k and v [KV, C], out [C, Q], plus biases when the layout has them."""
    c, q, kv, _ = _widths(cfg)
    biases = (q + 2 * kv + c) if _attention_bias(cfg) else 0
    return c * (2 * q + 2 * kv) + biases


def _mlp_params(cfg: Config) -> int:
    """GELU: fc1 [F, C], fc2 [C, F]; SwiGLU: gate and up [F, C], down [C, F]; plus biases."""
    c, _, _, f = _widths(cfg)
    if _is_swiglu(cfg):
        return 3 * c * f + ((2 * f + c) if _mlp_bias(cfg) else 0)
    return 2 * c * f + ((f + c) if _mlp_bias(cfg) else 0)


def param_counts(cfg: Config) -> dict[str, int]:
    """Parameters by component: embedding, attention, mlp, norms, head (0 when tied), total.

    Encoder-decoder: E encoder blocks (ln1, attn, ln2, mlp), ln_e, D decoder blocks (ln1, causal
    attn, ln2, cross attn, ln3, mlp), ln_f, tied head. Decoder-only: n_layer blocks (ln1, attn,
    ln2, mlp), final norm, head tied or not.
    """
    c = cfg.n_embd
    if isinstance(cfg, EncoderDecoderConfig):
        attention = (cfg.n_encoder_layer + 2 * cfg.n_decoder_layer) * _attention_params(cfg)
        mlp = (cfg.n_encoder_layer + cfg.n_decoder_layer) * _mlp_params(cfg)
        norms = c * (2 * cfg.n_encoder_layer + 3 * cfg.n_decoder_layer + 2)
    else:
        attention = cfg.n_layer * _attention_params(cfg)
        mlp = cfg.n_layer * _mlp_params(cfg)
        norms = c * (2 * cfg.n_layer + 1)
    embedding = cfg.vocab_size * c
    head = 0 if _head_is_tied(cfg) else cfg.vocab_size * c
    counts = dict(embedding=embedding, attention=attention, mlp=mlp, norms=norms, head=head)
    return {**counts, "total": sum(counts.values())}


# ---------------------------------------------------------------- FLOPs of the pieces


def _self_attention(cfg: Config, batch: int, tq: int, tk: int) -> Flops:
    """tq new tokens attending to tk keys (their own and the cached ones)."""
    c, q, kv, _ = _widths(cfg)
    rows = batch * tq
    return Flops(projections=gemm(rows, q + 2 * kv, c) + gemm(rows, c, q),
                 attention=2 * gemm(batch * cfg.n_head * tq, tk, cfg.resolved_head_dim))


def _cross_attention(cfg: Config, batch: int, tq: int, enc_len: int) -> Flops:
    """tq decoder queries against enc_len encoder keys whose K/V are already projected."""
    c, q, _, _ = _widths(cfg)
    rows = batch * tq
    return Flops(projections=gemm(rows, q, c) + gemm(rows, c, q),
                 attention=2 * gemm(batch * cfg.n_head * tq, enc_len, cfg.resolved_head_dim))


def _cross_kv(cfg: Config, batch: int, enc_len: int) -> Flops:
    """K and V projections of the encoder output, once per request, in one decoder block."""
    c, _, kv, _ = _widths(cfg)
    return Flops(projections=gemm(batch * enc_len, 2 * kv, c))


def _mlp(cfg: Config, rows: int) -> Flops:
    c, _, _, f = _widths(cfg)
    n_in = 2 if _is_swiglu(cfg) else 1
    return Flops(mlp=n_in * gemm(rows, f, c) + gemm(rows, c, f))


def _head(cfg: Config, rows: int) -> Flops:
    return Flops(head=gemm(rows, cfg.vocab_size, cfg.n_embd))


def _sum(parts: list[Flops], times: int = 1) -> Flops:
    total = Flops()
    for part in parts:
        total = total + part
    return Flops(*(times * getattr(total, c) for c in COMPONENTS))


def _decoder_only_tokens(cfg: DecoderOnlyConfig, batch: int, tq: int, tk: int) -> Flops:
    """tq tokens through every block with tk keys each, head on one position per row."""
    block = _sum([_self_attention(cfg, batch, tq, tk), _mlp(cfg, batch * tq)])
    return _sum([block], cfg.n_layer) + _head(cfg, batch)


def _decoder_step(cfg: EncoderDecoderConfig, batch: int, position: int, enc_len: int) -> Flops:
    """One decoder token at `position` through every decoder block, then the head."""
    block = _sum([_self_attention(cfg, batch, 1, position + 1), _cross_attention(cfg, batch, 1, enc_len),
                  _mlp(cfg, batch)])
    return _sum([block], cfg.n_decoder_layer) + _head(cfg, batch)


def _check_lengths(input_len: int, batch: int) -> None:
    for name, value in (("input_len", input_len), ("batch", batch)):
        if not isinstance(value, int | np.integer) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_cache_reused(cfg: Config, length: int) -> None:
    """A decode step reaching `length` tokens must reuse the KV cache, else the counts do not hold.

    Dynamic NTK changes the RoPE base at every length past block_size; longrope switches from the
    short to the long factors once, at the step whose length is original_max + 1. Generation then
    recomputes the prefix (refslm.generate.CachedDecoder), which these counts do not include.
    """
    if cfg.rope_type == "dynamic" and cfg.rope_factor > 1 and length > cfg.block_size:
        raise ValueError(f"analytic counts assume the KV cache is reused; with dynamic NTK (rope_factor "
                         f"{cfg.rope_factor}) a sequence of {length} > block_size {cfg.block_size} recomputes it")
    if cfg.rope_type == "longrope" and length == cfg.rope_original_max_position + 1:
        raise ValueError(f"analytic counts assume the KV cache is reused; with longrope the decode step reaching "
                         f"{length} tokens switches to the long factors and recomputes it")


# ---------------------------------------------------------------- public FLOP counts


def encoder_flops(cfg: EncoderDecoderConfig, input_len: int, batch: int = 1) -> Flops:
    """The encoder over [batch, input_len] tokens (bidirectional: input_len keys per query)."""
    _check_lengths(input_len, batch)
    block = _sum([_self_attention(cfg, batch, input_len, input_len), _mlp(cfg, batch * input_len)])
    return _sum([block], cfg.n_encoder_layer)


def prefill_flops(cfg: Config, input_len: int, batch: int = 1) -> Flops:
    """Everything up to the logits of the first new token (see the module docstring)."""
    _check_lengths(input_len, batch)
    if isinstance(cfg, EncoderDecoderConfig):
        cross_kv = _sum([_cross_kv(cfg, batch, input_len)], cfg.n_decoder_layer)
        return encoder_flops(cfg, input_len, batch) + cross_kv + _decoder_step(cfg, batch, 0, input_len)
    return _decoder_only_tokens(cfg, batch, input_len, input_len)


def decode_step_flops(cfg: Config, input_len: int, step: int, batch: int = 1) -> Flops:
    """Decode step `step` (1-based): feeds generated token `step` and yields the logits of token step+1."""
    _check_lengths(input_len, batch)
    if not isinstance(step, int | np.integer) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    if isinstance(cfg, EncoderDecoderConfig):
        _check_cache_reused(cfg, step + 1)
        return _decoder_step(cfg, batch, step, input_len)
    _check_cache_reused(cfg, input_len + step)
    return _decoder_only_tokens(cfg, batch, 1, input_len + step)


def generation_flops(cfg: Config, input_len: int, new_tokens: int, batch: int = 1) -> Flops:
    """Prefill plus the new_tokens - 1 decode steps of a generation of new_tokens tokens."""
    if not isinstance(new_tokens, int | np.integer) or new_tokens < 1:
        raise ValueError(f"new_tokens must be an int >= 1, got {new_tokens!r}")
    steps = [decode_step_flops(cfg, input_len, n, batch) for n in range(1, new_tokens)]
    return _sum([prefill_flops(cfg, input_len, batch), *steps])


# ---------------------------------------------------------------- KV-cache bytes


def kv_cache_bytes(cfg: Config, input_len: int, new_tokens: int, dtype: str = "float32",
                   batch: int = 1) -> dict[str, int]:
    """Bytes of the caches a generation of new_tokens tokens holds at its end.

    -> {'self': K and V of the causal self-attention, 'cross': K and V of the encoder output in
    every decoder block (0 for decoder-only), 'total'}. Encoder-decoder: the self cache holds the
    decoder's new_tokens positions (BOS and the first new_tokens - 1 generated tokens); decoder-only:
    input_len + new_tokens - 1 positions (the last token is never fed back). These are the positions
    written; `refslm.generate.KVCache` allocates one more (capacity prefix + new_tokens).
    """
    _check_lengths(input_len, batch)
    per_position = 2 * batch * cfg.n_kv_head * cfg.resolved_head_dim * np.dtype(dtype).itemsize
    if isinstance(cfg, EncoderDecoderConfig):
        self_bytes = cfg.n_decoder_layer * new_tokens * per_position
        cross_bytes = cfg.n_decoder_layer * input_len * per_position
    else:
        self_bytes = cfg.n_layer * (input_len + new_tokens - 1) * per_position
        cross_bytes = 0
    return {"self": self_bytes, "cross": cross_bytes, "total": self_bytes + cross_bytes}


# ---------------------------------------------------------------- bytes read per decode step


def decode_step_bytes(cfg: Config, input_len: int, step: int, dtype: str = "float32", batch: int = 1) -> int:
    """Bytes a decode step must read at least: the weights it uses once, plus the cached keys/values.

    At batch 1 a decode step is a chain of matrix-vector products, so its time is bounded below by
    these bytes / memory bandwidth. Encoder-decoder: the decoder blocks without their cross-attention
    K/V projections (applied once to the encoder output), ln_f and the tied head; cache reads: step+1
    self positions and input_len cross positions per decoder block. Decoder-only: every parameter
    (the embedding once, as the head), and input_len + step positions per block.
    """
    _check_lengths(input_len, batch)
    itemsize = np.dtype(dtype).itemsize
    per_position = 2 * batch * cfg.n_kv_head * cfg.resolved_head_dim * itemsize
    if isinstance(cfg, EncoderDecoderConfig):
        c, _, kv, _ = _widths(cfg)
        block = 2 * _attention_params(cfg) + _mlp_params(cfg) + 3 * c - 2 * (kv * c + kv)
        weights = cfg.n_decoder_layer * block + c + cfg.vocab_size * c
        cache = cfg.n_decoder_layer * (step + 1 + input_len) * per_position
    else:
        weights = param_counts(cfg)["total"]
        cache = cfg.n_layer * (input_len + step) * per_position
    return weights * itemsize + cache

"""The models, written once against the backend interface (refslm/backends/base.py).

Three kinds, configured by refslm.config:
  - the paper's encoder-decoder (public Mu layout and numerics)  EncoderDecoderConfig
  - the Mu decoder-only baseline (Mu blocks without cross-attn)  DecoderOnlyConfig(layout="mu")
  - the Llama / Phi-3 decoder-only layout (SwiGLU)               DecoderOnlyConfig(layout="llama"|"phi3")

A layout function (`_mu_encoder_decoder`, `_mu_decoder_only`, `_llama`) names every parameter and
its shape exactly once; it is used both to list `param_shapes` and to build the model's weight tree.
The forward pass is plain functions over that tree (picoGPT style). SPEC.md section "Models" is the
normative description. Shape letters as in refslm.ops; Te encoder length, Td decoder length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import ops
from .backends import Backend, get_backend
from .config import DecoderOnlyConfig, EncoderDecoderConfig

Config = EncoderDecoderConfig | DecoderOnlyConfig
Array = Any  # a backend array
Take = Callable[[str, tuple[int, ...]], np.ndarray]

INIT_STD = 0.02  # weights and biases ~ normal(0, INIT_STD); norm weights ~ 1 + normal(0, INIT_NORM_STD)
INIT_NORM_STD = 0.1


class ParameterError(ValueError):
    """Parameters do not match the configuration (missing, unexpected or misshaped names)."""


# ---------------------------------------------------------------- the weight tree


@dataclass(frozen=True)
class Linear:
    """weight [out, in], bias [out] or None (PyTorch Linear layout)."""

    weight: Array
    bias: Array | None


@dataclass(frozen=True)
class Attention:
    """q [Hq*D, C], k/v [Hkv*D, C], o [C, Hq*D] projections."""

    q: Linear
    k: Linear
    v: Linear
    o: Linear


@dataclass(frozen=True)
class Mlp:
    """GELU-tanh MLP down(gelu(up x)) when gate is None (Mu fc1 = up, fc2 = down); else SwiGLU
    down(silu(gate x) * up x) (Llama)."""

    up: Linear
    down: Linear
    gate: Linear | None = None


@dataclass(frozen=True)
class Block:
    """A pre-norm transformer block; cross_norm / cross_attn only in the encoder-decoder's decoder."""

    attn_norm: Array
    attn: Attention
    mlp_norm: Array
    mlp: Mlp
    cross_norm: Array | None = None
    cross_attn: Attention | None = None


@dataclass(frozen=True)
class Weights:
    """Everything a forward pass reads. encoder_* are None for decoder-only models."""

    embed: Array  # [V, C]
    blocks: tuple[Block, ...]  # decoder (or decoder-only) blocks
    final_norm: Array  # [C]
    lm_head: Array  # [V, C] (the embedding itself when tied)
    encoder_blocks: tuple[Block, ...] | None = None
    encoder_norm: Array | None = None


def _map_arrays(tree: Any, fn: Callable[[np.ndarray], Any]) -> Any:
    """Apply fn to every array leaf of a weight tree (dataclasses, tuples, None kept)."""
    if dataclasses.is_dataclass(tree):
        return type(tree)(**{f.name: _map_arrays(getattr(tree, f.name), fn) for f in dataclasses.fields(tree)})
    if isinstance(tree, tuple):
        return tuple(_map_arrays(item, fn) for item in tree)
    return None if tree is None else fn(tree)


# ---------------------------------------------------------------- layouts: names and shapes, written once


def _kv_width(cfg: Config) -> int:
    return cfg.n_kv_head * cfg.resolved_head_dim


def _linear(take: Take, prefix: str, out: int, inp: int, bias: bool) -> Linear:
    return Linear(take(f"{prefix}.weight", (out, inp)), take(f"{prefix}.bias", (out,)) if bias else None)


def _mu_attention(take: Take, prefix: str, cfg: Config) -> Attention:
    c, q, kv = cfg.n_embd, cfg.qkv_width, _kv_width(cfg)
    return Attention(q=_linear(take, f"{prefix}.q_linear", q, c, True),
                     k=_linear(take, f"{prefix}.k_linear", kv, c, True),
                     v=_linear(take, f"{prefix}.v_linear", kv, c, True),
                     o=_linear(take, f"{prefix}.out_linear", c, q, True))


def _mu_mlp(take: Take, prefix: str, cfg: Config) -> Mlp:
    return Mlp(up=_linear(take, f"{prefix}.fc1", cfg.hidden_dim, cfg.n_embd, True),
               down=_linear(take, f"{prefix}.fc2", cfg.n_embd, cfg.hidden_dim, True))


def _mu_block(take: Take, prefix: str, cfg: Config, self_attn: str, cross: bool) -> Block:
    """Mu block: {prefix}.ln1, .{self_attn}, [.ln2, .cross_attn], .ln2 or .ln3, .mlp (in that order)."""
    def norm(k: int) -> np.ndarray:
        return take(f"{prefix}.ln{k}.weight", (cfg.n_embd,))

    return Block(attn_norm=norm(1), attn=_mu_attention(take, f"{prefix}.{self_attn}", cfg),
                 cross_norm=norm(2) if cross else None,
                 cross_attn=_mu_attention(take, f"{prefix}.cross_attn", cfg) if cross else None,
                 mlp_norm=norm(3 if cross else 2), mlp=_mu_mlp(take, f"{prefix}.mlp", cfg))


def _mu_encoder_decoder(take: Take, cfg: EncoderDecoderConfig) -> Weights:
    """Public Mu names: transformer.wte, transformer.e.{i}.*, transformer.ln_e, transformer.h.{i}.*, ln_f."""
    wte = take("transformer.wte.weight", (cfg.vocab_size, cfg.n_embd))
    encoder = tuple(_mu_block(take, f"transformer.e.{i}", cfg, "attn", cross=False)
                    for i in range(cfg.n_encoder_layer))
    ln_e = take("transformer.ln_e.weight", (cfg.n_embd,))
    decoder = tuple(_mu_block(take, f"transformer.h.{i}", cfg, "causal_attn", cross=True)
                    for i in range(cfg.n_decoder_layer))
    ln_f = take("transformer.ln_f.weight", (cfg.n_embd,))
    return Weights(embed=wte, blocks=decoder, final_norm=ln_f, lm_head=wte, encoder_blocks=encoder, encoder_norm=ln_e)


def _mu_decoder_only(take: Take, cfg: DecoderOnlyConfig) -> Weights:
    """Mu decoder blocks without cross-attention: transformer.h.{i}.{ln1, causal_attn, ln2, mlp}."""
    wte = take("transformer.wte.weight", (cfg.vocab_size, cfg.n_embd))
    blocks = tuple(_mu_block(take, f"transformer.h.{i}", cfg, "causal_attn", cross=False) for i in range(cfg.n_layer))
    ln_f = take("transformer.ln_f.weight", (cfg.n_embd,))
    head = wte if cfg.tie_word_embeddings else take("lm_head.weight", (cfg.vocab_size, cfg.n_embd))
    return Weights(embed=wte, blocks=blocks, final_norm=ln_f, lm_head=head)


def _split_rows(take: Take, name: str, sizes: tuple[int, ...], inp: int | None) -> list[np.ndarray]:
    """One fused tensor [sum(sizes), inp] (or [sum(sizes)] when inp is None) -> row blocks (views)."""
    fused = take(name, (sum(sizes),) if inp is None else (sum(sizes), inp))
    return np.split(fused, np.cumsum(sizes)[:-1])


def _llama_attention(take: Take, prefix: str, cfg: DecoderOnlyConfig) -> Attention:
    c, q, kv, bias = cfg.n_embd, cfg.qkv_width, _kv_width(cfg), cfg.attention_bias
    o = _linear(take, f"{prefix}.o_proj", c, q, bias)
    if cfg.layout == "llama":
        return Attention(q=_linear(take, f"{prefix}.q_proj", q, c, bias),
                         k=_linear(take, f"{prefix}.k_proj", kv, c, bias),
                         v=_linear(take, f"{prefix}.v_proj", kv, c, bias), o=o)
    weights = _split_rows(take, f"{prefix}.qkv_proj.weight", (q, kv, kv), c)  # Phi-3: [q | k | v]
    biases = _split_rows(take, f"{prefix}.qkv_proj.bias", (q, kv, kv), None) if bias else [None] * 3
    return Attention(*(Linear(w, b) for w, b in zip(weights, biases, strict=True)), o=o)


def _llama_mlp(take: Take, prefix: str, cfg: DecoderOnlyConfig) -> Mlp:
    c, f, bias = cfg.n_embd, cfg.hidden_dim, cfg.mlp_bias
    down = _linear(take, f"{prefix}.down_proj", c, f, bias)
    if cfg.layout == "llama":
        return Mlp(gate=_linear(take, f"{prefix}.gate_proj", f, c, bias),
                   up=_linear(take, f"{prefix}.up_proj", f, c, bias), down=down)
    weights = _split_rows(take, f"{prefix}.gate_up_proj.weight", (f, f), c)  # Phi-3: [gate | up]
    biases = _split_rows(take, f"{prefix}.gate_up_proj.bias", (f, f), None) if bias else [None] * 2
    return Mlp(gate=Linear(weights[0], biases[0]), up=Linear(weights[1], biases[1]), down=down)


def _llama(take: Take, cfg: DecoderOnlyConfig) -> Weights:
    """Hugging Face LlamaForCausalLM / Phi3ForCausalLM state-dict names."""
    c = cfg.n_embd
    embed = take("model.embed_tokens.weight", (cfg.vocab_size, c))
    blocks = tuple(
        Block(attn_norm=take(f"model.layers.{i}.input_layernorm.weight", (c,)),
              attn=_llama_attention(take, f"model.layers.{i}.self_attn", cfg),
              mlp_norm=take(f"model.layers.{i}.post_attention_layernorm.weight", (c,)),
              mlp=_llama_mlp(take, f"model.layers.{i}.mlp", cfg))
        for i in range(cfg.n_layer))
    norm = take("model.norm.weight", (c,))
    head = embed if cfg.tie_word_embeddings else take("lm_head.weight", (cfg.vocab_size, c))
    return Weights(embed=embed, blocks=blocks, final_norm=norm, lm_head=head)


def _layout(cfg: Config) -> Callable[[Take, Any], Weights]:
    if isinstance(cfg, EncoderDecoderConfig):
        return _mu_encoder_decoder
    if isinstance(cfg, DecoderOnlyConfig):
        return _mu_decoder_only if cfg.layout == "mu" else _llama
    raise TypeError(f"config must be an EncoderDecoderConfig or DecoderOnlyConfig, got {type(cfg).__name__}")


def param_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Canonical parameter names -> shapes, in a fixed order (the order `init` draws them in)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str, shape: tuple[int, ...]) -> np.ndarray:
        shapes[name] = shape
        return np.broadcast_to(np.empty((), np.float32), shape)  # a zero-byte stand-in, sliceable

    _layout(config)(record, config)
    return shapes


# ---------------------------------------------------------------- building a model


def _check_dtype(dtype: Any, backend: Backend) -> str:
    try:
        name = None if dtype is None else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in ("float32", "float64"):
        raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if name not in backend.dtypes:
        raise TypeError(f"backend {backend.name!r} supports dtypes {backend.dtypes}, not {name!r}")
    return name


def from_params(config: Config, params: dict[str, np.ndarray], dtype: str = "float32",
                backend: str | Backend = "numpy") -> Model:
    """A model from host arrays under the canonical names (see `param_shapes`), cast to dtype.

    Missing, unexpected and misshaped names are all listed in one ParameterError. A non-float
    parameter, or one that is not finite after the cast to dtype (NaN / inf, or a float64 value
    beyond the float32 range), is a ParameterError naming it.
    """
    be = get_backend(backend)
    dtype = _check_dtype(dtype, be)
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of parameter names to arrays, got {type(params).__name__}")
    expected = param_shapes(config)
    missing = [n for n in expected if n not in params]
    unexpected = sorted(n for n in params if n not in expected)
    misshaped = [f"{n}: expected {expected[n]}, got {tuple(np.shape(params[n]))}"
                 for n in expected if n in params and tuple(np.shape(params[n])) != expected[n]]
    groups = (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped))
    problems = [f"{label} ({len(items)}): {', '.join(items)}" for label, items in groups if items]
    if problems:
        raise ParameterError(f"parameters do not match {type(config).__name__}: " + "; ".join(problems))
    host = {}
    for name in expected:
        array = np.asarray(params[name])
        if array.dtype.kind != "f":
            raise ParameterError(f"parameter {name} must be a float array, got dtype {array.dtype}")
        with np.errstate(over="ignore"):  # reported below
            host[name] = np.ascontiguousarray(array, dtype=dtype)
        if not np.isfinite(host[name]).all():
            cause = ("holds NaN or inf" if not np.isfinite(array).all()
                     else f"overflows {dtype} (a value of magnitude {np.max(np.abs(array)):.3g})")
            raise ParameterError(f"parameter {name} {cause}; parameters must be finite")
    return Model(config, host, dtype, be)


def init(config: Config, seed: int = 0, dtype: str = "float32", backend: str | Backend = "numpy") -> Model:
    """A random model: numpy Generator(seed) draws every parameter in `param_shapes` order, in float64.

    Weights and biases ~ normal(0, 0.02); norm weights ~ 1 + normal(0, 0.1) (names ending in
    'norm.weight' or 'ln*.weight'), so every parameter path, biases included, affects the output.
    """
    rng = np.random.default_rng(ops.check_int("seed", seed, 0))
    params = {}
    for name, shape in param_shapes(config).items():
        draw = rng.standard_normal(shape)  # scaled in place: 330M float64 draws are large
        if _is_norm(name):
            draw *= INIT_NORM_STD
            draw += 1.0
        else:
            draw *= INIT_STD
        params[name] = draw
    return from_params(config, params, dtype=dtype, backend=backend)


def _is_norm(name: str) -> bool:
    leaf = name.rsplit(".", 2)[-2]
    return leaf.endswith("norm") or leaf.startswith("ln")


def check_ids(name: str, ids: Any, vocab_size: int) -> np.ndarray:
    """Token ids -> [B, T] int64; raises naming the argument unless ids is a non-empty 2-D int array in range."""
    try:
        ids = np.asarray(ids)
    except ValueError:  # ragged nested lists
        raise ValueError(f"{name} must be a rectangular [batch, time] array of token ids (rows of one length)") \
            from None
    if ids.dtype.kind in "iu" and (ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1):
        raise ValueError(f"{name} must have shape [batch >= 1, time >= 1], got {ids.shape}")
    return ops.check_token_ids(ids, vocab_size, name)


def leading_pads(ids: np.ndarray, pad_token_id: int | None, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """[B, T] ids -> [B] int64: how many padding tokens open each row (T for a row of padding only).

    Padding is attention_mask == 0 when a mask is given, else the pad id (none when pad_token_id is None).
    """
    if attention_mask is not None:
        real = np.asarray(attention_mask, dtype=bool)
    elif pad_token_id is None:
        return np.zeros(ids.shape[0], dtype=np.int64)
    else:
        real = ids != pad_token_id
    return np.where(real.any(axis=1), np.argmax(real, axis=1), ids.shape[1]).astype(np.int64)


def left_padding_positions(ids: np.ndarray, pad_token_id: int | None,
                           attention_mask: np.ndarray | None = None) -> np.ndarray:
    """[B, T] ids -> [B, T] int64 positions t - leading_pads(row), clamped at 0 (for the pads).

    A left-padded row then gets the positions it would have unpadded (what Hugging Face generate
    derives from the attention mask when the padding is on the left).
    """
    leading = leading_pads(ids, pad_token_id, attention_mask)
    return np.maximum(np.arange(ids.shape[1])[None, :] - leading[:, None], 0)


def rope_length(positions: np.ndarray) -> int:
    """Decoder positions [B or 1, T] -> L, the sequence length that dynamic NTK and longrope see:
    max position + 1 (Hugging Face's rule: T for the default 0..T-1, less when every row of a batch
    is left padded and positions are shifted by the padding)."""
    return int(np.max(positions)) + 1


# ---------------------------------------------------------------- the forward pass


def key_mask(ids: np.ndarray, pad_token_id: int | None, attention_mask: np.ndarray | None = None) -> np.ndarray | None:
    """[B, T] ids -> [B, T] bool, True for tokens attended as keys; None when every token is.

    attention_mask (checked by check_attention_mask) decides when given; otherwise the non-pad tokens
    are attended, and pad_token_id None (Hugging Face configs whose pad_token_id is null) masks nothing.
    """
    if attention_mask is not None:
        mask = attention_mask
    elif pad_token_id is None:
        return None
    else:
        mask = ids != pad_token_id
    return None if mask.all() else mask


def check_attention_mask(attention_mask: Any, ids_shape: tuple[int, int], name: str = "attention_mask",
                         left_padded: bool = False) -> np.ndarray | None:
    """attention_mask [B, T] of 0/1 (bool or int; 1 = a real token, 0 = padding) -> bool, or None if None.

    Raises ValueError naming the argument unless its shape is ids_shape, its dtype bool or integer (a float
    mask, even of 0.0 / 1.0, is refused by its dtype) and every value 0 or 1; left_padded also requires each
    row to be 0s then 1s (what cached generation's positions assume).
    """
    if attention_mask is None:
        return None
    mask = np.asarray(attention_mask)
    if mask.shape != tuple(ids_shape):
        raise ValueError(f"{name} must have the ids' shape {tuple(ids_shape)}, got {mask.shape}")
    if mask.dtype != bool and mask.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an array of bools or of integers 0 / 1, got dtype {mask.dtype} (the dtype "
                         "is refused, whatever the values)")
    if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1, got values {np.unique(mask)[:5]}")
    mask = mask.astype(bool)
    if left_padded and (np.diff(mask.astype(np.int8), axis=1) < 0).any():
        raise ValueError(f"{name} must mark left padding for cached generation: in every row 0s, then 1s")
    return mask


class Model:
    """A model: config, host params (canonical names, model dtype), backend weights and the forward pass.

    Attributes: config, params (dict name -> np.ndarray), dtype ('float32' | 'float64'), backend.
    """

    def __init__(self, config: Config, params: dict[str, np.ndarray], dtype: str, backend: Backend):
        self.config = config
        self.params = params
        self.dtype = dtype
        self.backend = backend
        self.is_encoder_decoder = isinstance(config, EncoderDecoderConfig)
        self.weights: Weights = _map_arrays(_layout(config)(lambda name, shape: params[name], config), backend.weight)

    def __repr__(self) -> str:
        return f"Model({type(self.config).__name__}, dtype={self.dtype}, backend={self.backend.name})"

    # ---- RoPE
    def rope(self, positions: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """positions [T] or [B, T] -> cos, sin [1 or B, T, D] float64 for a sequence of seq_len tokens.

        rope_type 'dynamic' with rope_factor > 1: NTK base from ops.rope_theta_for_length(seq_len);
        'linear': positions / rope_factor; 'longrope': inv_freq divided by the long factors when
        seq_len > rope_original_max_position (else the short ones), cos and sin times the attention
        factor (rope_attention_factor, or ops.longrope_attention_factor(block_size / original max));
        'default': none of these.
        """
        cfg = self.config
        theta, uses_long = self.rope_key(seq_len)
        linear_factor = cfg.rope_factor if cfg.rope_type == "linear" else 1.0
        ext_factors, scale = None, 1.0
        if cfg.rope_type == "longrope":
            ext_factors = cfg.rope_long_factor if uses_long else cfg.rope_short_factor
            scale = cfg.rope_attention_factor
            if scale is None:
                original = cfg.rope_original_max_position
                scale = ops.longrope_attention_factor(cfg.block_size / original, original)
        positions = np.atleast_2d(positions)
        return ops.rope_cos_sin(positions, cfg.resolved_head_dim, theta, cfg.rope_layout, linear_factor,
                                ext_factors, scale)

    def rope_base(self, seq_len: int) -> float:
        """The RoPE theta used for a sequence of seq_len tokens (changes with seq_len only under dynamic NTK)."""
        cfg = self.config
        if cfg.rope_type != "dynamic":
            return cfg.rope_theta
        return ops.rope_theta_for_length(cfg.rope_theta, cfg.resolved_head_dim, seq_len, cfg.rope_factor,
                                         cfg.block_size)

    def rope_key(self, seq_len: int) -> tuple[float, bool]:
        """What the RoPE tables of a seq_len-token sequence depend on besides the positions:
        (rope_base(seq_len), whether longrope uses its long factors). Cached keys stay valid while it holds."""
        cfg = self.config
        uses_long = cfg.rope_type == "longrope" and seq_len > cfg.rope_original_max_position
        return self.rope_base(seq_len), uses_long

    # ---- pieces
    def embed(self, ids: np.ndarray) -> Array:
        """[B, T] int64 -> [B, T, C]."""
        return self.backend.embedding(ids, self.weights.embed)

    def head(self, x: Array) -> np.ndarray:
        """[B, T, C] -> [B, T, V] host logits: final norm, then the (tied or untied) lm_head."""
        be = self.backend
        h = be.rmsnorm(x, self.weights.final_norm, self.config.norm_eps)
        return be.to_numpy(be.linear(h, self.weights.lm_head))

    def project(self, linear: Linear, x: Array, n_head: int) -> Array:
        """[B, T, C] -> heads [B, n_head, T, D] of the projection x W^T + b."""
        be = self.backend
        return be.split_heads(be.linear(x, linear.weight, linear.bias), n_head)

    def attend(self, attn: Attention, q: Array, k: Array, v: Array, *, mask: np.ndarray | None, causal: bool,
               q_start: int = 0, residual: Array, segment_ids: np.ndarray | None = None) -> Array:
        """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] -> residual + out(attention) [B, Tq, C]: attention (key mask,
        causal, segment_ids [B, Tk]: see ops.attention), then the out projection with the residual
        [B, Tq, C] added (Backend.linear)."""
        be, cfg = self.backend, self.config
        y = be.attention(q, k, v, key_mask=mask, causal=causal, q_start=q_start, interleaved=cfg.is_interleaved,
                         mask_fill=cfg.mask_fill, segment_ids=segment_ids)
        return be.linear(be.merge_heads(y), attn.o.weight, attn.o.bias, residual)

    def mlp(self, mlp: Mlp, x: Array, residual: Array) -> Array:
        """[B, T, C] -> residual + mlp(x) [B, T, C]: GELU-tanh MLP (Mu) or SwiGLU (Llama)."""
        be = self.backend
        if mlp.gate is None:
            hidden = be.linear(x, mlp.up.weight, mlp.up.bias, activation="gelu_tanh")
        else:
            up = be.linear(x, mlp.up.weight, mlp.up.bias)
            hidden = be.gated(be.linear(x, mlp.gate.weight, mlp.gate.bias), up, "silu")
        return be.linear(hidden, mlp.down.weight, mlp.down.bias, residual)

    def block(self, block: Block, x: Array, *, rope: tuple, mask: np.ndarray | None, causal: bool, start: int = 0,
              cache: Any = None, cross: tuple | None = None, segment_ids: np.ndarray | None = None) -> Array:
        """One pre-norm block: x [B, T, C] -> [B, T, C].

        Self-attention over x (RoPE from rope, key mask [B, start+T], causal when asked). With a
        cache (an object with update(q, k, v, start, rope) -> (rotated q, k_all, v_all), see
        refslm.generate.KVCache) the new keys (rotated) and values are stored at times start.. and
        attention reads the whole prefix. cross = (k, v, mask) of the encoder output adds
        cross-attention (no RoPE) after self-attention.
        segment_ids [B, start+T] restricts self-attention to tokens of the same segment (packed rows).
        Each sub-layer's output projection adds the residual stream: x = x + sublayer(norm(x)).
        """
        be, cfg = self.backend, self.config
        h = be.rmsnorm(x, block.attn_norm, cfg.norm_eps)
        q, k, v = (self.project(linear, h, n) for linear, n in
                   ((block.attn.q, cfg.n_head), (block.attn.k, cfg.n_kv_head), (block.attn.v, cfg.n_kv_head)))
        if cache is None:
            q, k = be.rope(q, *rope, cfg.rope_layout), be.rope(k, *rope, cfg.rope_layout)
        else:
            q, k, v = cache.update(q, k, v, start, rope)
        x = self.attend(block.attn, q, k, v, mask=mask, causal=causal, q_start=start, residual=x,
                        segment_ids=segment_ids)
        if cross is not None:
            cross_k, cross_v, cross_mask = cross
            q = self.project(block.cross_attn.q, be.rmsnorm(x, block.cross_norm, cfg.norm_eps), cfg.n_head)
            x = self.attend(block.cross_attn, q, cross_k, cross_v, mask=cross_mask, causal=False, residual=x)
        return self.mlp(block.mlp, be.rmsnorm(x, block.mlp_norm, cfg.norm_eps), residual=x)

    # ---- encoder-decoder
    def encode(self, input_ids: np.ndarray, *, centred_positions: bool = True, attention_mask: Any = None) -> Array:
        """Encoder: [B, Te] ids -> [B, Te, C] = ln_e(blocks(embed(ids))), bidirectional, pad keys masked.

        Positions are p - (Te-1)//2 (public Mu) or, with centred_positions=False, p; the NTK base uses Te.
        attention_mask [B, Te] 0/1, when given, says which tokens are keys instead of the pad ids.
        """
        self._require(True)
        cfg = self.config
        ids = check_ids("input_ids", input_ids, cfg.vocab_size)
        te = ids.shape[1]
        centred = ops.check_bool("centred_positions", centred_positions)
        positions = ops.centred_positions(te) if centred else np.arange(te)
        mask = key_mask(ids, cfg.pad_token_id, check_attention_mask(attention_mask, ids.shape))
        rope = self.rope(positions, te)
        x = self.embed(ids)
        for block in self.weights.encoder_blocks:
            x = self.block(block, x, rope=rope, mask=mask, causal=False)
        return self.backend.rmsnorm(x, self.weights.encoder_norm, cfg.norm_eps)

    def cross_kv(self, encoded: Array, input_ids: np.ndarray,
                 attention_mask: Any = None) -> list[tuple[Array, Array, np.ndarray | None]]:
        """Per decoder block (k, v, mask) of cross-attention over the encoder output [B, Te, C]; computed once.

        The mask: attention_mask [B, Te] 0/1 when given, else the non-pad tokens of input_ids [B, Te]."""
        ids = check_ids("input_ids", input_ids, self.config.vocab_size)
        if ids.shape[0] != encoded.shape[0] or ids.shape[1] != encoded.shape[1]:
            raise ValueError(f"input_ids {ids.shape} must match the encoder output's [B, Te] = {encoded.shape[:2]}")
        mask = key_mask(ids, self.config.pad_token_id, check_attention_mask(attention_mask, ids.shape))
        n = self.config.n_kv_head
        return [(self.project(block.cross_attn.k, encoded, n), self.project(block.cross_attn.v, encoded, n), mask)
                for block in self.weights.blocks]

    # ---- decoder (both kinds)
    def decode(self, ids: np.ndarray, *, positions: np.ndarray | None = None, mask_ids: np.ndarray | None = None,
               attention_mask: Any = None, start: int = 0, caches: list | None = None, cross: list | None = None,
               last_only: bool = False, segment_ids: np.ndarray | None = None) -> np.ndarray:
        """Causal stack over new tokens ids [B, T] at times start..start+T-1 -> logits [B, T or 1, V].

        positions [B or 1, T] (default start..start+T-1); mask_ids [B, start+T] = every token so far
        (default ids, so required when start > 0), whose pads are masked as keys, unless attention_mask
        [B, start+T] 0/1 says which tokens are keys; caches: one KVCache per block (required when
        start > 0); cross: cross_kv(...) for the encoder-decoder; segment_ids [B, start+T] int: each
        token attends only to tokens of its own segment (packed rows). The RoPE tables use
        L = rope_length(positions) (= start+T by default).
        """
        cfg = self.config
        t = ids.shape[1]
        if start > 0 and mask_ids is None and attention_mask is None:
            raise ValueError(f"decode at start={start} needs mask_ids or attention_mask [B, start+T] (every token "
                             "so far): ids holds only the new tokens")
        if positions is None:
            positions = np.arange(start, start + t)
        mask = key_mask(ids if mask_ids is None else mask_ids, cfg.pad_token_id,
                        check_attention_mask(attention_mask, (ids.shape[0], start + t)))
        rope = self.rope(positions, rope_length(positions))
        x = self.embed(ids)
        for i, block in enumerate(self.weights.blocks):
            x = self.block(block, x, rope=rope, mask=mask, causal=True, start=start, segment_ids=segment_ids,
                           cache=None if caches is None else caches[i], cross=None if cross is None else cross[i])
        if last_only:
            x = self.backend.time_slice(x, t - 1, t)  # [B, 1, C]
        return self.head(x)

    # ---- public API
    def logits(self, input_ids: Any, decoder_input_ids: Any = None, *, position_ids: Any = None,
               attention_mask: Any = None, centred_positions: bool = True, segment_ids: Any = None) -> np.ndarray:
        """Logits [B, T, V] (model dtype) without any cache.

        Encoder-decoder: input_ids [B, Te] go to the encoder, decoder_input_ids [B, Td] (required) to
        the decoder; T = Td. Decoder-only: input_ids [B, T] only; position_ids [B or 1, T] optional
        (default 0..T-1; see left_padding_positions for left-padded batches). attention_mask [B, Te]
        or [B, T] of 0/1 (Hugging Face's; 0 = padding), when given, replaces the pad-id rule for
        input_ids: exactly its 1s are attended as keys (a pad id marked 1 is a real token).
        segment_ids [B, T] int (decoder-only): packed rows, each token attends only to earlier tokens
        of its own segment (block-diagonal causal attention); pair it with position_ids restarting at 0
        in every segment (refslm.align.TeacherBatch.position_ids) to score each sequence as if alone.
        """
        cfg = self.config
        if self.is_encoder_decoder:
            if decoder_input_ids is None:
                raise ValueError("the encoder-decoder needs decoder_input_ids [B, Td]")
            if position_ids is not None or segment_ids is not None:
                raise ValueError("position_ids and segment_ids are for decoder-only models (decoder positions "
                                 "are 0..Td-1)")
            dec = check_ids("decoder_input_ids", decoder_input_ids, cfg.vocab_size)
            ids = check_ids("input_ids", input_ids, cfg.vocab_size)
            if dec.shape[0] != ids.shape[0]:
                raise ValueError(f"decoder_input_ids batch {dec.shape[0]} != input_ids batch {ids.shape[0]}")
            encoded = self.encode(ids, centred_positions=centred_positions, attention_mask=attention_mask)
            return self.decode(dec, cross=self.cross_kv(encoded, ids, attention_mask))
        if decoder_input_ids is not None:
            raise ValueError("decoder-only models take input_ids only, not decoder_input_ids")
        ids = check_ids("input_ids", input_ids, cfg.vocab_size)
        return self.decode(ids, positions=None if position_ids is None else check_positions(position_ids, ids.shape),
                           attention_mask=attention_mask,
                           segment_ids=ops.check_segment_ids(segment_ids, *ids.shape, ids.shape[1], 0))

    def generate(self, input_ids: Any, max_new_tokens: int, *, greedy: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 eos_token_id: int | None = None, attention_mask: Any = None) -> np.ndarray:
        """New tokens [B, max_new_tokens] int64 (no BOS); see refslm.generate.generate."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, greedy=greedy, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, eos_token_id=eos_token_id, attention_mask=attention_mask)

    def _require(self, encoder_decoder: bool) -> None:
        if self.is_encoder_decoder != encoder_decoder:
            raise TypeError(f"this method needs an {'encoder-decoder' if encoder_decoder else 'decoder-only'} model")


def check_positions(position_ids: Any, ids_shape: tuple[int, int]) -> np.ndarray:
    """position_ids -> [B or 1, T] int64; raises unless integer, non-negative and shaped like the ids."""
    pos = np.asarray(position_ids)
    if pos.dtype.kind not in "iu":
        raise TypeError(f"position_ids must be an integer array, got dtype {pos.dtype}")
    pos = np.atleast_2d(pos)
    if pos.ndim != 2 or pos.shape[1] != ids_shape[1] or pos.shape[0] not in (1, ids_shape[0]):
        raise ValueError(f"position_ids must have shape [{ids_shape[0]} or 1, {ids_shape[1]}], got {pos.shape}")
    if pos.min() < 0:
        raise ValueError("position_ids must be >= 0")
    return pos.astype(np.int64, copy=False)

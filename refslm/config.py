"""Model configurations: the paper's encoder-decoder ("Mu") and the decoder-only layouts.

Field names follow the public Mu code (n_encoder_layer, n_embd, qkv_embd, ...). The Llama / Phi-3
layouts reuse the same fields; `refslm.weights.config_from_hf` maps Hugging Face config.json names onto them.
SPEC.md section "Configurations" is the normative description.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ROPE_TYPES = ("default", "linear", "dynamic", "longrope")
MASK_FILLS = ("finite_min", "-inf")
ROPE_LAYOUTS = ("rotate_half", "interleaved")
DO_LAYOUTS = ("mu", "llama", "phi3")


class ConfigError(ValueError):
    """A configuration value is out of range or contradicts another one."""


def is_int(value: Any) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real number, Python or NumPy (int or float), not a bool (the predicate every numeric check uses)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A finite real number; bool and str are not numbers here, nor an int beyond float range."""
    if not is_real(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_positive_int(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not is_int(value) or value <= 0:
            raise ConfigError(f"{type(cfg).__name__}.{name} must be a positive int, got {value!r}")


def _check_bool(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, bool):
            raise ConfigError(f"{type(cfg).__name__}.{name} must be True or False, got {value!r}")


def _check_number(cfg: Any, name: str, low: int, *, inclusive: bool = False, optional: bool = False) -> None:
    """cfg.name must be a finite number > low (>= low if inclusive), or None if optional; stored as float."""
    value = getattr(cfg, name)
    if value is None and optional:
        return
    if not is_finite_number(value) or not (value >= low if inclusive else value > low):
        expected = f"a finite number {'>=' if inclusive else '>'} {low}{' or None' if optional else ''}"
        raise ConfigError(f"{type(cfg).__name__}.{name} must be {expected}, got {value!r}")
    setattr(cfg, name, float(value))


@dataclass
class _AttentionFields:
    """Fields shared by every layout (attention, RoPE, vocabulary, numerics)."""

    n_embd: int = 1024
    qkv_embd: int | None = 384  # width of q/k/v/out projections; None means n_embd
    hidden_dim: int = 4096
    n_head: int = 6
    n_kv_head: int = 3
    head_dim: int | None = None  # None means qkv_width // n_head
    # GQA order: False = query head h uses kv head h % n_kv_head (public Mu text code), True = kv head
    # h // (n_head / n_kv_head) (Llama, Phi-3, Mu v2). None: False for Mu models, True for llama/phi3.
    is_interleaved: bool | None = None
    block_size: int = 1024
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    rope_type: str = "dynamic"  # dynamic (Mu NTK, only when rope_factor > 1) | linear | default | longrope
    # longrope (Phi-3 / Phi-3.5) only: per-frequency factors [D/2] for sequences of at most / more than
    # rope_original_max_position tokens, and the cos/sin scale (None: derived from block_size, SPEC 2.3)
    rope_short_factor: tuple[float, ...] | None = None
    rope_long_factor: tuple[float, ...] | None = None
    rope_original_max_position: int | None = None
    rope_attention_factor: float | None = None
    rope_layout: str = "rotate_half"  # rotate_half | interleaved (pairs (2i, 2i+1))
    pad_token_id: int | None = 0  # None: no id is padding, no key is masked (HF configs with pad null)
    bos_token_id: int = 1
    eos_token_id: int = 32000
    vocab_size: int = 32128
    norm_eps: float = 1e-6
    mask_fill: str = "finite_min"  # finite_min (public Mu text code) | -inf (Mu v2, Llama)

    @property
    def qkv_width(self) -> int:
        """Width of the query projection output: n_head * head_dim."""
        return self.n_head * self.resolved_head_dim

    @property
    def resolved_head_dim(self) -> int:
        if self.head_dim is not None:
            return self.head_dim
        width = self.qkv_embd if self.qkv_embd is not None else self.n_embd
        return width // self.n_head

    def _validate_common(self) -> None:
        _check_positive_int(self, "n_embd", "hidden_dim", "n_head", "n_kv_head", "block_size", "vocab_size")
        if self.qkv_embd is not None:
            _check_positive_int(self, "qkv_embd")
        if self.head_dim is None:
            width = self.qkv_embd if self.qkv_embd is not None else self.n_embd
            if width % self.n_head:
                raise ConfigError(
                    f"qkv width {width} (qkv_embd or n_embd) must be divisible by n_head={self.n_head}"
                )
        else:
            _check_positive_int(self, "head_dim")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        if self.resolved_head_dim % 2:
            raise ConfigError(f"head_dim={self.resolved_head_dim} must be even for RoPE")
        _check_bool(self, "is_interleaved")
        _check_number(self, "rope_theta", 0)
        _check_number(self, "rope_factor", 1, inclusive=True)
        _check_number(self, "norm_eps", 0)
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ConfigError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {self.rope_layout!r}")
        self._validate_dynamic_ntk()
        self._validate_longrope()
        if self.mask_fill not in MASK_FILLS:
            raise ConfigError(f"mask_fill must be one of {MASK_FILLS}, got {self.mask_fill!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is None and name == "pad_token_id":
                continue
            if not is_int(value) or not 0 <= value < self.vocab_size:
                none = " or None" if name == "pad_token_id" else ""
                raise ConfigError(f"{type(self).__name__}.{name} must be an int in [0, vocab_size="
                                  f"{self.vocab_size}){none}, got {value!r}")

    def _validate_dynamic_ntk(self) -> None:
        """Dynamic NTK (ops.rope_theta_for_length) scales theta by (factor L / block_size - (factor - 1))^(D / (D - 2)):
        defined for D > 2, and exactly theta at L = block_size in float64 only while factor - 1 is exact
        (factor < 2^53; beyond, the base collapses to 0 or 2)."""
        if self.rope_type != "dynamic" or self.rope_factor <= 1.0:
            return
        if self.resolved_head_dim <= 2:
            raise ConfigError(f"rope_type 'dynamic' with rope_factor > 1 needs head_dim > 2 (the NTK base exponent is "
                              f"D / (D - 2)), got head_dim={self.resolved_head_dim}")
        if self.rope_factor >= 2.0**53:
            raise ConfigError(f"rope_factor must be < 2^53 for rope_type 'dynamic' (the NTK base cancels to 0 or 2 in "
                              f"float64 beyond), got {self.rope_factor!r}")

    def _validate_longrope(self) -> None:
        """longrope needs both factor vectors (lists, tuples or 1-D arrays of D/2 finite numbers > 0,
        stored as float tuples) and rope_original_max_position (>= 2 when the attention factor is
        derived from block_size / rope_original_max_position > 1: its formula divides by the log of
        it); the other RoPE types must leave the longrope fields None."""
        names = ("rope_short_factor", "rope_long_factor", "rope_original_max_position")
        if self.rope_type != "longrope":
            set_fields = [n for n in (*names, "rope_attention_factor") if getattr(self, n) is not None]
            if set_fields:
                raise ConfigError(f"{set_fields} are only used by rope_type 'longrope', got {self.rope_type!r}")
            return
        if self.rope_factor != 1.0:
            raise ConfigError(f"rope_factor is not used by rope_type 'longrope' (must be 1), got {self.rope_factor}")
        half = self.resolved_head_dim // 2
        for name in names[:2]:
            value = getattr(self, name)
            items = value.tolist() if isinstance(value, np.ndarray) else value
            if not isinstance(items, list | tuple):  # a str is no sequence of factors
                raise ConfigError(f"{name} must be a sequence of {half} numbers (list or tuple), got {value!r}")
            if len(items) != half or not all(is_finite_number(v) and v > 0 for v in items):
                raise ConfigError(f"{name} must hold head_dim/2 = {half} finite numbers > 0, got {value!r}")
            setattr(self, name, tuple(float(v) for v in items))
        _check_positive_int(self, "rope_original_max_position")
        _check_number(self, "rope_attention_factor", 0, optional=True)
        if self.rope_attention_factor is None and self.rope_original_max_position == 1 and self.block_size > 1:
            raise ConfigError(f"rope_original_max_position=1 < block_size={self.block_size} leaves the derived "
                              "rope_attention_factor sqrt(1 + log(block_size / original) / log(original)) undefined; "
                              "set rope_attention_factor, or rope_original_max_position >= 2")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, ignore_unknown: bool = True):
        """Build from a dict; unknown keys (e.g. training-only `dropout`) are ignored unless asked."""
        fields = dataclasses.fields(cls)
        unknown = sorted(set(data) - {f.name for f in fields})
        if unknown and not ignore_unknown:
            raise ConfigError(f"unknown {cls.__name__} fields: {unknown}")
        settable = {f.name for f in fields if f.init}  # `kind` is derived, not set
        config = cls(**{k: v for k, v in data.items() if k in settable})
        if data.get("kind", config.kind) != config.kind:
            raise ConfigError(f"{cls.__name__}.from_dict: the data is for kind {data['kind']!r}, not {config.kind!r}")
        return config


@dataclass
class EncoderDecoderConfig(_AttentionFields):
    """The paper's encoder-decoder (public Mu text model). Defaults are the 330M preset."""

    n_encoder_layer: int = 20
    n_decoder_layer: int = 10
    kind: str = field(default="encoder_decoder", init=False)

    def __post_init__(self) -> None:
        if self.is_interleaved is None:
            self.is_interleaved = False
        self._validate_common()
        _check_positive_int(self, "n_encoder_layer", "n_decoder_layer")


@dataclass
class DecoderOnlyConfig(_AttentionFields):
    """Decoder-only models.

    layout "mu": the paper's matched baseline, built from the Mu decoder block without cross
    attention (biases, GELU-tanh MLP, tied head). layout "llama": Hugging Face Llama (SwiGLU, no
    biases unless attention_bias/mlp_bias). layout "phi3": Llama numerics with Phi-3's fused
    qkv_proj and gate_up_proj tensors in the checkpoint.
    """

    n_layer: int = 30
    layout: str = "mu"
    attention_bias: bool | None = None  # None: True for "mu", False otherwise
    mlp_bias: bool | None = None
    tie_word_embeddings: bool = True
    kind: str = field(default="decoder_only", init=False)

    def __post_init__(self) -> None:
        if self.layout not in DO_LAYOUTS:
            raise ConfigError(f"layout must be one of {DO_LAYOUTS}, got {self.layout!r}")
        if self.is_interleaved is None:
            self.is_interleaved = self.layout != "mu"
        if self.attention_bias is None:
            self.attention_bias = self.layout == "mu"
        if self.mlp_bias is None:
            self.mlp_bias = self.layout == "mu"
        _check_bool(self, "attention_bias", "mlp_bias", "tie_word_embeddings")
        self._validate_common()
        _check_positive_int(self, "n_layer")

    @property
    def mlp_kind(self) -> str:
        """'gelu_tanh' (Mu: fc1 -> gelu -> fc2) or 'swiglu' (Llama: down(silu(gate) * up))."""
        return "gelu_tanh" if self.layout == "mu" else "swiglu"


def paper_330m() -> EncoderDecoderConfig:
    """The paper's 330M text model (20 encoder + 10 decoder layers, width 1024, GQA 6/3)."""
    return EncoderDecoderConfig()


def paper_330m_decoder_only() -> DecoderOnlyConfig:
    """The decoder-only baseline of paper_330m: 31 Mu blocks without cross-attention, same fields.

    31 blocks hold 329,793,792 parameters against the encoder-decoder's 332,042,240 (-0.7%; 32
    would be +2.2%): the closest count, as refslm.bench.paper.matched_decoder_only computes it
    from refslm.flops.param_counts (a test checks that they agree).
    """
    base = paper_330m()
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(_AttentionFields)}
    return DecoderOnlyConfig(**fields, n_layer=31, layout="mu")


def tiny_encoder_decoder(**overrides: Any) -> EncoderDecoderConfig:
    """A small configuration with every code path on (GQA, qkv_embd != n_embd), for tests."""
    values: dict[str, Any] = dict(
        n_encoder_layer=2, n_decoder_layer=1, n_embd=64, qkv_embd=48, hidden_dim=128, n_head=6,
        n_kv_head=2, vocab_size=512, eos_token_id=2, block_size=32,
    )
    values.update(overrides)
    return EncoderDecoderConfig(**values)


def tiny_decoder_only(**overrides: Any) -> DecoderOnlyConfig:
    """A small decoder-only configuration for tests (layout 'mu' unless overridden)."""
    values: dict[str, Any] = dict(
        n_layer=2, n_embd=64, qkv_embd=48, hidden_dim=128, n_head=6, n_kv_head=2, vocab_size=512,
        eos_token_id=2, block_size=32,
    )
    values.update(overrides)
    return DecoderOnlyConfig(**values)


PRESETS = {
    "paper-330m": paper_330m,
    "paper-330m-decoder-only": paper_330m_decoder_only,
    "tiny": tiny_encoder_decoder,
    "tiny-decoder-only": tiny_decoder_only,
}

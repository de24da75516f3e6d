"""longrope RoPE (Phi-3 / Phi-3.5): ops by hand, models against Hugging Face Phi3 in float64, cached
decoding across the short -> long switch, checkpoints, bad configs (SPEC 2.3, 4.1, 5.5)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from refslm import models, ops
from refslm.config import ConfigError, tiny_decoder_only
from refslm.generate import CachedDecoder
from refslm.weights import CheckpointError, config_from_dict, load, save

HALF = 8  # head_dim 16 = n_embd 64 / n_head 4 (Phi-3 derives head_dim)
RNG = np.random.default_rng(2024)
SHORT = tuple(RNG.uniform(0.8, 1.5, HALF))
LONG = tuple(RNG.uniform(1.5, 6.0, HALF))
ORIGINAL = 16
LONGROPE = dict(rope_type="longrope", rope_short_factor=SHORT, rope_long_factor=LONG,
                rope_original_max_position=ORIGINAL)


def phi3_longrope(**overrides):
    """A tiny Phi-3 whose longrope switches to the long factors past 16 tokens (max positions 64)."""
    values = dict(layout="phi3", qkv_embd=None, n_head=4, n_kv_head=2, is_interleaved=True, block_size=64,
                  tie_word_embeddings=False, mask_fill="-inf", rope_theta=10000.0, **LONGROPE)
    values.update(overrides)
    return tiny_decoder_only(**values)


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ---------------------------------------------------------------- ops, by hand


def test_inv_freq_divides_by_the_factors():
    # D = 4, theta = 100: theta^(-0/4) = 1, theta^(-2/4) = 0.1
    np.testing.assert_allclose(ops.rope_inv_freq(4, 100.0, np.array([2.0, 4.0])), [0.5, 0.025], rtol=1e-15)
    np.testing.assert_array_equal(ops.rope_inv_freq(4, 100.0, None), ops.rope_inv_freq(4, 100.0))
    with pytest.raises(ValueError, match=r"ext_factors must have shape \(2,\)"):
        ops.rope_inv_freq(4, 100.0, np.ones(3))


def test_cos_sin_with_factors_and_scale():
    cos, sin = ops.rope_cos_sin(np.array([[3]]), 4, 100.0, ext_factors=np.array([2.0, 4.0]), scale=1.5)
    angles = [3 * 0.5, 3 * 0.025, 3 * 0.5, 3 * 0.025]
    np.testing.assert_allclose(cos[0, 0], 1.5 * np.cos(angles), rtol=1e-14)
    np.testing.assert_allclose(sin[0, 0], 1.5 * np.sin(angles), rtol=1e-14)


def test_attention_factor_by_hand():
    # log 32 / log 4096 = 5 / 12 (Phi-3.5-mini: 131072 / 4096); log 4 / log 16 = 1 / 2
    assert ops.longrope_attention_factor(32.0, 4096) == pytest.approx(math.sqrt(17 / 12), rel=1e-15)
    assert ops.longrope_attention_factor(4.0, 16) == pytest.approx(math.sqrt(1.5), rel=1e-15)
    assert ops.longrope_attention_factor(1.0, 16) == 1.0
    assert ops.longrope_attention_factor(0.5, 16) == 1.0


def test_model_switches_factors_past_the_original_length():
    model = models.init(phi3_longrope(), seed=1, dtype="float64")
    d, theta = 16, 10000.0
    base = theta ** (-np.arange(0, d, 2) / d)
    for seq_len, factors in ((ORIGINAL, SHORT), (ORIGINAL + 1, LONG)):
        cos, sin = model.rope(np.array([5]), seq_len)
        angles = 5 * base / np.array(factors)
        np.testing.assert_allclose(cos[0, 0, :HALF], math.sqrt(1.5) * np.cos(angles), rtol=1e-13)
        np.testing.assert_allclose(sin[0, 0, HALF:], math.sqrt(1.5) * np.sin(angles), rtol=1e-13)
    assert model.rope_key(ORIGINAL) != model.rope_key(ORIGINAL + 1)
    explicit = models.init(phi3_longrope(rope_attention_factor=0.75), seed=1, dtype="float64")
    np.testing.assert_allclose(explicit.rope(np.array([0]), 4)[0], 0.75, rtol=1e-15)


# ---------------------------------------------------------------- against Hugging Face Phi3


def hf_phi3_longrope(transformers, cfg):
    return transformers.Phi3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False, pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, max_position_embeddings=cfg.block_size,
        original_max_position_embeddings=ORIGINAL,
        rope_parameters={"rope_type": "longrope", "rope_theta": cfg.rope_theta, "short_factor": list(SHORT),
                         "long_factor": list(LONG), "original_max_position_embeddings": ORIGINAL})


@pytest.mark.parametrize("length,uses_long", [(10, False), (ORIGINAL, False), (ORIGINAL + 1, True), (40, True)])
def test_matches_hugging_face_phi3(length, uses_long):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = phi3_longrope()
    model = models.init(cfg, seed=7, dtype="float64")
    hf = transformers.Phi3ForCausalLM(hf_phi3_longrope(transformers, cfg)).to(torch.float64).eval()
    hf.load_state_dict({n: torch.from_numpy(a) for n, a in model.params.items()}, strict=True)
    rotary = hf.model.rotary_emb
    hf_forward = rotary.forward  # picks the factors by max(position_ids) + 1, computes in float32
    d = cfg.resolved_head_dim
    powers = cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    chosen = []

    def rope_float64(x, position_ids):
        cos32, sin32 = hf_forward(x, position_ids)
        hf_inv_freq = rotary.inv_freq.double()
        long_ = torch.allclose(hf_inv_freq, 1.0 / (torch.tensor(LONG, dtype=torch.float64) * powers), rtol=1e-6)
        chosen.append(long_)
        inv_freq = 1.0 / (torch.tensor(LONG if long_ else SHORT, dtype=torch.float64) * powers)
        torch.testing.assert_close(hf_inv_freq, inv_freq, rtol=1e-6, atol=0)
        emb = (position_ids[..., None].double() * inv_freq).repeat(1, 1, 2)
        cos, sin = emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling
        torch.testing.assert_close(cos32.double(), cos, rtol=0, atol=1e-4)
        return cos, sin

    def rmsnorm_float64(module):  # HF normalises in float32 even for float64 models
        return lambda x: module.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)

    rotary.forward = rope_float64
    for module in hf.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = rmsnorm_float64(module)
    ids = np.random.default_rng(length).integers(3, cfg.vocab_size, (2, length))  # no pad id
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids)).logits.numpy()
    assert chosen == [uses_long]
    assert rotary.attention_scaling == pytest.approx(math.sqrt(1 + math.log(64 / 16) / math.log(16)), rel=1e-15)
    assert rel_err(model.logits(ids), expected) < 1e-12


# ---------------------------------------------------------------- cached decoding across the switch


def test_cached_decoding_is_exact_across_the_switch():
    model = models.init(phi3_longrope(), seed=3, dtype="float64")
    pad = model.config.pad_token_id
    prompt = np.random.default_rng(4).integers(3, 512, (2, 12))
    prompt[1, :3] = pad  # row 1 left padded
    steps = 10  # lengths 12 .. 22: crosses the original length 16
    decoder = CachedDecoder(model, prompt, steps)
    ids = prompt
    rng = np.random.default_rng(5)
    keys = set()
    for _ in range(steps + 1):
        positions = models.left_padding_positions(ids, pad)
        expected = model.logits(ids, position_ids=positions)[:, -1]
        assert rel_err(decoder.logits, expected) < 1e-12
        keys.add(model.rope_key(ids.shape[1]))
        if ids.shape[1] == prompt.shape[1] + steps:
            break
        tokens = rng.integers(3, 512, 2)
        decoder.step(tokens)
        ids = np.concatenate([ids, tokens[:, None]], axis=1)
    assert len(keys) == 2  # both the short and the long factors were used


# ---------------------------------------------------------------- checkpoints


def test_save_load_round_trip(tmp_path):
    model = models.init(phi3_longrope(rope_attention_factor=1.25), seed=2, dtype="float64")
    save(model, tmp_path)
    loaded = load(tmp_path, dtype="float64")
    assert loaded.config == model.config
    ids = np.arange(3, 23)[None]
    np.testing.assert_array_equal(loaded.logits(ids), model.logits(ids))


def test_saved_config_reads_back_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    save(models.init(phi3_longrope(), seed=2, dtype="float32"), tmp_path)
    rope = transformers.Phi3Config.from_pretrained(tmp_path).rope_parameters
    assert rope["rope_type"] == "longrope" and rope["original_max_position_embeddings"] == ORIGINAL
    np.testing.assert_array_equal(rope["short_factor"], SHORT)
    np.testing.assert_array_equal(rope["long_factor"], LONG)


def phi35_style(**rope):
    """A Phi-3.5-mini-shaped config.json (dimensions shrunk): 131072 positions extended from 4096."""
    return {"architectures": ["Phi3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512,
            "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
            "sliding_window": 262144, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **rope}


def test_transformers_4_and_5_forms_agree():
    factors = {"short_factor": list(SHORT), "long_factor": list(LONG)}
    v4 = config_from_dict(phi35_style(rope_scaling={"type": "longrope", **factors}))
    v5 = config_from_dict(phi35_style(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                       "original_max_position_embeddings": 4096, **factors}))
    assert v4 == v5
    assert config_from_dict(phi35_style(rope_scaling={"type": "su", **factors})) == v4  # early Phi-3 name
    assert (v4.rope_type, v4.rope_short_factor, v4.rope_long_factor) == ("longrope", SHORT, LONG)
    assert (v4.rope_original_max_position, v4.rope_attention_factor, v4.block_size) == (4096, None, 131072)
    cos, _ = models.init(v4, seed=0, dtype="float64").rope(np.array([0]), 8)
    np.testing.assert_allclose(cos, math.sqrt(17 / 12), rtol=1e-15)  # log 32 / log 4096 = 5 / 12
    given = config_from_dict(phi35_style(rope_scaling={"type": "longrope", "factor": 4.0, **factors}))
    assert given.rope_attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(4096)), rel=1e-15)


# ---------------------------------------------------------------- bad configs


@pytest.mark.parametrize("overrides,message", [
    ({"rope_short_factor": SHORT[:-1]}, "rope_short_factor must hold head_dim/2 = 8"),
    ({"rope_long_factor": (0.0,) * HALF}, "rope_long_factor must hold head_dim/2 = 8 finite numbers > 0"),
    ({"rope_long_factor": None}, "rope_long_factor must be a sequence of 8 numbers"),
    ({"rope_original_max_position": None}, "rope_original_max_position must be a positive int"),
    ({"rope_attention_factor": -1.0}, "rope_attention_factor must be a finite number > 0"),
    ({"rope_factor": 2.0}, "rope_factor is not used by rope_type 'longrope'"),
    ({"rope_type": "default"}, "only used by rope_type 'longrope'"),
])
def test_bad_configs_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        phi3_longrope(**overrides)


def test_hf_config_without_factors_is_named():
    with pytest.raises(CheckpointError, match=r"longrope RoPE parameters lack \['long_factor'\]"):
        config_from_dict(phi35_style(rope_scaling={"type": "longrope", "short_factor": list(SHORT)}))
    with pytest.raises(CheckpointError, match="rope_short_factor must hold head_dim/2 = 8"):
        config_from_dict(phi35_style(rope_scaling={"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}))


def test_flop_counts_refuse_the_step_that_switches_factors():
    """The decode step reaching original_max + 1 tokens recomputes the cache: the counts must say so."""
    from refslm import flops

    cfg = phi3_longrope()
    flops.generation_flops(cfg, 4, 12)  # 4 + 11 = 15 tokens: short factors throughout, cache reused
    flops.generation_flops(cfg, 20, 8)  # prefill already past the switch: long factors, cache reused
    with pytest.raises(ValueError, match="decode step reaching 17 tokens switches to the long factors"):
        flops.generation_flops(cfg, 10, 8)  # crosses 16 -> 17 while decoding

"""Configuration validation and dict round trips."""

import math
import re
from fractions import Fraction

import numpy as np
import pytest

from refslm import models
from refslm.config import ConfigError, DecoderOnlyConfig, EncoderDecoderConfig, tiny_decoder_only, tiny_encoder_decoder


def test_config_dict_round_trip_and_unknown_fields():
    cfg = tiny_encoder_decoder()
    assert EncoderDecoderConfig.from_dict(cfg.to_dict(), ignore_unknown=False) == cfg
    assert EncoderDecoderConfig.from_dict({**cfg.to_dict(), "dropout": 0.1}) == cfg
    with pytest.raises(ConfigError, match="dropout"):
        EncoderDecoderConfig.from_dict({**cfg.to_dict(), "dropout": 0.1}, ignore_unknown=False)


@pytest.mark.parametrize("field, value, message", [
    ("n_head", 5, "divisible by n_head"),
    ("n_kv_head", 4, "divisible by n_kv_head"),
    ("rope_theta", 0.0, "rope_theta"),
    ("rope_factor", 0.5, "rope_factor"),
    ("mask_fill", "zero", "mask_fill"),
    ("eos_token_id", 512, "eos_token_id"),
    ("n_embd", 0, "n_embd"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        tiny_encoder_decoder(**{field: value})


def test_decoder_only_layout_defaults():
    assert tiny_decoder_only().attention_bias is True
    assert tiny_decoder_only(layout="llama").attention_bias is False
    with pytest.raises(ConfigError, match="layout"):
        tiny_decoder_only(layout="gpt2")


def test_gqa_order_defaults_follow_the_layout():
    """Mu's text code repeats KV heads as a block; Llama and Phi-3 repeat each head consecutively."""
    assert tiny_encoder_decoder().is_interleaved is False
    assert tiny_decoder_only().is_interleaved is False
    assert tiny_decoder_only(layout="llama").is_interleaved is True
    assert tiny_decoder_only(layout="phi3").is_interleaved is True
    assert tiny_decoder_only(layout="llama", is_interleaved=False).is_interleaved is False


@pytest.mark.parametrize("make", [tiny_encoder_decoder, tiny_decoder_only])
@pytest.mark.parametrize("value", ["false", 0, 1])
def test_bool_fields_must_be_bool(make, value):
    """A string "false" is truthy: taken as True it would silently pick the other GQA head order."""
    names = ["is_interleaved"] + (["tie_word_embeddings", "attention_bias", "mlp_bias"]
                                  if make is tiny_decoder_only else [])
    for name in names:
        with pytest.raises(ConfigError, match=f"{name} must be True or False, got {value!r}"):
            make(**{name: value})


@pytest.mark.parametrize("name", ["rope_theta", "rope_factor", "norm_eps"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "1e-6", True, None, 10**400])
def test_float_fields_must_be_finite_numbers(name, value):
    """NaN passes `<=` checks (every comparison is False) and gave all-NaN logits; a str failed on `<=`."""
    with pytest.raises(ConfigError, match=f"{name} must be a finite number"):
        tiny_decoder_only(**{name: value})


def test_float_fields_are_stored_as_float():
    cfg = tiny_decoder_only(rope_theta=500000, rope_factor=2, norm_eps=Fraction(1, 100000))
    assert (cfg.rope_theta, cfg.rope_factor, cfg.norm_eps) == (500000.0, 2.0, 1e-5)
    assert all(type(v) is float for v in (cfg.rope_theta, cfg.rope_factor, cfg.norm_eps))


@pytest.mark.parametrize("name", ["pad_token_id", "bos_token_id", "eos_token_id"])
@pytest.mark.parametrize("value", [0.5, 1.5, 2.0, True, "1", -1, 512])
def test_special_token_ids_must_be_ints_in_range(name, value):
    """pad 0.5 masked nothing, pad True counted as id 1: ids must be ints (not bools) in [0, V)."""
    with pytest.raises(ConfigError, match=rf"{name} must be an int in \[0, vocab_size=512\)"):
        tiny_decoder_only(**{name: value})


def test_only_pad_token_id_may_be_none():
    assert tiny_decoder_only(pad_token_id=None).pad_token_id is None
    for name in ("bos_token_id", "eos_token_id"):
        with pytest.raises(ConfigError, match=f"{name} must be an int"):
            tiny_decoder_only(**{name: None})


HEAD_DIM_2 = dict(n_embd=8, qkv_embd=None, n_head=4, n_kv_head=2)  # head_dim 2


def test_dynamic_ntk_needs_head_dim_above_2():
    """theta' = theta * (...)^(D / (D - 2)) divides by zero at D = 2 (it failed at the first forward)."""
    with pytest.raises(ConfigError, match="rope_type 'dynamic' with rope_factor > 1 needs head_dim > 2"):
        tiny_decoder_only(**HEAD_DIM_2, rope_type="dynamic", rope_factor=2.0)
    for ok in (dict(rope_type="dynamic", rope_factor=1.0), dict(rope_type="linear", rope_factor=2.0)):
        model = models.init(tiny_decoder_only(**HEAD_DIM_2, **ok), seed=0)
        assert np.isfinite(model.logits([[5, 6]])).all()


def test_dynamic_ntk_factor_must_keep_the_base_exact():
    """At factor >= 2^53, factor - 1 rounds to factor and the NTK base collapses (NaN logits at 1e300)."""
    with pytest.raises(ConfigError, match="rope_factor must be < 2\\^53 for rope_type 'dynamic'"):
        tiny_decoder_only(rope_factor=1e300)
    model = models.init(tiny_decoder_only(rope_factor=2.0**52), seed=0)
    assert np.isfinite(model.logits([[5, 6]])).all()
    tiny_decoder_only(rope_type="linear", rope_factor=1e300)  # positions / factor: defined


LONGROPE = dict(n_embd=64, qkv_embd=None, n_head=8, n_kv_head=2, rope_type="longrope",  # head_dim 8
                rope_short_factor=(1.0, 1.5, 2.0, 2.5), rope_long_factor=(3.0,) * 4)


def test_longrope_derived_attention_factor_needs_original_above_1():
    """sqrt(1 + log(block_size / original) / log(original)) divides by log 1 = 0 (it failed at the first forward)."""
    with pytest.raises(ConfigError, match="rope_original_max_position=1 < block_size=32 leaves the derived"):
        tiny_decoder_only(**LONGROPE, rope_original_max_position=1)
    for ok in (dict(rope_original_max_position=1, rope_attention_factor=1.2),
               dict(rope_original_max_position=1, block_size=1), dict(rope_original_max_position=2)):
        model = models.init(tiny_decoder_only(**{**LONGROPE, **ok}), seed=0)
        assert np.isfinite(model.logits([[5]])).all()


@pytest.mark.parametrize("value,message", [
    ("1234", "must be a sequence of 4 numbers"),
    (b"1234", "must be a sequence of 4 numbers"),
    ({1.0, 2.0, 3.0, 4.0}, "must be a sequence of 4 numbers"),
    (["1", "2", "3", "4"], "must hold head_dim/2 = 4 finite numbers > 0"),
    ([True] * 4, "must hold head_dim/2 = 4 finite numbers > 0"),
    ([1.0, 2.0, math.nan, 4.0], "must hold head_dim/2 = 4 finite numbers > 0"),
    (np.ones((2, 2)), "must hold head_dim/2 = 4 finite numbers > 0"),
])
def test_longrope_factors_must_be_a_sequence_of_numbers(value, message):
    """'1234' was read as the factors (1, 2, 3, 4)."""
    with pytest.raises(ConfigError, match=f"rope_short_factor {message}"):
        tiny_decoder_only(**{**LONGROPE, "rope_short_factor": value}, rope_original_max_position=16)


def test_longrope_factors_accept_lists_tuples_and_arrays():
    for value in ([1, 2, 3, 4], (1.0, 2.0, 3.0, 4.0), np.array([1.0, 2.0, 3.0, 4.0])):
        cfg = tiny_decoder_only(**{**LONGROPE, "rope_short_factor": value}, rope_original_max_position=16)
        assert cfg.rope_short_factor == (1.0, 2.0, 3.0, 4.0)


def test_from_dict_refuses_the_other_kind():
    data = tiny_encoder_decoder().to_dict()
    with pytest.raises(ConfigError, match="the data is for kind 'encoder_decoder', not 'decoder_only'"):
        DecoderOnlyConfig.from_dict(data)
    assert EncoderDecoderConfig.from_dict(data) == tiny_encoder_decoder()


@pytest.mark.parametrize("name, value", [("n_layer", True), ("n_layer", 2.0), ("block_size", 2.0), ("n_head", "2"),
                                         ("vocab_size", np.float64(512))])
def test_int_fields_refuse_bools_floats_and_strings(name, value):
    with pytest.raises(ConfigError, match=re.escape(f"{name} must be a positive int, got {value!r}")):
        tiny_decoder_only(**{name: value})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "1.2", True, 0.0])
def test_longrope_attention_factor_must_be_a_finite_positive_number(value):
    with pytest.raises(ConfigError, match="rope_attention_factor must be a finite number > 0 or None"):
        tiny_decoder_only(**LONGROPE, rope_original_max_position=16, rope_attention_factor=value)

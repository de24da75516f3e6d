"""Configuration validation and dict round trips."""

import pytest

from refslm.config import ConfigError, EncoderDecoderConfig, tiny_decoder_only, tiny_encoder_decoder


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

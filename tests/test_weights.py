"""Checkpoints: save/load round trips for every layout and storage dtype, config.json mapping, errors,
and (when torch + transformers are installed) the saved Llama / Phi-3 directories loaded by transformers."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest
from test_safetensors_io import error_without_blocking, needs_fifo

import refslm
from refslm import models
from refslm import safetensors_io as sio
from refslm.config import DecoderOnlyConfig, tiny_decoder_only, tiny_encoder_decoder
from refslm.weights import CheckpointError, config_from_dict, save

# HF layouts in the form config_from_dict returns (so that a round trip gives an equal config)
HF_FORM = dict(qkv_embd=None, head_dim=12, n_head=4, n_kv_head=2, is_interleaved=True, rope_type="default",
               mask_fill="-inf")
CONFIGS = {
    "mu-encoder-decoder": lambda: tiny_encoder_decoder(),
    "mu-decoder-only": lambda: tiny_decoder_only(),
    "mu-decoder-only-untied": lambda: tiny_decoder_only(tie_word_embeddings=False),
    "llama-untied": lambda: tiny_decoder_only(layout="llama", tie_word_embeddings=False, **HF_FORM),
    "llama-tied-biases": lambda: tiny_decoder_only(layout="llama", attention_bias=True, mlp_bias=True, **HF_FORM),
    "phi3": lambda: tiny_decoder_only(layout="phi3", tie_word_embeddings=False, **{**HF_FORM, "head_dim": None}),
}
IDS = np.array([[3, 5, 7, 9, 11, 13], [4, 6, 8, 10, 12, 14]])


def logits(model, ids=IDS):
    return model.logits(ids, ids) if model.is_encoder_decoder else model.logits(ids)


def stored(x: np.ndarray, storage: str) -> np.ndarray:
    """What a float64 parameter becomes in the file (widened back to float64)."""
    if storage == "bfloat16":
        return sio.decode_bfloat16(sio.encode_bfloat16(x)).astype(np.float64)
    return x.astype(storage).astype(np.float64)


@pytest.fixture(scope="module")
def originals():
    return {name: models.init(make(), seed=3, dtype="float64") for name, make in CONFIGS.items()}


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("storage", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", sorted(CONFIGS))
def test_round_trip_every_layout_and_storage(tmp_path, originals, layout, storage):
    model = originals[layout]
    save(model, tmp_path, storage=storage)
    assert {t.dtype for t in sio.read_header(tmp_path / "model.safetensors").tensors.values()} == {
        sio.FLOAT_STORAGE[storage]}
    for dtype in ("float32", "float64"):
        loaded = refslm.load(tmp_path, dtype=dtype)
        assert loaded.config == model.config and loaded.dtype == dtype
        assert sorted(loaded.params) == sorted(model.params)
        for name, value in model.params.items():
            expected = stored(value, storage).astype(dtype)
            assert loaded.params[name].dtype == dtype
            np.testing.assert_array_equal(loaded.params[name], expected, err_msg=name)
    if storage == "float64":
        np.testing.assert_array_equal(logits(loaded), logits(model))


@pytest.mark.parametrize("layout", ["mu-encoder-decoder", "mu-decoder-only", "llama-tied-biases"])
def test_tied_head_is_stored_once(tmp_path, originals, layout):
    save(originals[layout], tmp_path)
    assert "lm_head.weight" not in sio.read_header(tmp_path / "model.safetensors").tensors


def test_untied_head_is_stored(tmp_path, originals):
    save(originals["llama-untied"], tmp_path)
    assert "lm_head.weight" in sio.read_header(tmp_path / "model.safetensors").tensors


def _rewrite(directory, change):
    """Apply change(tensors) to the directory's model.safetensors."""
    path = directory / "model.safetensors"
    tensors = sio.read_safetensors(path)
    change(tensors)
    sio.write_safetensors(path, tensors)


@pytest.mark.parametrize("layout,embed", [("mu-encoder-decoder", "transformer.wte.weight"),
                                          ("llama-tied-biases", "model.embed_tokens.weight")])
def test_tied_head_stored_under_both_names(tmp_path, originals, layout, embed):
    model = originals[layout]
    save(model, tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"lm_head.weight": t[embed].copy()}))
    np.testing.assert_array_equal(logits(refslm.load(tmp_path, dtype="float64")), logits(model))

    def different(t):
        t["lm_head.weight"] = t[embed] + 1.0

    _rewrite(tmp_path, different)
    with pytest.raises(CheckpointError, match=f"tied to {embed} but lm_head.weight is stored with different"):
        refslm.load(tmp_path)


def test_numpy_only_reader_and_writer_give_the_same_model(tmp_path, originals, monkeypatch):
    pytest.importorskip("safetensors")
    model = originals["mu-encoder-decoder"]
    save(model, tmp_path / "package", storage="float32")
    with_package = refslm.load(tmp_path / "package", dtype="float64")
    monkeypatch.setattr(sio, "package_available", lambda: False)
    save(model, tmp_path / "numpy", storage="float32")
    for directory in ("package", "numpy"):
        numpy_only = refslm.load(tmp_path / directory, dtype="float64")
        for name in model.params:
            np.testing.assert_array_equal(numpy_only.params[name], with_package.params[name])


def test_sharded_checkpoint(tmp_path, originals):
    model = originals["llama-untied"]
    save(model, tmp_path)
    tensors = sio.read_safetensors(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        sio.write_safetensors(tmp_path / file, {n: tensors[n] for n in part})
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    np.testing.assert_array_equal(logits(refslm.load(tmp_path, dtype="float64")), logits(model))

    index["weight_map"][names[0]] = "../model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file name in the directory"):
        refslm.load(tmp_path)
    index["weight_map"][names[0]] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"lacks tensors the index lists: \\['{names[0]}'\\]"):
        refslm.load(tmp_path)
    index["weight_map"][names[0]] = "model-00003-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00003-of-00002.safetensors"):
        refslm.load(tmp_path)


# ---------------------------------------------------------------- config.json mapping


def test_mu_config_with_training_fields(tmp_path, originals):
    model = originals["mu-encoder-decoder"]
    save(model, tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data.update(dropout=0.1, kind="encoder_decoder", bias=True)
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert refslm.load(tmp_path).config == model.config


def test_public_mu_config_fields_only():
    public = {"n_encoder_layer": 2, "n_decoder_layer": 1, "n_embd": 64, "qkv_embd": 48, "hidden_dim": 128,
              "n_head": 6, "n_kv_head": 2, "is_interleaved": False, "block_size": 32, "rope_theta": 10000.0,
              "rope_factor": 1.0, "dropout": 0.1, "pad_token_id": 0, "vocab_size": 512, "eos_token_id": 2}
    assert config_from_dict(public) == tiny_encoder_decoder()


def hf_llama(**extra) -> dict:
    data = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 12, "rms_norm_eps": 1e-5, "vocab_size": 512, "max_position_embeddings": 32,
            "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    data.update(extra)
    return data


def test_hf_config_fields_map_to_refslm():
    config = config_from_dict(hf_llama(attention_bias=True, rope_theta=500000.0, attention_dropout=0.1,
                                       pretraining_tp=1, initializer_range=0.02))
    assert config == DecoderOnlyConfig(
        layout="llama", n_layer=2, n_embd=64, qkv_embd=None, head_dim=12, hidden_dim=128, n_head=4, n_kv_head=2,
        is_interleaved=True, block_size=32, rope_theta=500000.0, rope_factor=1.0, rope_type="default",
        vocab_size=512, norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2, mask_fill="-inf",
        attention_bias=True, mlp_bias=False, tie_word_embeddings=True)


@pytest.mark.parametrize("rope_type", ["linear", "dynamic"])
def test_transformers_4_and_5_rope_forms_agree(rope_type):
    v4 = config_from_dict(hf_llama(rope_theta=20000.0, rope_scaling={"type": rope_type, "factor": 4.0}))
    v4_new_key = config_from_dict(hf_llama(rope_theta=20000.0, rope_scaling={"rope_type": rope_type, "factor": 4.0}))
    v5 = config_from_dict(hf_llama(rope_parameters={"rope_theta": 20000.0, "rope_type": rope_type, "factor": 4.0}))
    assert v4 == v4_new_key == v5
    assert (v5.rope_theta, v5.rope_type, v5.rope_factor) == (20000.0, rope_type, 4.0)
    default = config_from_dict(hf_llama(rope_parameters={"rope_theta": 20000.0, "rope_type": "default"}))
    assert (default.rope_theta, default.rope_type, default.rope_factor) == (20000.0, "default", 1.0)


def test_hf_defaults_and_token_id_lists():
    data = hf_llama(eos_token_id=[7, 8], pad_token_id=None)
    for key in ("num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "bos_token_id"):
        del data[key]
    config = config_from_dict(data)
    assert (config.n_kv_head, config.norm_eps, config.tie_word_embeddings) == (4, 1e-6, False)
    assert (config.eos_token_id, config.pad_token_id, config.bos_token_id) == (7, None, 1)
    phi3 = config_from_dict({**hf_llama(), "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
                             "head_dim": None, "sliding_window": None})
    assert phi3.layout == "phi3" and phi3.resolved_head_dim == 16 and not phi3.attention_bias


@pytest.mark.parametrize("rope_type", ["llama3", "yarn"])
def test_unsupported_rope_types_are_named(rope_type):
    with pytest.raises(CheckpointError, match=f"RoPE type '{rope_type}' is not supported"):
        config_from_dict(hf_llama(rope_scaling={"rope_type": rope_type, "factor": 8.0}))
    with pytest.raises(CheckpointError, match=f"RoPE type '{rope_type}' is not supported"):
        config_from_dict(hf_llama(rope_parameters={"rope_type": rope_type, "rope_theta": 1e4, "factor": 8.0}))


@pytest.mark.parametrize("data,message", [
    (hf_llama(hidden_act="gelu"), "hidden_act 'gelu'"),
    (hf_llama(sliding_window=16), "sliding_window=16"),
    (hf_llama(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (hf_llama(architectures=["MistralForCausalLM"], model_type="mistral"), "MistralForCausalLM"),
    ({k: v for k, v in hf_llama().items() if k != "hidden_size"}, r"lacks \['hidden_size'\]"),
    (hf_llama(num_attention_heads=5, head_dim=None), "divisible by n_head=5"),
    (hf_llama(num_key_value_heads=3), "n_head=4 must be divisible by n_kv_head=3"),
    ({"n_embd": 64}, "cannot tell the model"),
    ({**tiny_encoder_decoder().to_dict(), "n_head": 5}, "divisible by n_head=5"),
])
def test_bad_configs_raise_naming_the_field(data, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_dict(data)


# ---------------------------------------------------------------- errors when loading


def test_missing_files(tmp_path, originals):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        refslm.load(tmp_path)
    save(originals["mu-decoder-only"], tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        refslm.load(tmp_path)


def test_corrupt_files(tmp_path, originals):
    save(originals["mu-decoder-only"], tmp_path)
    weights_path = tmp_path / "model.safetensors"
    weights_path.write_bytes(weights_path.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="truncated"):
        refslm.load(tmp_path)
    weights_path.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="header length .* is impossible"):
        refslm.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        refslm.load(tmp_path)


def test_missing_unexpected_and_misshaped_tensors_are_all_listed(tmp_path, originals):
    save(originals["llama-untied"], tmp_path)

    def damage(t):
        del t["model.layers.0.mlp.up_proj.weight"]
        del t["model.norm.weight"]
        t["model.layers.1.self_attn.q_proj.bias"] = np.zeros(48)
        t["model.layers.1.self_attn.k_proj.weight"] = np.zeros((48, 64))

    _rewrite(tmp_path, damage)
    with pytest.raises(CheckpointError) as info:
        refslm.load(tmp_path)
    message = str(info.value)
    for fragment in ("missing (2)", "model.layers.0.mlp.up_proj.weight", "model.norm.weight",
                     "unexpected (1): model.layers.1.self_attn.q_proj.bias",
                     "model.layers.1.self_attn.k_proj.weight: expected (24, 64), got (48, 64)"):
        assert fragment in message


@pytest.mark.parametrize("layout,change,message", [
    ("mu-decoder-only", {"n_layer": 3}, r"n_layer=3 but the weights hold transformer.h.N blocks N = \[0, 1\]"),
    ("mu-encoder-decoder", {"n_encoder_layer": 1}, r"n_encoder_layer=1 but the weights hold transformer.e.N blocks"),
    ("mu-decoder-only", {"n_embd": 32}, r"transformer.wte.weight: expected \(512, 32\), got \(512, 64\)"),
    ("mu-decoder-only", hf_llama(), "'model.\\*' tensors, but the weights hold e.g."),
])
def test_config_contradicting_the_weights(tmp_path, originals, layout, change, message):
    save(originals[layout], tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, **change}))
    with pytest.raises(CheckpointError, match=message):
        refslm.load(tmp_path)


def test_non_float_tensor(tmp_path, originals):
    save(originals["mu-decoder-only"], tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"transformer.ln_f.weight": np.ones(64, np.int32)}))
    with pytest.raises(CheckpointError, match="transformer.ln_f.weight must be a float array, got dtype int32"):
        refslm.load(tmp_path)


def test_save_rejects_what_hugging_face_cannot_express(tmp_path):
    model = models.init(tiny_decoder_only(layout="llama", **{**HF_FORM, "is_interleaved": False}))
    with pytest.raises(CheckpointError, match="is_interleaved=False"):
        save(model, tmp_path)
    phi3 = models.init(tiny_decoder_only(layout="phi3", **{**HF_FORM, "head_dim": 12}))
    with pytest.raises(CheckpointError, match="head_dim=12 != n_embd / n_head"):
        save(phi3, tmp_path)
    llama = models.init(tiny_decoder_only(layout="llama"))  # n_embd 64, 6 heads of 8: transformers cannot load it
    message = "cannot save as Hugging Face llama: n_embd=64 not a multiple of n_head=6"
    with pytest.raises(CheckpointError, match=message):
        save(llama, tmp_path / "llama")
    assert not (tmp_path / "llama").exists()
    for storage in ("int8", "", ["float16"]):  # "" is no "use the model's dtype" (None is)
        with pytest.raises(ValueError, match=r"storage must be one of \['bfloat16', 'float16', 'float32', 'float64'\]"):
            save(phi3, tmp_path, storage=storage)


def test_transformers_refuses_the_llama_shapes_save_refuses():
    """The rule save applies is the installed transformers' own: LlamaConfig wants hidden_size % heads == 0, even
    with head_dim given (a saved tiny Llama with 6 heads of 8 at width 64 failed in from_pretrained)."""
    transformers = pytest.importorskip("transformers")
    with pytest.raises(Exception, match=r"hidden size \(64\) is not a multiple of the number of attention heads \(6\)"):
        transformers.LlamaConfig(hidden_size=64, num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=12)  # HF_FORM


@pytest.mark.parametrize("dtype,storage,value", [
    ("float32", "float16", 7e4), ("float64", "float16", -65520.0), ("float64", "bfloat16", 3.4e38),
    ("float32", "bfloat16", 3.4e38), ("float64", "float32", 1e39),
])
def test_save_refuses_values_the_storage_rounds_to_inf(tmp_path, dtype, storage, value):
    """save wrote inf (with only NumPy's RuntimeWarning) and load then refused the file."""
    model = models.init(tiny_decoder_only(), seed=3, dtype=dtype)
    model.params["transformer.h.1.mlp.fc1.weight"][3, 4] = value
    message = (f"cannot save parameter transformer.h.1.mlp.fc1.weight as {storage}: its largest magnitude "
               f"{abs(value):.6g} rounds to inf there (the largest finite {storage} is {sio.storage_max(storage):.6g})")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        save(model, tmp_path / "out", storage=storage)
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("storage,value", [("float16", 65519.0), ("float16", -65504.0), ("bfloat16", 3.3e38)])
def test_save_keeps_values_that_round_to_the_largest_finite(tmp_path, storage, value):
    model = models.init(tiny_decoder_only(), seed=3, dtype="float64")
    model.params["transformer.ln_f.weight"][5] = value
    save(model, tmp_path, storage=storage)
    loaded = refslm.load(tmp_path, dtype="float64").params["transformer.ln_f.weight"][5]
    assert loaded == stored(np.array([value]), storage)[0] and np.isfinite(loaded)


INV_FREQ = "model.layers.{}.self_attn.rotary_emb.inv_freq"


@pytest.mark.parametrize("layout", ["llama-untied", "phi3"])
def test_old_transformers_rotary_buffers_are_ignored(tmp_path, originals, layout):
    """transformers < 4.31 saved each layer's RoPE inv_freq buffer: such checkpoints were refused as unexpected."""
    model = originals[layout]
    save(model, tmp_path)
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, 12, 2, dtype=np.float32) / 12)
    _rewrite(tmp_path, lambda t: t.update({INV_FREQ.format(i): inv_freq.copy() for i in range(2)}))
    np.testing.assert_array_equal(logits(refslm.load(tmp_path, dtype="float64")), logits(model))


@pytest.mark.parametrize("layout,extra", [
    ("llama-untied", "model.rotary_emb.inv_freq"),
    ("llama-untied", "model.layers.0.self_attn.rotary_emb.cos_cached"),
    ("llama-untied", "model.layers.0.self_attn.inv_freq"),
    ("mu-decoder-only", "transformer.h.0.causal_attn.rotary_emb.inv_freq"),
])
def test_other_extra_tensors_are_still_unexpected(tmp_path, originals, layout, extra):
    save(originals[layout], tmp_path)
    _rewrite(tmp_path, lambda t: t.update({extra: np.ones(6, np.float32)}))
    with pytest.raises(CheckpointError, match=f"unexpected \\(1\\): {extra}"):
        refslm.load(tmp_path)


def test_rotary_buffer_of_a_block_the_config_lacks_is_refused(tmp_path, originals):
    save(originals["llama-untied"], tmp_path)
    _rewrite(tmp_path, lambda t: t.update({INV_FREQ.format(2): np.ones(6, np.float32)}))
    with pytest.raises(CheckpointError, match=r"n_layer=2 but the weights hold model.layers.N blocks N = \[0, 1, 2\]"):
        refslm.load(tmp_path)


# ---------------------------------------------------------------- config.json value types

LONGROPE_SCALING = {"type": "longrope", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6}  # head_dim 12


@pytest.mark.parametrize("extra,message", [
    ({"rope_theta": "abc"}, "rope_theta must be a finite number, got 'abc'"),
    ({"rope_theta": "1e4"}, "rope_theta must be a finite number, got '1e4'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": True}}, "rope_parameters.rope_theta must be a finite"),
    ({"rope_scaling": {"type": "linear", "factor": "two"}}, "rope_scaling.factor must be a finite number or null"),
    ({"rope_scaling": {"type": "dynamic", "factor": float("nan")}}, "rope_scaling.factor must be a finite number"),
    ({"rope_scaling": [["type", "linear"], ["factor", 2.0]]}, "rope_scaling must be null or an object"),
    ({"rope_scaling": "linear"}, "rope_scaling must be null or an object, got 'linear'"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number, got nan"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a finite number"),
    ({"sliding_window": "10"}, "sliding_window must be a positive int or null, got '10'"),
    ({"max_position_embeddings": 32.0}, "max_position_embeddings must be a positive int, got 32.0"),
    ({"eos_token_id": "eos"}, "eos_token_id must be an int, a non-empty list of ints or null, got 'eos'"),
    ({"eos_token_id": 2.7}, "eos_token_id must be an int, a non-empty list of ints or null, got 2.7"),
    ({"eos_token_id": [2.7, 3]}, "eos_token_id must be an int"),
    ({"eos_token_id": []}, r"eos_token_id must be an int, a non-empty list of ints or null, got \[\]"),
    ({"pad_token_id": True}, "pad_token_id must be an int"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
    ({"attention_bias": "false"}, "attention_bias must be true or false"),
    ({"mlp_bias": 0}, "mlp_bias must be true or false"),
    ({"architectures": "LlamaForCausalLM"}, "architectures must be a list of strings"),
    ({"model_type": ["llama"]}, "model_type must be a string"),
    ({"num_key_value_heads": 0}, "n_kv_head must be a positive int, got 0"),
    ({"rope_scaling": {**LONGROPE_SCALING, "factor": 2.0}, "original_max_position_embeddings": 1},
     r"rope_scaling.attention_factor cannot be derived from factor=2.0 with original_max_position_embeddings=1"),
    ({"rope_scaling": {**LONGROPE_SCALING, "factor": 2.0}, "original_max_position_embeddings": "16"},
     "original_max_position_embeddings must be a positive int, got '16'"),
    ({"rope_scaling": LONGROPE_SCALING, "original_max_position_embeddings": 1},
     "rope_original_max_position=1 < block_size=32 leaves the derived rope_attention_factor"),
])
def test_hf_config_bad_values_name_the_key(extra, message):
    """Each raised a bare AttributeError / ValueError / ZeroDivisionError, or was taken (2.7 as 2, "false" as true)."""
    with pytest.raises(CheckpointError, match=f"config.json: .*{message}"):
        config_from_dict(hf_llama(**extra))


def test_hf_config_valid_values_still_map():
    config = config_from_dict(hf_llama(rope_theta=20000, num_key_value_heads=None, sliding_window=None,
                                       rope_parameters={"rope_type": "linear", "factor": 2}))
    assert (config.rope_theta, config.rope_factor, config.n_kv_head) == (20000.0, 2.0, 4)
    phi3 = config_from_dict({**hf_llama(), "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
                             "head_dim": None, "attention_bias": "ignored by Phi-3"})
    assert phi3.attention_bias is False


@pytest.mark.parametrize("change,message", [
    ({"is_interleaved": "false"}, "is_interleaved must be True or False, got 'false'"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be True or False"),
    ({"norm_eps": float("nan")}, "norm_eps must be a finite number > 0, got nan"),
    ({"rope_theta": float("inf")}, "rope_theta must be a finite number > 0, got inf"),
    ({"rope_factor": "2"}, "rope_factor must be a finite number >= 1"),
    ({"pad_token_id": 0.5}, r"pad_token_id must be an int in \[0, vocab_size=512\) or None, got 0.5"),
])
def test_mu_config_json_bad_values_are_named(change, message):
    """A Mu config.json with "is_interleaved": "false" loaded with the other GQA head order."""
    with pytest.raises(CheckpointError, match=f"config.json: .*{message}"):
        config_from_dict({**tiny_decoder_only().to_dict(), **change})


# ---------------------------------------------------------------- files that are not what they should be


@pytest.mark.parametrize("raw,message", [
    (b'{"n_layer": "\xff"}', "not valid JSON .*utf-8"),
    (b"[" * 200_000, "not valid JSON .*recursion"),
])
def test_config_json_must_be_utf8_json(tmp_path, originals, raw, message):
    save(originals["mu-decoder-only"], tmp_path)
    (tmp_path / "config.json").write_bytes(raw)
    with pytest.raises(CheckpointError, match=f"config.json: {message}"):
        refslm.load(tmp_path)


def _sharded(directory, model) -> str:
    """Save model as one shard model-00001-of-00001.safetensors plus its index; -> the shard's name."""
    save(model, directory)
    shard = "model-00001-of-00001.safetensors"
    os.replace(directory / "model.safetensors", directory / shard)
    names = sio.read_header(directory / shard).tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    return shard


@pytest.mark.parametrize("index,message", [
    (b'{"weight_map": []}', "weight_map is an object"),
    (b'{"weight_map": "model.safetensors"}', "weight_map is an object"),
    (b'"weight_map"', "weight_map is an object"),
    (b"{}", "weight_map is an object"),
    (b'{"weight_map": {"\xff": 1}}', "not valid JSON .*utf-8"),
    (b"[" * 200_000, "not valid JSON .*recursion"),
])
def test_bad_shard_index_is_named(tmp_path, originals, index, message):
    _sharded(tmp_path, originals["mu-decoder-only"])
    (tmp_path / "model.safetensors.index.json").write_bytes(index)
    with pytest.raises(CheckpointError, match=f"model.safetensors.index.json: .*{message}"):
        refslm.load(tmp_path)


def _replace(directory, file: str, kind: str):
    path = directory / file
    path.unlink()
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    return path


SINGLE, SHARDED = ("config.json", "model.safetensors"), ("model.safetensors.index.json", "shard")


@pytest.mark.parametrize("kind", [pytest.param("fifo", marks=needs_fifo), "directory"])
@pytest.mark.parametrize("file", SINGLE + SHARDED)
def test_checkpoint_file_that_is_not_a_regular_file(tmp_path, originals, file, kind):
    """A FIFO hung load() forever; a directory raised a bare IsADirectoryError."""
    model = originals["mu-decoder-only"]
    shard = _sharded(tmp_path, model) if file in SHARDED else save(model, tmp_path)
    path = _replace(tmp_path, shard if file == "shard" else file, kind)
    error = error_without_blocking(lambda: refslm.load(tmp_path), path)
    assert isinstance(error, CheckpointError)
    assert f"{path}: expected a regular file, found {'a directory' if kind == 'directory' else 'a FIFO'}" in str(error)


# ---------------------------------------------------------------- weights that are not finite


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused(tmp_path, originals, value):
    """They loaded silently and every logit was NaN."""
    save(originals["mu-decoder-only"], tmp_path, storage="float32")
    _rewrite(tmp_path, lambda t: t["transformer.h.1.mlp.fc1.weight"].__setitem__((3, 4), value))
    for dtype in ("float32", "float64"):
        with pytest.raises(CheckpointError, match="transformer.h.1.mlp.fc1.weight holds NaN or inf"):
            refslm.load(tmp_path, dtype=dtype)


def test_float64_weights_beyond_float32_are_refused_in_float32(tmp_path, originals):
    """1e300 cast to float32 is inf: a float64 file loaded in float32 gave NaN logits."""
    save(originals["mu-decoder-only"], tmp_path, storage="float64")
    _rewrite(tmp_path, lambda t: t["transformer.ln_f.weight"].__setitem__(5, 1e300))
    with pytest.raises(CheckpointError, match="transformer.ln_f.weight overflows float32 .*1e\\+300"):
        refslm.load(tmp_path, dtype="float32")
    assert np.isfinite(logits(refslm.load(tmp_path, dtype="float64"))).all()  # representable in float64


def test_tied_head_holding_nan_is_reported_as_nan(tmp_path, originals):
    save(originals["mu-encoder-decoder"], tmp_path)

    def nan_in_both(t):
        t["transformer.wte.weight"][7, 0] = np.nan
        t["lm_head.weight"] = t["transformer.wte.weight"].copy()

    _rewrite(tmp_path, nan_in_both)
    with pytest.raises(CheckpointError, match="transformer.wte.weight holds NaN or inf"):
        refslm.load(tmp_path)


# ---------------------------------------------------------------- transformers reads what refslm writes


def _float64_islands_off(hf, torch, theta: float | None, head_dim: int) -> None:
    """transformers computes RMSNorm (and RoPE) in float32 even in a float64 model: swap in float64 forms."""
    for module in hf.modules():
        if type(module).__name__.endswith("RMSNorm"):
            def norm(x, m=module):
                return m.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon))
            module.forward = norm
    if theta is not None:
        def rotary(x, position_ids):
            inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
            angles = position_ids.to(torch.float64)[..., None] * inv_freq
            angles = torch.cat([angles, angles], dim=-1)
            return angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        hf.model.rotary_emb.forward = rotary


def _transformers_logits(directory, ids, float64_rope: bool, config, position_ids=None, attention_mask=None):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64, attn_implementation="sdpa")
    _float64_islands_off(hf, torch, config.rope_theta if float64_rope else None, config.resolved_head_dim)
    extra = {name: torch.from_numpy(value) for name, value in
             (("position_ids", position_ids), ("attention_mask", attention_mask)) if value is not None}
    with torch.no_grad():
        return type(hf).__name__, hf(torch.from_numpy(ids), **extra).logits.numpy()


@pytest.mark.parametrize("layout", ["llama-untied", "llama-tied-biases", "phi3"])
def test_transformers_loads_saved_directory(tmp_path, originals, layout):
    model = originals[layout]
    save(model, tmp_path)
    ids = np.array([[3, 5, 7, 9, 11, 13, 200, 100], [4, 6, 8, 10, 12, 14, 300, 1]])  # no pad id (0)
    name, expected = _transformers_logits(tmp_path, ids, True, model.config)
    assert name == {"phi3": "Phi3ForCausalLM"}.get(layout, "LlamaForCausalLM")
    np.testing.assert_allclose(logits(model, ids), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rope_type,factor", [("linear", 3.0), ("dynamic", 2.0)])
def test_transformers_rope_scaling_agrees(tmp_path, rope_type, factor):
    # transformers' RoPE stays float32 here (its scaling code is what is checked): |error| <= 5e-10 measured.
    config = tiny_decoder_only(layout="llama", block_size=4, rope_factor=factor, **{**HF_FORM, "rope_type": rope_type})
    model = models.init(config, seed=5, dtype="float64")
    save(model, tmp_path)
    assert refslm.load(tmp_path).config == config
    ids = np.array([[3, 5, 7, 9, 11, 13, 200, 100]])  # 8 tokens > block_size 4: dynamic NTK active
    _, expected = _transformers_logits(tmp_path, ids, False, config)
    np.testing.assert_allclose(logits(model, ids), expected, rtol=0, atol=1e-8)
    unscaled = models.from_params(dataclasses.replace(config, rope_type="default"), model.params, dtype="float64")
    assert np.abs(logits(unscaled, ids) - expected).max() > 1e-4  # 10^4 x the tolerance: the scaling is checked


def test_transformers_dynamic_ntk_length_is_max_position_plus_one(tmp_path, monkeypatch):
    # Every row left padded: positions t - leading pads reach 9, so L = 10 < the padded T = 12 (block_size 4).
    config = tiny_decoder_only(layout="llama", block_size=4, rope_factor=2.0, **{**HF_FORM, "rope_type": "dynamic"})
    model = models.init(config, seed=6, dtype="float64")
    save(model, tmp_path)
    ids = np.array([[0, 0, 3, 5, 7, 9, 11, 13, 200, 100, 17, 19], [0, 0, 0, 4, 6, 8, 10, 12, 14, 300, 1, 21]])
    mask = (ids != 0).astype(np.int64)
    positions = models.left_padding_positions(ids, 0, mask)
    assert models.rope_length(positions) == 10
    _, expected = _transformers_logits(tmp_path, ids, False, config, positions, mask)
    np.testing.assert_allclose(model.logits(ids, position_ids=positions, attention_mask=mask), expected, rtol=0,
                               atol=1e-8)  # float32 RoPE in transformers: |error| <= 5e-10 measured
    monkeypatch.setattr(models, "rope_length", lambda positions: ids.shape[1])  # the padded length instead
    as_padded = model.logits(ids, position_ids=positions, attention_mask=mask)
    assert np.abs(as_padded - expected).max() > 1e-4  # 10^4 x the tolerance: the rule is checked


def test_save_names_a_wrong_model_or_directory(tmp_path, originals):
    with pytest.raises(TypeError, match="save needs a refslm Model"):
        save(object(), tmp_path)
    with pytest.raises(TypeError, match="directory must be a path"):
        save(originals["llama-untied"], None)

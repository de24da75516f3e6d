"""Checkpoints: `load(directory)` and `save(model, directory)` (config.json + model.safetensors).

Two families of checkpoint, told apart by config.json (SPEC.md section "Checkpoints"):
  - Mu (the paper's public naming): config.json holds refslm / Mu config fields (`n_encoder_layer`
    for the encoder-decoder, `n_layer` for the decoder-only baseline); tensors under the canonical
    `transformer.*` names; the tied head may also be stored as `lm_head.weight`.
  - Hugging Face Llama / Phi-3: config.json names `LlamaForCausalLM` / `Phi3ForCausalLM`
    (`architectures` or `model_type`); tensors under the state-dict names; transformers-4 RoPE
    fields (`rope_theta`, `rope_scaling`) or transformers-5 ones (`rope_parameters`).
Tensors stored as float64, float32, float16 or bfloat16 are widened exactly and then cast once to the
compute dtype the caller asks for. Everything is read through refslm.safetensors_io (no pickle).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError, DecoderOnlyConfig, EncoderDecoderConfig, is_finite_number, is_int
from .models import Model, ParameterError, from_params
from .ops import longrope_attention_factor
from .safetensors_io import (
    FLOAT_STORAGE,
    SafetensorsError,
    read_header,
    read_json_file,
    read_safetensors,
    rounds_to_inf,
    storage_max,
    write_safetensors,
)

Config = EncoderDecoderConfig | DecoderOnlyConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TIED_HEAD = "lm_head.weight"

HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Phi3ForCausalLM": "phi3"}
HF_MODEL_TYPES = {"llama": "llama", "phi3": "phi3"}
HF_ARCHITECTURE_OF = {layout: arch for arch, layout in HF_ARCHITECTURES.items()}
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "longrope")  # refslm rope_type has the same names
# transformers' class defaults for keys a config.json may leave out
HF_DEFAULTS = {
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": None, "original_max_position_embeddings": None},  # None: max_position_embeddings
    "phi3": {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 32000,
             "pad_token_id": 32000, "original_max_position_embeddings": 4096},
}
HF_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# refslm config fields that Mu config.json files carry but that are derived, not settable
_NOT_INIT_FIELDS = ("kind",)
# stacks of numbered blocks: tensor-name prefix -> the config field counting them
_STACKS = {"transformer.e": ("n_encoder_layer",), "transformer.h": ("n_decoder_layer", "n_layer"),
           "model.layers": ("n_layer",)}
_STACK_INDEX = re.compile(r"^(transformer\.e|transformer\.h|model\.layers)\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete, inconsistent or unsupported."""


# ---------------------------------------------------------------- config.json <-> refslm configs


def _checked(key: str, value: Any, expected: str, valid: Callable[[Any], bool]) -> Any:
    """value if valid(value), else a CheckpointError naming config.json's key and what was expected."""
    if not valid(value):
        raise CheckpointError(f"config.json: {key} must be {expected}, got {value!r}")
    return value


def _positive_int(value: Any) -> bool:
    return is_int(value) and value > 0


def hf_layout(data: dict[str, Any]) -> str | None:
    """'llama' | 'phi3' for a Hugging Face config.json, None for a Mu one; raises for other HF models."""
    architectures = _checked("architectures", data.get("architectures"), "a list of strings",
                             lambda v: v is None or isinstance(v, list) and all(isinstance(a, str) for a in v)) or []
    model_type = _checked("model_type", data.get("model_type"), "a string", lambda v: v is None or isinstance(v, str))
    for arch in architectures:
        if arch in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[arch]
    if model_type in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[model_type]
    if architectures or model_type:
        raise CheckpointError(f"config.json: unsupported model (architectures={architectures}, model_type="
                              f"{model_type!r}); supported: {sorted(HF_ARCHITECTURES)} or the Mu naming")
    return None


def hf_rope(data: dict[str, Any], layout: str) -> dict[str, Any]:
    """config.json -> the refslm RoPE config fields, from transformers-5 `rope_parameters` or
    transformers-4 top-level `rope_theta` + `rope_scaling` ({"type" | "rope_type", "factor"}).

    longrope (Phi-3 / Phi-3.5): `short_factor`, `long_factor`, `attention_factor` (optional; when
    absent but `factor` is given, it is derived from `factor`), `original_max_position_embeddings`
    (the top-level key wins, as in transformers; else the RoPE dict's; else 4096 for Phi-3 and
    max_position_embeddings for Llama).
    """
    params, where = data.get("rope_parameters"), "rope_parameters"
    if params is None:  # transformers 4
        params = _checked("rope_scaling", data.get("rope_scaling"), "null or an object",
                          lambda v: v is None or isinstance(v, dict)) or {}
        where = "rope_scaling"
    elif not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"config.json: rope_parameters must be one flat dict, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "su":  # early Phi-3 configs name longrope "su"
        rope_type = "longrope"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"config.json: RoPE type {rope_type!r} is not supported (supported: "
                              f"{SUPPORTED_ROPE_TYPES}; llama3, yarn are not implemented)")
    if params.get("partial_rotary_factor", data.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError("config.json: partial_rotary_factor != 1 is not supported")
    theta = _checked(f"{where}.rope_theta" if "rope_theta" in params else "rope_theta",
                     params.get("rope_theta", data.get("rope_theta", 10000.0)), "a finite number", is_finite_number)
    factor = _checked(f"{where}.factor", params.get("factor"), "a finite number or null",
                      lambda v: v is None or is_finite_number(v))
    fields = {"rope_theta": float(theta), "rope_type": rope_type,
              "rope_factor": 1.0 if rope_type in ("default", "longrope") or factor is None else float(factor)}
    if rope_type == "longrope":
        missing = [k for k in ("short_factor", "long_factor") if k not in params]
        if missing:
            raise CheckpointError(f"config.json: longrope RoPE parameters lack {missing}")
        key = "original_max_position_embeddings"
        original = data.get(key, params.get(key, HF_DEFAULTS[layout][key]))
        if original is None:
            original = data.get("max_position_embeddings", HF_DEFAULTS[layout]["max_position_embeddings"])
        _checked(key, original, "a positive int", _positive_int)
        attention_factor = params.get("attention_factor")
        if attention_factor is None and factor is not None:
            if factor > 1 and original == 1:
                raise CheckpointError(f"config.json: {where}.attention_factor cannot be derived from factor={factor} "
                                      f"with {key}=1 (sqrt(1 + log(factor) / log(1)) is undefined)")
            attention_factor = longrope_attention_factor(float(factor), original)
        fields.update(rope_short_factor=params["short_factor"], rope_long_factor=params["long_factor"],
                      rope_original_max_position=original, rope_attention_factor=attention_factor)
    return fields


def _token_id(data: dict[str, Any], name: str, layout: str) -> int | None:
    """A special token id; a list (several EOS ids) gives its first entry.

    null gives None for pad_token_id (no id is padding: nothing is masked, as in Hugging Face
    without an attention mask) and 0 for the others.
    """
    value = data.get(name, HF_DEFAULTS[layout][name])
    if isinstance(value, list):
        value = _checked(name, value, "an int, a non-empty list of ints or null", bool)[0]
    if value is None:
        return None if name == "pad_token_id" else 0
    return _checked(name, value, "an int, a non-empty list of ints or null", is_int)


def _hf_bool(data: dict[str, Any], name: str) -> bool:
    """A true / false key, false when absent (a string such as "false" is an error, not true)."""
    return _checked(name, data.get(name, False), "true or false", lambda v: isinstance(v, bool))


def config_from_hf(data: dict[str, Any], layout: str) -> DecoderOnlyConfig:
    """Hugging Face Llama / Phi-3 config.json dict -> DecoderOnlyConfig(layout=layout)."""
    missing = [k for k in HF_REQUIRED if k not in data]
    if missing:
        raise CheckpointError(f"config.json: Hugging Face {layout} config lacks {missing}")
    defaults = HF_DEFAULTS[layout]
    if data.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json: hidden_act {data['hidden_act']!r} is not supported (only 'silu')")
    window = _checked("sliding_window", data.get("sliding_window"), "a positive int or null",
                      lambda v: v is None or _positive_int(v))
    max_positions = data.get("max_position_embeddings", defaults["max_position_embeddings"])
    _checked("max_position_embeddings", max_positions, "a positive int", _positive_int)
    if window is not None and window < max_positions:
        raise CheckpointError(f"config.json: sliding_window={window} < max_position_embeddings={max_positions} "
                              "is not supported (sliding-window attention is not implemented)")
    is_llama = layout == "llama"
    try:
        return DecoderOnlyConfig(
            layout=layout, n_layer=data["num_hidden_layers"], n_embd=data["hidden_size"], qkv_embd=None,
            hidden_dim=data["intermediate_size"], n_head=data["num_attention_heads"],
            n_kv_head=data["num_attention_heads"] if data.get("num_key_value_heads") is None
            else data["num_key_value_heads"],
            head_dim=data.get("head_dim") if is_llama else None, is_interleaved=True,
            block_size=max_positions, **hf_rope(data, layout), rope_layout="rotate_half", vocab_size=data["vocab_size"],
            pad_token_id=_token_id(data, "pad_token_id", layout), bos_token_id=_token_id(data, "bos_token_id", layout),
            eos_token_id=_token_id(data, "eos_token_id", layout),
            norm_eps=_checked("rms_norm_eps", data.get("rms_norm_eps", defaults["rms_norm_eps"]), "a finite number",
                              is_finite_number),
            mask_fill=data.get("mask_fill", "-inf"),
            attention_bias=is_llama and _hf_bool(data, "attention_bias"),
            mlp_bias=is_llama and _hf_bool(data, "mlp_bias"),
            tie_word_embeddings=_hf_bool(data, "tie_word_embeddings"))
    except ConfigError as exc:
        raise CheckpointError(f"config.json: {exc}") from None


def config_to_hf(config: DecoderOnlyConfig, storage: str) -> dict[str, Any]:
    """DecoderOnlyConfig(layout 'llama' | 'phi3') -> a Hugging Face config.json dict.

    RoPE is written in both the transformers-4 and -5 forms. Raises CheckpointError for settings
    the Hugging Face classes cannot express (their numbers would silently differ) or refuse to load.
    """
    problems = []
    if not config.is_interleaved:
        problems.append("is_interleaved=False (Hugging Face repeats each KV head consecutively)")
    if config.rope_layout != "rotate_half":
        problems.append(f"rope_layout={config.rope_layout!r} (Hugging Face uses rotate_half)")
    if config.layout == "phi3" and (config.attention_bias or config.mlp_bias):
        problems.append("attention_bias / mlp_bias (Phi-3 has no biases)")
    if config.layout == "phi3" and config.resolved_head_dim * config.n_head != config.n_embd:
        problems.append(f"head_dim={config.resolved_head_dim} != n_embd / n_head (Phi-3 derives it)")
    if config.layout == "llama" and config.n_embd % config.n_head:
        problems.append(f"n_embd={config.n_embd} not a multiple of n_head={config.n_head} (transformers' LlamaConfig "
                        "refuses hidden_size % num_attention_heads != 0, even with head_dim given)")
    if problems:
        raise CheckpointError(f"cannot save as Hugging Face {config.layout}: " + "; ".join(problems))
    scaling = hf_rope_scaling(config)
    data: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURE_OF[config.layout]], "model_type": config.layout,
        "hidden_size": config.n_embd, "intermediate_size": config.hidden_dim, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
        "hidden_act": "silu", "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
        "vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_word_embeddings,
        "pad_token_id": config.pad_token_id, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id, "rope_theta": config.rope_theta, "rope_scaling": scaling,
        "rope_parameters": {"rope_theta": config.rope_theta, **(scaling or {"rope_type": "default"})},
        "torch_dtype": storage, "dtype": storage, "mask_fill": config.mask_fill,
    }
    if config.layout == "llama":
        data.update(head_dim=config.resolved_head_dim, attention_bias=config.attention_bias,
                    mlp_bias=config.mlp_bias)
    else:
        data.update(original_max_position_embeddings=config.rope_original_max_position or config.block_size)
    return data


def hf_rope_scaling(config: DecoderOnlyConfig) -> dict[str, Any] | None:
    """The transformers-4 `rope_scaling` dict of config (None for plain RoPE); `rope_parameters` adds rope_theta."""
    if config.rope_type == "longrope":
        scaling = {"short_factor": list(config.rope_short_factor), "long_factor": list(config.rope_long_factor),
                   "original_max_position_embeddings": config.rope_original_max_position}
        if config.rope_attention_factor is not None:
            scaling["attention_factor"] = config.rope_attention_factor
    elif config.rope_type == "default" or config.rope_factor == 1.0:
        return None
    else:
        scaling = {"factor": config.rope_factor}
    return {"rope_type": config.rope_type, "type": config.rope_type, **scaling}


def config_from_dict(data: dict[str, Any]) -> Config:
    """A config.json dict (Mu or Hugging Face) -> EncoderDecoderConfig | DecoderOnlyConfig.

    Mu: `n_encoder_layer` present -> EncoderDecoderConfig, `n_layer` -> DecoderOnlyConfig; fields
    refslm does not know (training-only ones such as dropout) are ignored.
    """
    if not isinstance(data, dict):
        raise CheckpointError(f"config.json must hold a JSON object, got {type(data).__name__}")
    layout = hf_layout(data)
    if layout is not None:
        return config_from_hf(data, layout)
    fields = {k: v for k, v in data.items() if k not in _NOT_INIT_FIELDS}
    if "n_encoder_layer" in data:
        cls: type[Config] = EncoderDecoderConfig
    elif "n_layer" in data:
        cls = DecoderOnlyConfig
    else:
        raise CheckpointError("config.json: cannot tell the model: expected Hugging Face architectures "
                              f"{sorted(HF_ARCHITECTURES)} or model_type, or Mu fields n_encoder_layer / n_layer")
    try:
        return cls.from_dict(fields)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"config.json: {exc}") from None


def config_to_dict(config: Config, storage: str) -> dict[str, Any]:
    """The config.json written by `save`: Hugging Face form for layouts 'llama' / 'phi3', else Mu fields."""
    if isinstance(config, DecoderOnlyConfig) and config.layout != "mu":
        return config_to_hf(config, storage)
    return {k: v for k, v in config.to_dict().items() if k not in _NOT_INIT_FIELDS}


# ---------------------------------------------------------------- tensors


def _shard_files(directory: Path) -> dict[str, list[str] | None]:
    """file name -> the tensor names the index gives it (None for a single model.safetensors)."""
    single, index = directory / WEIGHTS_FILE, directory / INDEX_FILE
    if single.exists():
        return {WEIGHTS_FILE: None}
    if not index.exists():
        raise FileNotFoundError(f"{directory}: neither {WEIGHTS_FILE} nor {INDEX_FILE} exists")
    data = read_json_file(index, CheckpointError)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a safetensors index: expected a JSON object whose weight_map is an "
                              f"object (tensor name -> shard file name), got {data!r:.80}")
    shards: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file or file in (".", ".."):
            raise CheckpointError(f"{index}: tensor {name!r} maps to {file!r}, not a file name in the directory")
        shards.setdefault(file, []).append(name)
    return shards


def read_tensors(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (BF16 widened to float32, other dtypes as stored)."""
    directory = Path(directory)
    tensors: dict[str, np.ndarray] = {}
    for file, listed in _shard_files(directory).items():
        path = directory / file
        if not path.exists():
            raise FileNotFoundError(f"{directory / INDEX_FILE} names shard {file}, which does not exist")
        names = set(read_header(path).tensors)
        problems = {"repeats tensors of another shard": names & set(tensors)}
        if listed is not None:
            problems["holds tensors the index does not list"] = names - set(listed)
            problems["lacks tensors the index lists"] = set(listed) - names
        for problem, items in problems.items():
            if items:
                raise CheckpointError(f"{path}: {problem}: {sorted(items)}")
        tensors.update(read_safetensors(path))
    return tensors


def _check_stack_depths(config: Config, tensors: dict[str, np.ndarray]) -> None:
    """The numbered blocks in the tensor names must match the config's layer counts."""
    found: dict[str, set[int]] = {}
    for name in tensors:
        match = _STACK_INDEX.match(name)
        if match:
            found.setdefault(match.group(1), set()).add(int(match.group(2)))
    for prefix, indices in found.items():
        field = next((f for f in _STACKS[prefix] if hasattr(config, f)), None)
        if field is None:
            continue  # a stack this layout does not have: reported as unexpected tensors
        expected = getattr(config, field)
        if indices != set(range(expected)):
            raise CheckpointError(f"config.json says {field}={expected} but the weights hold {prefix}.N blocks "
                                  f"N = {sorted(indices)}")


def _naming(config: Config) -> tuple[str, str]:
    """-> (prefix of every tensor name but the head, embedding name) of the config's layout."""
    if isinstance(config, DecoderOnlyConfig) and config.layout != "mu":
        return "model.", "model.embed_tokens.weight"
    return "transformer.", "transformer.wte.weight"


def hf_buffer_names(config: Config) -> set[str]:
    """The non-parameter buffers a Hugging Face checkpoint of config may hold, ignored on loading: the RoPE
    `model.layers.{i}.self_attn.rotary_emb.inv_freq` of each block i < n_layer, which transformers < 4.31
    saved with the weights. Empty for the Mu layouts."""
    if not isinstance(config, DecoderOnlyConfig) or config.layout == "mu":
        return set()
    return {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(config.n_layer)}


def canonical_params(config: Config, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checkpoint tensors -> the model's canonical parameters.

    A tied head (Mu encoder-decoder, or tie_word_embeddings) may be stored as lm_head.weight too; it
    must then equal the embedding exactly and is dropped; so are the known buffers of `hf_buffer_names`
    (any other name is left for from_params to refuse as unexpected). Raises CheckpointError when the
    names belong to another layout or the block counts contradict the config.
    """
    buffers = hf_buffer_names(config)
    tensors = {n: t for n, t in tensors.items() if n not in buffers}
    prefix, embed_name = _naming(config)
    if tensors and not any(n.startswith(prefix) for n in tensors):
        layout = getattr(config, "layout", "mu")
        raise CheckpointError(f"config.json describes a {type(config).__name__} (layout {layout!r}) with "
                              f"'{prefix}*' tensors, but the weights hold e.g. {sorted(tensors)[:3]}")
    _check_stack_depths(config, tensors)
    tied = isinstance(config, EncoderDecoderConfig) or config.tie_word_embeddings
    if tied and TIED_HEAD in tensors:
        embed = tensors.get(embed_name)
        head = tensors[TIED_HEAD]
        if embed is None or embed.shape != head.shape or not np.array_equal(embed, head, equal_nan=True):
            raise CheckpointError(f"the head is tied to {embed_name} but {TIED_HEAD} is stored with different "
                                  "values (or shape); store it once, or set tie_word_embeddings=false")
        tensors = {n: t for n, t in tensors.items() if n != TIED_HEAD}
    return tensors


def check_storable(params: dict[str, np.ndarray], storage: str) -> None:
    """Raise CheckpointError naming the first parameter (float arrays [...]) with a value that would be stored
    as +-inf in storage (a name of FLOAT_STORAGE): load refuses such a file."""
    for name, array in params.items():
        if rounds_to_inf(array, storage):
            raise CheckpointError(f"cannot save parameter {name} as {storage}: its largest magnitude "
                                  f"{np.max(np.abs(array)):.6g} rounds to inf there (the largest finite {storage} "
                                  f"is {storage_max(storage):.6g}); save with a wider storage")


# ---------------------------------------------------------------- public entry points


def load(directory: str | os.PathLike, dtype: str = "float32", backend: Any = "numpy"):
    """config.json + model.safetensors (or its sharded index) -> refslm model computing in `dtype`.

    Raises FileNotFoundError for missing files, CheckpointError (a ValueError) for a corrupt file or
    one that is not a regular file (a directory, a FIFO), an unsupported or contradictory config,
    missing / unexpected / misshaped tensors (all listed), or a parameter that is not finite in `dtype`.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (a checkpoint is config.json + {WEIGHTS_FILE})")
    data = read_json_file(config_path, CheckpointError)
    try:
        config = config_from_dict(data)
        params = canonical_params(config, read_tensors(directory))
        model = from_params(config, params, dtype=dtype, backend=backend)
    except (SafetensorsError, ParameterError, CheckpointError) as exc:
        raise CheckpointError(f"{directory}: {exc}") from None
    return model


def save(model: Any, directory: str | os.PathLike, *, storage: str | None = None) -> None:
    """Write model as config.json + model.safetensors into directory (created if needed).

    storage: tensor dtype in the file, "float64" | "float32" | "float16" | "bfloat16" (default: the
    model's dtype), rounded to nearest even; a parameter with a value that would round to inf there is a
    CheckpointError naming it, raised before anything is written. Mu models keep the Mu naming and config
    fields; Llama / Phi-3 layouts get Hugging Face names and config.json, loadable by transformers (settings
    it cannot express or load are a CheckpointError). A tied head is stored once (as the embedding).
    """
    if not isinstance(model, Model):
        raise TypeError(f"save needs a refslm Model (refslm.init / refslm.load), got {type(model).__name__}")
    if not isinstance(directory, str | os.PathLike):
        raise TypeError(f"directory must be a path (str or os.PathLike), got {type(directory).__name__}")
    storage = model.dtype if storage is None else storage
    if not isinstance(storage, str) or storage not in FLOAT_STORAGE:
        raise ValueError(f"storage must be one of {sorted(FLOAT_STORAGE)}, got {storage!r}")
    config_data = config_to_dict(model.config, storage)
    if storage_max(storage) < storage_max(model.dtype):
        check_storable(model.params, storage)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / WEIGHTS_FILE, model.params, metadata={"format": "pt"}, storage=storage)
    (directory / CONFIG_FILE).write_text(json.dumps(config_data, indent=2) + "\n")

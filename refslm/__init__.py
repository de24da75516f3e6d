"""refslm: reference implementation of the small language models of "Return of the Encoder".

`import refslm` needs NumPy only. Public names:
  EncoderDecoderConfig, DecoderOnlyConfig, PRESETS   model configurations (refslm.config)
  init(config, seed, dtype)                          random model from a seed (refslm.models)
  load(directory, dtype), save(model, directory)     checkpoints (refslm.weights)
  losses, align, ops, backends                       submodules
"""

from __future__ import annotations

import importlib

from .config import PRESETS, DecoderOnlyConfig, EncoderDecoderConfig

__version__ = "0.1.0"

_LAZY = {
    "init": ("refslm.models", "init"),
    "load": ("refslm.weights", "load"),
    "save": ("refslm.weights", "save"),
}
_SUBMODULES = {
    "ops", "models", "generate", "losses", "align", "token_align", "weights", "safetensors_io", "golden",
    "backends", "bench", "flops",
}


def __getattr__(name: str):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"refslm.{name}")
    raise AttributeError(f"module 'refslm' has no attribute {name!r}")


__all__ = ["PRESETS", "DecoderOnlyConfig", "EncoderDecoderConfig", "init", "load", "save", "__version__"]

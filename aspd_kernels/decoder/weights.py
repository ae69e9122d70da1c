"""Weights from a local Hugging Face directory (``config.json`` + ``*.safetensors``, sharded or not) or from an
in-memory ``transformers`` model, into :class:`~aspd_kernels.decoder.model.Transformer`."""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor

from ..rope_append_kv import rope_cos_sin_cache
from .config import ModelConfig
from .model import Transformer

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# transformers keeps these as buffers in some versions; they are recomputed here from the config
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[name]


def read_directory(path: str, device: torch.device | str = "cpu") -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config dict, state dict)`` of a local model directory. Shards listed in ``model.safetensors.index.json``
    are read one by one (straight onto ``device``); without an index every ``*.safetensors`` file of the directory
    is read."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path!r} has no config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path!r} holds no *.safetensors weights")
    state: dict[str, Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(path, name), device=str(device)))
    return cfg, state


def read_module(model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config dict, state dict)`` of an in-memory ``transformers`` causal LM; tensors are shared, not copied."""
    if not hasattr(model, "config"):
        raise TypeError(f"expected a transformers model with a .config, got {type(model).__name__}")
    return model.config.to_dict(), dict(model.state_dict())


def build(cfg_dict: dict[str, Any], state: dict[str, Tensor], *, device: torch.device, dtype: torch.dtype | None,
          max_position: int) -> Transformer:
    """The model on ``device`` in ``dtype`` (default: the config's dtype, else the weights'), with its cos/sin table
    of ``max_position`` rows. Tensors already on ``device`` in ``dtype`` are used in place (shared)."""
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    cfg = ModelConfig.from_hf(cfg_dict, set(state))
    if dtype is None:
        dtype = parse_dtype(cfg.torch_dtype) if isinstance(cfg.torch_dtype, str) and cfg.torch_dtype in _DTYPES \
            else state["model.embed_tokens.weight"].dtype
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the {cfg.model_type} architecture: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    converted = {}
    for k, v in state.items():
        converted[k] = v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
    if cfg.tie_word_embeddings:
        converted["lm_head.weight"] = converted["model.embed_tokens.weight"]
    model.load_state_dict(converted, assign=True, strict=True)
    model.requires_grad_(False)
    inv_freq, scaling = cfg.rope_inv_freq()
    model.cos_sin = rope_cos_sin_cache(inv_freq, max_position, scaling).to(device)
    return model.eval()

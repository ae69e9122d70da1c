"""Model hyper-parameters read from a Hugging Face ``config.json`` (Llama 2/3, Qwen2/2.5, Mistral), and the rotary
inverse frequencies their ``rope_scaling`` asks for."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_OWN_ROPE_TYPES = ("default", "linear", "llama3")
# Their frequencies depend on the current sequence length, which a static cos/sin table cannot follow.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


@dataclass
class ModelConfig:
    """What the decoder's model needs to know. Built by :meth:`from_hf`; ``raw`` keeps the whole config dict."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    partial_rotary_factor: float = 1.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    torch_dtype: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], weight_names: set[str] | None = None) -> "ModelConfig":
        """``cfg``: a ``config.json`` dict (or ``PretrainedConfig.to_dict()``). ``weight_names`` (the checkpoint's
        tensor names) decide the bias flags, since Qwen2 hard-codes its qkv bias instead of naming it."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported: the decoder implements SwiGLU (silu)")
        names = weight_names or set()
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        theta, scaling = _rope_params(cfg)
        window = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)) or (
                bool(names) and "lm_head.weight" not in names),
            rope_theta=theta,
            rope_scaling=scaling,
            partial_rotary_factor=(scaling or {}).get("partial_rotary_factor",
                                                      cfg.get("partial_rotary_factor", 1.0)),
            qkv_bias=_has(names, "self_attn.q_proj.bias", model_type == "qwen2" or cfg.get("attention_bias", False)),
            o_bias=_has(names, "self_attn.o_proj.bias", cfg.get("attention_bias", False) and model_type != "qwen2"),
            mlp_bias=_has(names, "mlp.gate_proj.bias", cfg.get("mlp_bias", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            sliding_window=window,
            torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
            raw=dict(cfg),
        )

    @property
    def rope_type(self) -> str:
        s = self.rope_scaling or {}
        return s.get("rope_type") or s.get("type") or "default"

    def rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        """``(inv_freq float64 [rot_dim/2], attention_scaling)`` for this config's rotary scaling.

        default, linear and llama3 are computed here, so a local directory never needs ``transformers``; other
        static types (yarn, ...) are taken from ``transformers``' ``ROPE_INIT_FUNCTIONS`` when it is importable."""
        rope_type = self.rope_type
        if rope_type in _LENGTH_DEPENDENT_ROPE:
            raise ValueError(f"rope type {rope_type!r} changes with the sequence length; a static KV cache with one "
                             "cos/sin table cannot reproduce it")
        dim = int(self.head_dim * self.partial_rotary_factor)
        dim -= dim % 2
        # float32 as transformers computes it, so the tables agree to the last bit that matters
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        s = self.rope_scaling or {}
        if rope_type == "default":
            return inv.double(), 1.0
        if rope_type == "linear":
            return (inv / float(s["factor"])).double(), 1.0
        if rope_type == "llama3":
            return _llama3(inv, s).double(), 1.0
        return _from_transformers(self, rope_type)


def _has(names: set[str], suffix: str, default: bool) -> bool:
    if not names:
        return bool(default)
    return any(n.endswith(suffix) for n in names)


def _rope_params(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """transformers 5 keeps everything in ``rope_parameters``; older configs use ``rope_theta`` + ``rope_scaling``."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params:
        if "full_attention" in params and isinstance(params["full_attention"], dict):
            params = params["full_attention"]
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        return float(theta), scaling
    return float(cfg.get("rope_theta", 10000.0)), cfg.get("rope_scaling")


def _llama3(inv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency rule: long wavelengths divided by ``factor``, short ones kept, a linear blend between
    the two wavelength thresholds (``original_max_position_embeddings / {low,high}_freq_factor``)."""
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    blend = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - blend) * scaled / factor + blend * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _from_transformers(cfg: ModelConfig, rope_type: str) -> tuple[torch.Tensor, float]:
    try:
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except ImportError as e:
        raise ValueError(f"rope type {rope_type!r} needs transformers installed (only {_OWN_ROPE_TYPES} are "
                         "built in)") from e
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unknown rope type {rope_type!r}")
    raw = {k: v for k, v in cfg.raw.items() if k not in ("model_type", "transformers_version")}
    hf_cfg = AutoConfig.for_model(cfg.model_type, **raw)
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, torch.device("cpu"))
    return inv.double(), float(scaling)

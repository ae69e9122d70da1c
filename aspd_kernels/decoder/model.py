"""A minimal Llama-family decoder (Llama 2/3, Qwen2/2.5, Mistral) whose attention is the package's ops.

Module and parameter names mirror transformers' ``LlamaForCausalLM``, so a checkpoint's state dict loads as is.
Every forward -- a prefill chunk or a decode step -- is the same code: ``rope_append_kv`` rotates q and k and writes
k, v and the new tokens' (segment, branch) ids into the static cache, then ``branch_attention_with_kvcache`` attends
under the branch mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..branch_attention_with_kvcache import _overload as attn_run
from ..branch_attention_with_kvcache import prepare as attn_plan
from ..rope_append_kv import _overload as rope_run
from ..rope_append_kv import prepare as rope_plan
from ..torch_backend.step_cache import step_scope
from .cache import KVCache
from .config import ModelConfig


def _linear(m: nn.Linear, x: Tensor) -> Tensor:
    """``m(x)`` without ``Module.__call__``: the hot loop calls every submodule's computation directly, which skips
    the hook machinery (about a microsecond per call, a dozen calls per layer). Hooks on the decoder's modules are
    therefore not run; the decoder registers none."""
    return F.linear(x, m.weight, m.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # float32 statistics, then back to the input dtype before the weight: as Llama's reference does. A float32
        # input takes torch.rms_norm: the same products in the same order (bit-identical to transformers':
        # python_tests/test_decoder_loading.py), decomposed in C++ rather than six Python-level calls per norm
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return torch.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Batch:
    """Per-forward inputs shared by all layers.

    tokens: int64 [B, L]; positions: int32 [B, L] rotary ids; segment, branch: int32 [B, L] ids of the new tokens;
    cache_seqlens: int32 [B] valid slots after this forward; q_seqlens: int32 [B] real new tokens per sequence
    (rows beyond are padding: not written, attention output zero).
    ``plan``: what the first layer's checks decided for the whole forward (the two ops' backend names and the
    attention scale), so the other layers call the registered ops directly (FlashInfer's plan/run split).
    """

    __slots__ = ("tokens", "positions", "segment", "branch", "cache_seqlens", "q_seqlens", "plan")

    def __init__(self, tokens: Tensor, positions: Tensor, segment: Tensor, branch: Tensor, cache_seqlens: Tensor,
                 q_seqlens: Tensor) -> None:
        self.tokens, self.positions, self.segment, self.branch = tokens, positions, segment, branch
        self.cache_seqlens, self.q_seqlens = cache_seqlens, q_seqlens
        self.plan: tuple[str, str, float] | None = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.q_proj = nn.Linear(cfg.hidden_size, hq * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(hq * d, cfg.hidden_size, bias=cfg.o_bias)
        self.hq, self.hkv, self.d = hq, hkv, d
        self.scale = d ** -0.5

    def forward(self, x: Tensor, b: Batch, cos_sin: Tensor, cache: KVCache, layer: int, check_values: bool) -> Tensor:
        bsz, L, _ = x.shape
        q = _linear(self.q_proj, x).view(bsz, L, self.hq, self.d)
        k = _linear(self.k_proj, x).view(bsz, L, self.hkv, self.d)
        v = _linear(self.v_proj, x).view(bsz, L, self.hkv, self.d)
        k_cache, v_cache = cache.layers[layer]
        if b.plan is None:
            # plan: the first layer runs the ops' full boundary checks (values only when asked: the cache ids are
            # then checked once per forward, not once per layer) and resolves the backends once
            rope_args = rope_plan(q, k, v, b.positions, cos_sin, k_cache, v_cache, cache.segment,
                                        cache.branch, b.cache_seqlens, b.segment, b.branch, b.q_seqlens,
                                        check_values=check_values)
            q = rope_run(*rope_args)
            attn_args = attn_plan(q, k_cache, v_cache, b.cache_seqlens, cache.segment, cache.branch,
                                        self.scale, b.q_seqlens, check_values=check_values)
            o = attn_run(*attn_args)
            b.plan = (rope_args[-1], attn_args[-1], attn_args[-2])
        else:
            # run: the same shapes as the first layer (one config, one cache), so its checks hold here too
            rope_backend, attn_backend, scale = b.plan
            q = rope_run(q, k, v, b.positions, cos_sin, k_cache, v_cache, cache.segment, cache.branch,
                                  b.cache_seqlens, b.segment, b.branch, b.q_seqlens, None, rope_backend)
            o = attn_run(q, k_cache, v_cache, b.cache_seqlens, cache.segment, cache.branch, b.q_seqlens,
                                  None, scale, attn_backend)
        return _linear(self.o_proj, o.reshape(bsz, L, self.hq * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        # in place on the fresh projections: the same products, two allocations fewer per layer
        h = F.silu(_linear(self.gate_proj, x), inplace=True).mul_(_linear(self.up_proj, x))
        return _linear(self.down_proj, h)


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, b: Batch, cos_sin: Tensor, cache: KVCache, layer: int, check_values: bool) -> Tensor:
        # submodules' forward called directly (see _linear); the residual adds in place on x, which nothing else
        # holds (the embedding's output, then this method's)
        x = x.add_(self.self_attn.forward(self.input_layernorm.forward(x), b, cos_sin, cache, layer, check_values))
        return x.add_(self.mlp.forward(self.post_attention_layernorm.forward(x)))


class Body(nn.Module):
    """transformers' ``model.`` prefix: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """``hidden(batch)`` -> final-norm hidden states ``[B, L, hidden]``; ``logits(h)`` -> float32 ``[..., vocab]``.

    The two are apart so a prefill computes the vocabulary projection only for the rows it samples from.
    ``cos_sin`` (float32 ``[P, rot_dim]``) is a buffer set by the loader (:func:`rope_cos_sin_cache`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("cos_sin", torch.empty(0, 0), persistent=False)

    def hidden(self, b: Batch, cache: KVCache, check_values: bool = True) -> Tensor:
        b.plan = None  # planned again by the first layer: shapes may differ from the batch's last forward
        x = self.model.embed_tokens(b.tokens)
        # the torch backend derives its rotary factors, cache slots and masks once, in the first layer, and every
        # other layer reuses them: nothing in Batch or the cache ids changes between layers but the ops' own
        # writes of the same ids (step_cache's contract). The GPU backends ignore the scope.
        with step_scope():
            for i, layer in enumerate(self.model.layers):
                x = layer.forward(x, b, self.cos_sin, cache, i, check_values)
        return self.model.norm.forward(x)

    def logits(self, h: Tensor) -> Tensor:
        return self.lm_head(h).float()

    def step(self, b: Batch, cache: KVCache, check_values: bool = True) -> Tensor:
        """A decode step: logits float32 ``[B, L, vocab]`` for every new row (what the CUDA graphs capture)."""
        return self.logits(self.hidden(b, cache, check_values))

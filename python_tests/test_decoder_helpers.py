"""Shared pieces of the decoder tests (no tests here): tiny random transformers models and the dense-mask check."""
from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")

from aspd_kernels.decoder import ParallelDecoder  # noqa: E402

VOCAB = 300


@__import__("pytest").fixture(autouse=True)
def one_thread():
    """Two threads on a loaded 2-core machine make each tiny matmul spin for milliseconds; import this fixture
    into a test module to run its tests on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(family: str, seed: int = 0, **overrides):
    """A random-weight Llama or Qwen2 (qkv bias, tied embeddings) in float32 with eager attention.

    A wide init spreads the logits so greedy choices are not near-ties that float32 rounding could flip; biases and
    norm weights are randomised so that their loading is exercised."""
    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, initializer_range=0.1, max_position_embeddings=2048,
                  attn_implementation="eager")
    common.update(overrides)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(tie_word_embeddings=True, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.eval()


def decoder(model, max_seq_len: int = 512) -> ParallelDecoder:
    return ParallelDecoder.from_hf(model, max_seq_len=max_seq_len)


def hf_greedy(model, ids: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def dense_logits(model, res) -> torch.Tensor:
    """transformers' forward over the whole final sequence with the branch mask as a 4-D additive mask and the
    decoder's positions as position_ids: float32 logits ``[N, V]``."""
    mask = res.layout.dense_mask()
    add = torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, float("-inf"))[None, None]
    with torch.no_grad():
        out = model(input_ids=res.sequence[None], attention_mask=add, position_ids=res.positions[None].long())
    return out.logits[0].float()


def predictor_rows(res) -> list[tuple[int, int]]:
    """``(slot, row)`` for each sampled slot: the row whose logits chose it, the latest earlier slot it sees."""
    mask = res.layout.dense_mask()
    pairs = []
    for i in torch.nonzero(res.sampled).flatten().tolist():
        seen = torch.nonzero(mask[i, :i]).flatten()
        pairs.append((i, int(seen[-1])))
    return pairs

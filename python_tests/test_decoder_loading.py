"""Loading: rope scaling tables equal transformers', a sharded safetensors directory equals the in-memory model,
and the Llama 3 rope-scaled model decodes as transformers does."""
from __future__ import annotations

import json
import os

import pytest
import torch

from test_decoder_helpers import decoder, hf_greedy, tiny_model, transformers
from test_decoder_helpers import one_thread  # noqa: F401  (autouse fixture)

from aspd_kernels.decoder import ModelConfig, ParallelDecoder

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}




@pytest.mark.parametrize("rope", [None, LLAMA3, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}])
def test_inv_freq_equals_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kw = {} if rope is None else {"rope_parameters": rope}
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, **kw)
    ours, scaling = ModelConfig.from_hf(cfg.to_dict()).rope_inv_freq()
    if rope is None:
        ref = 1.0 / (10000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
        ref_scaling = 1.0
    else:
        ref, ref_scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, torch.device("cpu"))
    assert scaling == ref_scaling
    torch.testing.assert_close(ours, ref.double(), rtol=1e-6, atol=0)
    if rope is LLAMA3:  # the scaling must actually bite at these sizes
        plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
        assert not torch.allclose(ours, plain)


def test_legacy_rope_scaling_keys():
    """Configs written before transformers 5 carry rope_theta + rope_scaling (with "type" or "rope_type")."""
    base = dict(model_type="llama", vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=4)
    old = ModelConfig.from_hf({**base, "rope_theta": 500000.0, "rope_scaling": {**LLAMA3, "rope_type": None,
                                                                                "type": "llama3"}})
    new = ModelConfig.from_hf({**base, "rope_parameters": LLAMA3})
    torch.testing.assert_close(old.rope_inv_freq()[0], new.rope_inv_freq()[0])
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf({**base, "model_type": "gpt2"})


def test_llama3_scaled_model_decodes_like_transformers():
    model = tiny_model("llama", seed=5, rope_parameters=LLAMA3)
    prompt = list(range(20, 60))  # past original_max_position_embeddings / high_freq_factor
    assert decoder(model).generate_serial(prompt, 10).suffix == hf_greedy(model, prompt, 10, None)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sharded_safetensors_directory_equals_in_memory(tmp_path, family):
    model = tiny_model(family, seed=2)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    with open(tmp_path / "model.safetensors.index.json") as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    from_dir = ParallelDecoder.from_hf(str(tmp_path), device="cpu", max_seq_len=256)
    in_mem = decoder(model, max_seq_len=256)
    assert from_dir.dtype == torch.float32
    for (name, a), (_, b) in zip(sorted(from_dir.model.state_dict().items()),
                                 sorted(in_mem.model.state_dict().items())):
        assert torch.equal(a, b), name
    args = ([1, 2, 3], [[4], [5, 6], [7]], 5)
    assert from_dir.generate_branches(*args).branches == in_mem.generate_branches(*args).branches
    if family == "qwen2":  # tied embeddings: no lm_head in the files, one shared matrix here
        assert from_dir.model.lm_head.weight.data_ptr() == from_dir.model.model.embed_tokens.weight.data_ptr()
    # in-memory weights are shared, not copied, when device and dtype match
    assert in_mem.model.model.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_dtype_conversion_and_bad_directory(tmp_path):
    model = tiny_model("llama", seed=1)
    dec = ParallelDecoder.from_hf(model, dtype="bfloat16", max_seq_len=64)
    assert dec.dtype == torch.bfloat16 and dec.cache.k.dtype == torch.bfloat16
    res = dec.generate_branches([1, 2], [[3], [4]], 3)
    assert [len(b) for b in res.branches] == [3, 3]
    with pytest.raises(FileNotFoundError):
        ParallelDecoder.from_hf(str(tmp_path))


def test_mistral_decodes_like_transformers_and_sliding_window_is_refused():
    torch.manual_seed(6)
    cfg = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=300, initializer_range=0.1,
                                     sliding_window=None, attn_implementation="eager")
    model = transformers.MistralForCausalLM(cfg).eval()
    prompt = [3, 14, 15, 92, 65, 35]
    assert decoder(model).generate_serial(prompt, 8).suffix == hf_greedy(model, prompt, 8, None)
    model.config.sliding_window = 32
    with pytest.raises(ValueError, match="sliding window"):
        ParallelDecoder.from_hf(model, max_seq_len=64)
    assert ParallelDecoder.from_hf(model, max_seq_len=32).max_seq_len == 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_transformers_bitwise(dtype):
    """The decoder's RMSNorm (torch.rms_norm for float32, the textbook ops otherwise) gives transformers'
    LlamaRMSNorm bit for bit: float32 statistics, the weight applied in the input dtype."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from aspd_kernels.decoder.model import RMSNorm

    torch.manual_seed(0)
    ours, ref = RMSNorm(96, 1e-6).to(dtype), LlamaRMSNorm(96, eps=1e-6).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(96))
        ref.weight.copy_(ours.weight)
    x = (torch.randn(3, 5, 96) * 4).to(dtype)
    assert torch.equal(ours(x), ref(x))

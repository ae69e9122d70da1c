"""aspd_kernels.data on the real model (SmolLM2-135M-Instruct, cached by aspd_kernels.models): the batched serial
decode the distillation uses equals one-request decoding, and a real answer of the model goes through the
transformation with its tokenizer and reads back exactly."""
import pytest
import torch

from aspd_kernels.models import smollm2_dir

# an answer SmolLM2-135M-Instruct wrote (greedy) for "List 3 benefits of packing for a trip." during distillation
REAL_ANSWER = (
    "1. **Increased Confidence**: Packing for a trip can boost your confidence and make you feel more prepared "
    "and capable. It's a great way to prepare yourself for the adventure ahead.\n\n"
    "2. **Enhanced Travel Experience**: Packing for a trip allows you to immerse yourself in the destination and "
    "culture. You can explore new places, try new foods, and meet new people.\n\n"
    "3. **Better Choices**: Packing for a trip can also help you make better choices.")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from aspd_kernels.hf import add_aspd_tokens

    t = AutoTokenizer.from_pretrained(smollm2_dir())
    add_aspd_tokens(t)
    return t


def test_real_answer_transforms_and_reads_back(tok):
    from aspd_kernels.data.aspd_text import data_tokens, read_back
    from aspd_kernels.data.transform import transform

    ex = transform(tok, "real", "List 3 benefits of packing for a trip.", REAL_ANSWER)
    assert [len(s.items) for s in ex.sections] == [3]
    tk = data_tokens(tok)
    assert tok.decode(list(tk.title_sep)) == ":" and tok.decode(list(tk.after_para)) == "\n"
    # the engine forces "\n" after <|/para|>: a list that ends the answer reads back with one more line break
    assert read_back(tok, tk, ex.ids, [(["1. ", "2. ", "3. "], "\n\n")]) == REAL_ANSWER + "\n"
    # each branch opens with the tokens the decoder feeds: <|branch|> + the title's ids + ":"
    title = tok.encode("**Increased Confidence**", add_special_tokens=False)
    i = ex.ids.index(tk.branch)
    assert ex.ids[i + 1:i + 1 + len(title) + 1] == title + list(tk.title_sep)
    assert 0.5 < ex.branch_tokens / len(ex.ids) < 1


def test_batched_serial_decode_equals_one_request(tok):
    from aspd_kernels.data.distill import chat_ids
    from aspd_kernels.decoder import ParallelDecoder

    torch.set_num_threads(1)
    dec = ParallelDecoder.from_hf(smollm2_dir(), dtype=torch.float32, max_seq_len=96, max_batch=2)
    prompts = [chat_ids(tok, "Name a color."), chat_ids(tok, "Give 3 tips for gardening.")]
    assert len(prompts[0]) != len(prompts[1])
    batch = dec.generate_serial_batch(prompts, 6, eos_token_id=tok.eos_token_id)
    for p, res in zip(prompts, batch):
        one = dec.generate_serial(p, 6, eos_token_id=tok.eos_token_id)
        assert res.suffix == one.suffix and len(res.suffix) >= 1
        assert tok.decode(res.suffix).strip()

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


@pytest.mark.parametrize("autocast, markers", [("off", False), ("bfloat16", True)])
def test_transform_and_finetune_clis_write_a_checkpoint_the_decoder_loads(tmp_path, tok, autocast, markers):
    """distill's output format -> transform CLI -> finetune CLI (2 steps, top layer) -> a checkpoint that
    ParallelDecoder.from_hf loads and decodes model-driven (it parses back); loss.jsonl holds finite losses."""
    import json

    from aspd_kernels.data import finetune, transform

    serial = tmp_path / "serial.jsonl"
    rows = [{"id": 0, "prompt": "List 3 benefits of packing for a trip.", "list": True, "answer": REAL_ANSWER,
             "tokens": 120, "finished": True},
            {"id": 1, "prompt": "In one sentence, what is a trip?", "list": False,
             "answer": "A trip is a journey from one place to another.", "tokens": 12, "finished": True}]
    serial.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, out = tmp_path / "aspd.jsonl", tmp_path / "ft"
    assert transform.main(["--in", str(serial), "--out", str(data), "--min-branches", "3"]
                          + ["--title-markers"] * markers) == 0
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    assert [r["parallel"] for r in lines] == [True, False]
    assert [r["title_markers"] for r in lines] == [markers] * 2
    # the fine-tune encodes each row in the format the transformation chose (the marker inside the titles)
    from aspd_kernels.data.aspd_text import data_tokens

    ex = finetune.build_examples(tok, data_tokens(tok), lines[:1], 1024)[0]
    text = tok.decode(ex["input_ids"])
    assert ("<|branch|>2. " in text) == markers and ("<|title|>1. " in text) == markers
    assert finetune.main(["--data", str(data), "--out", str(out), "--steps", "2", "--row-tokens", "256",
                          "--train-layers", "1", "--warmup", "1", "--threads", "1", "--autocast", autocast]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)

    from transformers import AutoTokenizer

    from aspd_kernels.data.distill import chat_ids
    from aspd_kernels.decoder import ParallelDecoder
    from aspd_kernels.layout import BranchLayout

    tok = AutoTokenizer.from_pretrained(out)  # the checkpoint's own, from here on
    tokens = data_tokens(tok)
    dec = ParallelDecoder.from_hf(out, device="cpu", dtype=torch.float32, max_seq_len=256)
    res = dec.generate(chat_ids(tok, rows[0]["prompt"]), 24, tokens, eos_token_id=tok.eos_token_id,
                       max_branch_tokens=8)
    assert res.generated_tokens > 0
    from aspd_kernels.hf.text import to_reading_order

    ids, _, br = to_reading_order(res.sequence, res.segment, res.branch)
    assert BranchLayout.from_aspd_tokens(ids, tokens).branch.tolist() == br

    # a forced two-branch section through the evaluation's record: branch_tokens counts the tokens sampled inside
    # branches, never the prompt slots or an appended <|/branch|>, so the Amdahl share p is not inflated
    from bench.aspd_real_answers import aspd_record

    eos = tok.eos_token_id
    script = [tokens.title, *tok.encode("Cost", add_special_tokens=False), tokens.title_end,
              tokens.title, *tok.encode("Time", add_special_tokens=False), tokens.title_end, tokens.para]
    left = list(script)

    def force(logits, histories):
        h = histories[0]
        last = {t: max((i for i, x in enumerate(h) if x == t), default=-1) for t in (tokens.branch, tokens.para_end)}
        if len(histories) > 1 or last[tokens.branch] > last[tokens.para_end]:
            return logits  # inside the section: the model writes the branches
        out = torch.full_like(logits, float("-inf"))
        out[:, left.pop(0) if left else eos] = 0.0
        return out

    p = chat_ids(tok, rows[0]["prompt"])
    res = dec.generate(p, 64, tokens, eos_token_id=eos, max_branch_tokens=3, logits_processor=force)
    rec = aspd_record(tok, tokens, res, len(p), "ft-aspd", eos)
    assert rec["parses"] and rec["sections"] == [2] and rec["stop"] == "eos"
    lens = rec["branch_lens"][0]
    assert rec["branch_lens"] == [[len(b) for b in res.branches[0]]] and all(1 <= n <= 4 for n in lens)
    sampled_in_branches = int((res.sampled.bool() & (res.branch > 0)).sum())
    assert rec["branch_tokens"] == sampled_in_branches <= sum(lens) <= sampled_in_branches + 2
    assert rec["tokens"] == len(script) + 1 + sampled_in_branches  # the titles, <|para|>, EOS and the branches

"""Training-data side of the transformers integration: examples from ASPD-format answers, the packing collator,
the special tokens, and the way back from decoder storage to text."""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("transformers")

import aspd_kernels.hf as ah  # noqa: E402
from aspd_kernels import AspdTokens, BranchLayout  # noqa: E402
from aspd_kernels.hf.synthetic import aspd_answer, byte_tokenizer, synthetic_dataset  # noqa: E402
from aspd_kernels.reference import positions_one  # noqa: E402
from aspd_kernels.tokens import TOKEN_STRINGS  # noqa: E402
from layouts import random_layout  # noqa: E402

T = AspdTokens(branch=1001, branch_end=1002, title=1003, title_end=1004, para=1005, para_end=1006)


def response(titles: list[list[int]], bodies: list[list[int]], before=(7, 8), after=(9,)) -> list[int]:
    out = list(before)
    for t in titles:
        out += [T.title, *t, T.title_end]
    out.append(T.para)
    for t, b in zip(titles, bodies):
        out += [T.branch, *t, *b, T.branch_end]
    return out + [T.para_end, *after]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


# ------------------------------------------------------------------------------------------------- build_example
def test_build_example_fields():
    prompt = [50, 51, 52]
    resp = response([[20], [21, 22]], [[30, 31, 32], [33]])
    ex = ah.build_example(prompt, resp, T)
    ids = prompt + resp
    assert ex["input_ids"].tolist() == ids
    lay = BranchLayout.from_aspd_tokens(ids, T)
    assert ex["segment"].tolist() == lay.segment.tolist()
    assert ex["branch"].tolist() == lay.branch.tolist()
    assert ex["segment"].dtype == ex["branch"].dtype == torch.int32
    assert ex["position_ids"].dtype == torch.int64
    assert ex["position_ids"].tolist() == lay.positions("same-sequential").tolist()

    labels = ex["labels"].tolist()
    assert labels[:3] == [-100] * 3  # prompt
    br = lay.branch.tolist()
    first_b2 = br.index(2)
    closer = ids.index(T.para_end)
    expect = list(ids)
    expect[:3] = [-100] * 3
    expect[first_b2] = -100  # follows branch 1's end in storage, not in generation
    expect[closer] = -100  # follows the last branch; the engine appends it
    assert labels == expect
    # branch 1's <|branch|> follows <|para|> in generation and in storage: kept
    assert labels[br.index(1)] == T.branch

    aspd_style = ah.build_example(prompt, resp, T, cross_branch_labels=True)["labels"].tolist()
    assert aspd_style == [-100] * 3 + resp


@pytest.mark.parametrize("strategy", ["same-sequential", "same-max", "fixed-length", "sequential"])
def test_build_example_strategies(strategy):
    resp = response([[20], [21], [22]], [[30] * 4, [31], [32] * 2])
    ex = ah.build_example([5, 6], resp, T, strategy=strategy)
    seg, br = ex["segment"].tolist(), ex["branch"].tolist()
    assert ex["position_ids"].tolist() == positions_one(seg, br, strategy, None)


def test_build_example_empty_prompt_and_errors():
    resp = response([[20]], [[30]])
    ex = ah.build_example([], resp, T, cross_branch_labels=True)
    assert ex["labels"][0] == -100 and ex["labels"][1:].tolist() == resp[1:]
    with pytest.raises(ValueError, match="empty"):
        ah.build_example([], [], T)
    with pytest.raises(ValueError, match="outside a branch"):
        ah.build_example([1], [T.branch_end], T)


def test_encode_example(tok):
    prompt, answer = synthetic_dataset(1, seed=4)[0]
    ex = ah.encode_example(tok, prompt, answer)
    n_prompt = len(tok.encode(prompt, add_special_tokens=False))
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert (ex["labels"][:n_prompt] == -100).all() and (ex["labels"][n_prompt:] != -100).any()
    assert int(ex["branch"].max()) == answer.count("<|branch|>")
    # the special tokens are single, unsplit ids
    tokens = AspdTokens.from_tokenizer(tok)
    assert int((ex["input_ids"] == tokens.branch).sum()) == answer.count("<|branch|>")


# ------------------------------------------------------------------------------------------------------- collator
def test_collator_packs_one_row():
    exs = [ah.build_example([50 + i] * (i + 1), response([[20]] * (i + 1), [[30] * (i + 2)] * (i + 1)), T)
           for i in range(3)]
    exs.append({"input_ids": torch.tensor([3, 4, 5, 6])})  # plain example: serial, 0..n-1
    batch = ah.AspdCollator()(exs)
    lengths = [len(e["input_ids"]) for e in exs]
    total = sum(lengths)
    for key in ("input_ids", "labels", "position_ids", "aspd_segment", "aspd_branch"):
        assert batch[key].shape == (1, total), key
    assert batch["aspd_segment"].dtype == batch["aspd_branch"].dtype == torch.int32
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    assert batch["cu_seq_lens_q"].tolist() == cu == batch["cu_seq_lens_k"].tolist()
    assert batch["max_length_q"] == batch["max_length_k"] == max(lengths)
    for i, e in enumerate(exs):
        a, b = cu[i], cu[i + 1]
        assert batch["input_ids"][0, a:b].tolist() == e["input_ids"].tolist()
        assert batch["labels"][0, a] == -100  # nothing predicts an example's first token
        assert batch["position_ids"][0, a] == 0
        if "segment" in e:
            assert batch["position_ids"][0, a:b].tolist() == e["position_ids"].tolist()
            assert batch["aspd_branch"][0, a:b].tolist() == e["branch"].tolist()
    assert batch["position_ids"][0, cu[3]:].tolist() == [0, 1, 2, 3]
    assert batch["labels"][0, cu[3]:].tolist() == [-100, 4, 5, 6]


def test_collator_errors_and_grouping():
    with pytest.raises(ValueError, match="no examples"):
        ah.AspdCollator()([])
    with pytest.raises(ValueError, match="labels has 2 entries"):
        ah.AspdCollator()([{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([1, 2])}])
    with pytest.raises(ValueError, match="max_tokens"):
        ah.AspdCollator(max_tokens=4)([{"input_ids": torch.arange(5)}])
    exs = [{"input_ids": torch.arange(n)} for n in (3, 4, 2, 9, 1, 1)]
    groups = ah.group_by_tokens(exs, 7)
    assert [[len(e["input_ids"]) for e in g] for g in groups] == [[3, 4], [2], [9], [1, 1]]


# ------------------------------------------------------------------------------------------------- special tokens
def test_add_aspd_tokens_resizes_embeddings():
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = byte_tokenizer(with_aspd_tokens=False)
    with pytest.raises(ValueError, match="lacks the ASPD tokens"):
        AspdTokens.from_tokenizer(tok)
    base = len(tok)
    cfg = LlamaConfig(vocab_size=base, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(cfg)
    old = model.get_input_embeddings().weight.detach().clone()
    tokens = ah.add_aspd_tokens(tok, model)
    assert sorted(tokens.as_tuple()) == list(range(base, base + 6))
    assert [tok.convert_ids_to_tokens(i) for i in tokens.as_tuple()] == list(TOKEN_STRINGS)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == base + 6 and model.get_output_embeddings().weight.shape[0] == base + 6
    assert torch.equal(emb[:base], old)
    assert torch.isfinite(emb).all()
    # idempotent; never split; decode back
    assert ah.add_aspd_tokens(tok, model) == tokens and len(tok) == base + 6
    text = "a<|para|><|branch|>b<|/branch|><|/para|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(tokens.branch) == 1 and ids.count(tokens.para_end) == 1
    assert tok.decode(ids) == text
    model(torch.tensor([ids]))


def test_add_aspd_tokens_no_resize_when_rows_to_spare():
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = byte_tokenizer(with_aspd_tokens=False)
    cfg = LlamaConfig(vocab_size=len(tok) + 64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(cfg)
    ah.add_aspd_tokens(tok, model)
    assert model.get_input_embeddings().weight.shape[0] == cfg.vocab_size


# ------------------------------------------------------------------------------------------------- reading order
@pytest.mark.parametrize("seed", range(6))
def test_reading_order_undoes_interleaving(seed):
    seg, br = random_layout(seed, max_tokens=150, storage="contiguous", max_branches=9)
    ids = torch.arange(seg.numel()) * 7 + 3
    perm = ah.interleaved_order(seg, br)
    iseg, ibr, iids = seg[perm], br[perm], ids[perm]
    # the interleaved layout is the one BranchLayout builds for the same sections
    assert (iseg == seg).all()  # sections keep their slots
    steps = BranchLayout.from_sections(_sections(seg, br), storage="interleaved")
    assert ibr.tolist() == steps.branch.tolist()
    r_ids, r_seg, r_br = ah.to_reading_order(iids, iseg, ibr)
    assert r_ids == ids.tolist() and r_seg == seg.tolist() and r_br == br.tolist()


def _sections(seg, br):
    out = []
    for s in sorted(set(seg.tolist())):
        b = br[seg == s]
        if int(b.max()) == 0:
            out.append(("serial", b.numel()))
        else:
            out.append(("parallel", [int((b == j).sum()) for j in range(1, int(b.max()) + 1)]))
    return out


def test_text_round_trip(tok):
    """text -> ids -> layout -> decoder's interleaved storage -> text."""
    tokens = AspdTokens.from_tokenizer(tok)
    rng = random.Random(0)
    for prompt, answer in synthetic_dataset(8, seed=9):
        text = prompt + answer
        ids = tok.encode(text, add_special_tokens=False)
        lay = BranchLayout.from_aspd_tokens(ids, tokens)
        perm = ah.interleaved_order(lay.segment, lay.branch)
        if int(lay.branch.max()) > 1:
            assert not torch.equal(perm, torch.arange(len(ids)))  # really stored differently
        stored = torch.tensor(ids)[perm]
        assert ah.layout_to_text(stored, lay.segment[perm], lay.branch[perm], tok) == text
        # a random mix (prompt chunk contiguous, rest interleaved) reads back the same
        mix = _mixed_order(lay, rng)
        assert ah.layout_to_text(torch.tensor(ids)[mix], lay.segment[mix], lay.branch[mix], tok) == text
    plain = ah.layout_to_text(stored, lay.segment[perm], lay.branch[perm], tok, skip_special_tokens=True)
    assert "<|branch|>" not in plain and "That is all." in plain


def _mixed_order(lay: BranchLayout, rng: random.Random) -> torch.Tensor:
    """A storage order in which every branch's first few tokens come as a contiguous chunk, the rest
    round-robin: what the decoder writes after prefilling the branch prompts together."""
    seg, br = lay.segment.tolist(), lay.branch.tolist()
    order: list[int] = []
    for s in sorted(set(seg)):
        idx = [i for i in range(len(seg)) if seg[i] == s]
        runs: dict[int, list[int]] = {}
        for i in idx:
            runs.setdefault(br[i], []).append(i)
        if list(runs) == [0]:
            order += runs[0]
            continue
        queues = [runs[j] for j in sorted(runs)]
        for q in queues:
            k = rng.randint(0, len(q))
            order += q[:k]
            del q[:k]
        while any(queues):
            for q in queues:
                if q:
                    order.append(q.pop(0))
    return torch.tensor(order)


def test_answer_format_parses():
    tok = byte_tokenizer()
    tokens = AspdTokens.from_tokenizer(tok)
    text = aspd_answer("cats", ["Food", "Sleep", "Sound"])
    lay = BranchLayout.from_aspd_tokens(tok.encode(text, add_special_tokens=False), tokens)
    assert sorted(lay.branch_lengths()[1]) == [1, 2, 3]

"""The model-driven engine (``ParallelDecoder.generate``) driven through two parallel sections by a logits processor
that, from each row's visible history only, forces the ASPD tokens: titles, ``<|para|>``, and ``<|/branch|>`` after
a title-dependent number of tokens. Everything else is the random model's own greedy choice."""
from __future__ import annotations

import pytest
import torch

from test_decoder_helpers import VOCAB, decoder, dense_logits, hf_greedy, predictor_rows, tiny_model
from test_decoder_helpers import one_thread  # noqa: F401  (autouse fixture)

from aspd_kernels import AspdTokens, BranchLayout
from aspd_kernels.decoder import Grammar

TK = AspdTokens(branch=290, branch_end=291, title=292, title_end=293, para=294, para_end=295)
SPECIAL = list(TK.as_tuple())
EOS = 299
BIG = 1e4
SECTIONS = (3, 2)  # branches of the first and second parallel section; none after
PROMPT = [5, 17, 33, 90, 4, 61]




def _branch_target(title_token: int) -> int:
    return 1 + title_token % 4


def _forced(h: list[int]) -> int | None:
    """The token the script forces after history ``h`` (None: the model chooses among ordinary tokens)."""
    last_open = max((i for i, t in enumerate(h) if t == TK.branch), default=-1)
    last_close = max((i for i, t in enumerate(h) if t == TK.para_end), default=-1)
    if last_open > last_close:  # inside a branch: [<|branch|>, title, body...]
        body = len(h) - last_open - 2
        return TK.branch_end if body >= _branch_target(h[last_open + 1]) else None
    done = h.count(TK.para_end)
    if done >= len(SECTIONS):
        return None
    seg = h[last_close + 1:] if last_close >= 0 else h[len(PROMPT):]
    if len(seg) == 1:
        return TK.title
    if len(seg) >= 2 and seg[-2] == TK.title:
        return TK.title_end
    if seg and seg[-1] == TK.title_end:
        return TK.title if seg.count(TK.title) < SECTIONS[done] else TK.para
    return None


def processor(logits: torch.Tensor, histories: list[list[int]]) -> torch.Tensor:
    out = logits.clone()
    for r, h in enumerate(histories):
        f = _forced(h)
        if f is None:
            out[r, SPECIAL + [EOS]] -= BIG
        else:
            out[r, f] += BIG
    return out


def _serial_bias(grammar: Grammar, h: list[int]) -> torch.Tensor:
    opened = max((i for i, t in enumerate(h) if t == TK.title), default=-1)
    closed = max((i for i, t in enumerate(h) if t == TK.title_end), default=-1)
    return grammar.serial_bias(h[-1], opened > closed)


@pytest.fixture(scope="module", params=("llama", "qwen2"))
def run(request):
    model = tiny_model(request.param, seed=3)
    dec = decoder(model)
    res = dec.generate(PROMPT, 60, TK, eos_token_id=EOS, max_branch_tokens=10, logits_processor=processor)
    return model, dec, res


def test_layout_and_sections(run):
    _, _, res = run
    seq = res.sequence.tolist()
    # storage is interleaved; read branch by branch (stable sort by section, branch) it is ASPD-format text
    order = sorted(range(len(seq)), key=lambda i: (int(res.segment[i]), int(res.branch[i])))
    lay = BranchLayout.from_aspd_tokens([seq[i] for i in order], TK)
    assert torch.equal(lay.segment, res.segment[order]) and torch.equal(lay.branch, res.branch[order])
    assert [len(s) for s in res.branches] == list(SECTIONS)
    # each branch prompt is <|branch|> + its title; its body length follows the title
    for s, section in enumerate(res.branches):
        seg_id = sorted({int(x) for x, b in zip(res.segment, res.branch) if b > 0})[s]
        for j, b in enumerate(section, start=1):
            slots = [i for i in range(len(seq)) if res.segment[i] == seg_id and res.branch[i] == j]
            prompt = [seq[i] for i in slots[:2]]
            assert prompt[0] == TK.branch
            assert [seq[i] for i in slots[2:]] == b
            assert len(b) == _branch_target(prompt[1]) + 1
    # serial resumes after each section with the engine's <|/para|>
    assert seq.count(TK.para_end) == len(SECTIONS)
    assert res.generated_tokens == 60 or seq[-1] == EOS
    assert res.suffix and all(t not in SPECIAL for t in res.suffix)


def test_grammar_held(run):
    _, _, res = run
    seq, br = res.sequence.tolist(), res.branch.tolist()
    for i in torch.nonzero(res.sampled).flatten().tolist():
        t = seq[i]
        if br[i] == 0:
            assert t not in (TK.branch, TK.branch_end, TK.para_end)
            if seq[i - 1] == TK.title_end:
                assert t in (TK.title, TK.para)
            if t == TK.para:
                assert seq[i - 1] == TK.title_end
        else:
            assert t not in (TK.branch, TK.title, TK.title_end, TK.para, TK.para_end)


def test_every_token_is_the_dense_argmax(run):
    model, dec, res = run
    grammar = Grammar(TK, VOCAB, torch.device("cpu"))
    logits = dense_logits(model, res)
    mask = res.layout.dense_mask()
    seq = res.sequence
    for slot, row in predictor_rows(res):
        h = seq[:row + 1][mask[row, :row + 1]].tolist()
        lg = processor(logits[row:row + 1], [h])[0]
        bias = grammar.branch if res.branch[slot] > 0 else _serial_bias(grammar, h)
        assert int((lg + bias).argmax()) == int(seq[slot]), slot


def test_first_section_branches_match_decoding_alone(run):
    """SPEC identity for the model-driven engine: branch j == greedy decoding of the text before the section +
    ``<|branch|> title_j`` alone (transformers, plain causal), under the same processor and branch grammar."""
    model, _, res = run
    grammar = Grammar(TK, VOCAB, torch.device("cpu"))
    seq = res.sequence.tolist()
    start = res.branch.tolist().index(1)
    for j, body in enumerate(res.branches[0], start=1):
        slots = [i for i in range(len(seq)) if res.branch[i] == j and res.segment[i] == res.segment[start]]
        ctx = seq[:start] + [seq[i] for i in slots[:2]]
        out = []
        while len(out) < 10:
            with torch.no_grad():
                lg = model(torch.tensor([ctx])).logits[0, -1].float()
            t = int((processor(lg[None], [ctx])[0] + grammar.branch).argmax())
            out.append(t)
            ctx.append(t)
            if t in (TK.branch_end, EOS):
                break
        assert out == body


def test_plain_prompt_without_titles_is_serial(run):
    """No title in sight: the grammar keeps <|para|> out and the engine is plain greedy decoding."""
    model, dec, _ = run
    res = dec.generate([3, 4, 5], 8, TK)
    assert res.branches == []
    allowed = hf_greedy(model, [3, 4, 5], 8, None)
    assert res.suffix == allowed or any(t in SPECIAL for t in allowed)
    assert all(t not in (TK.para, TK.branch, TK.branch_end, TK.para_end, TK.title_end) for t in res.suffix)


@pytest.mark.parametrize("strategy", ["same-max", "fixed-length", "sequential"])
def test_position_strategies_dense_argmax(run, strategy):
    """Other strategies change positions (and so tokens); each sampled token still equals the dense argmax under
    the positions the engine used, which are remap_positions of its layout."""
    from aspd_kernels import remap_positions

    model, dec, _ = run
    res = dec.generate(PROMPT, 40, TK, eos_token_id=EOS, max_branch_tokens=10, logits_processor=processor,
                       position_strategy=strategy)
    assert res.branches, "the script should open a section"
    width = None
    if strategy == "fixed-length":
        # every branch prompt is <|branch|> + one title token: 10 + 1 (a cut branch's <|/branch|>) + 2
        assert len(set(res.width)) == 1
        width = res.width[0]
        assert width == 13
    assert torch.equal(res.positions, remap_positions(res.segment, res.branch, strategy, width=width))
    grammar = Grammar(TK, VOCAB, torch.device("cpu"))
    logits = dense_logits(model, res)
    mask = res.layout.dense_mask()
    for slot, row in predictor_rows(res):
        h = res.sequence[:row + 1][mask[row, :row + 1]].tolist()
        bias = grammar.branch if res.branch[slot] > 0 else _serial_bias(grammar, h)
        assert int((processor(logits[row:row + 1], [h])[0] + bias).argmax()) == int(res.sequence[slot])


def test_budget_runs_out_inside_a_section(run):
    """max_new_tokens reached while branches are live: they are cut and closed with <|/branch|>, the section is
    closed with <|/para|> (fed, so every branch token is in the cache) and decoding stops."""
    _, dec, _ = run
    res = dec.generate(PROMPT, 12, TK, eos_token_id=EOS, max_branch_tokens=10, logits_processor=processor)
    # 11 serial tokens up to <|para|>, then one step of 3 branches overshoots the budget by 2
    assert res.generated_tokens == 14
    assert [len(b) for b in res.branches[0]] == [2, 2, 2]
    assert all(b[-1] == TK.branch_end for b in res.branches[0])
    assert res.sequence[-1] == TK.para_end and not res.sampled[-1]
    assert res.suffix == []
    # prompt, 10 serial steps, the section's prefill (with <|para|>), the closing pass
    assert res.forward_passes == 1 + 10 + 1 + 1


def test_batch_of_prompts_equals_one_by_one(run):
    """Two prompts in one batch: one may be inside a parallel section while the other decodes serially; each
    result equals its one-request run."""
    from aspd_kernels.decoder import ParallelDecoder

    model, dec, res = run
    other = [7, 8, 9, 10, 11, 12]  # the script reads the prompt length, so keep it
    batch_dec = ParallelDecoder.from_hf(model, max_seq_len=512, max_batch=2)
    got = batch_dec.generate_batch([other, PROMPT], 50, TK, eos_token_id=EOS, max_branch_tokens=10,
                                   logits_processor=processor)
    want = [dec.generate(p, 50, TK, eos_token_id=EOS, max_branch_tokens=10, logits_processor=processor)
            for p in (other, PROMPT)]
    for g, w in zip(got, want):
        assert g.branches == w.branches and g.suffix == w.suffix
        assert torch.equal(g.sequence, w.sequence) and torch.equal(g.positions, w.positions)
        assert [len(s) for s in g.branches] == list(SECTIONS)

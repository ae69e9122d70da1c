"""The training-free plan mode (``generate_plan``, Yu et al.'s three stages with no re-prefill) on tiny random
models. A logits processor plays the instruct model's part from each row's visible history only: it writes a plan
of three items (one with a two-token title), ends branch 1 on the next item marker and branch 2 on EOS, lets branch
3 run into the limit, and ends the conclusion on EOS; everything else is the random model's own greedy choice."""
from __future__ import annotations

import pytest
import torch

from test_decoder_helpers import VOCAB, decoder, dense_logits, predictor_rows, tiny_model
from test_decoder_helpers import one_thread  # noqa: F401  (autouse fixture)

from aspd_kernels import remap_positions
from aspd_kernels.decoder import PlanFormat, PlanGrammar

ITEM, END, COLON, DOTS, NL, EOS = 296, 297, 298, 250, 251, 289
FMT = PlanFormat(item_open=(ITEM,), title_end=(COLON,), placeholder=(DOTS, NL), plan_end=(END,),
                 branch_stop=(ITEM,), branch_close=(NL,), conclusion=(ITEM, END))
SPECIAL = [ITEM, END, COLON, DOTS, NL, EOS]
PROMPT = [5, 17, 33, 90, 4]
TITLES = [[10], [11, 12], [13]]
LIMIT = 5
BIG = 1e4


def _pairs(h: list[int]) -> list[int]:
    """Indices where ``item_open + plan_end`` starts: one after the plan, two once the conclusion's prompt is in."""
    return [i for i in range(len(h) - 1) if h[i] == ITEM and h[i + 1] == END]


def _forced(h: list[int]) -> int | None:
    pairs = _pairs(h)
    if not pairs:  # stage 1: two free tokens, then the items, then the plan's end
        g = h[len(PROMPT):]
        if len(g) < 2:
            return None
        if len(g) == 2:
            return ITEM
        if g[-1] == ITEM:
            items = g.count(COLON)
            return END if items == len(TITLES) else TITLES[items][0]
        opened = len(g) - 1 - g[::-1].index(ITEM)
        title, k = g[opened + 1:], g.count(COLON)
        if COLON not in title and k < len(TITLES):
            return TITLES[k][len(title)] if len(title) < len(TITLES[k]) else COLON
        return None
    if len(pairs) == 1:  # a branch: [ITEM, title..., COLON, body...]
        b = h[pairs[0] + 2:]
        title, body = b[1:b.index(COLON)], len(b) - b.index(COLON) - 1
        if title == TITLES[0] and body == 2:
            return ITEM
        if title == TITLES[1] and body == 3:
            return EOS
        return None
    return EOS if len(h) - pairs[1] - 2 == 3 else None  # the conclusion: three tokens, then EOS


def processor(logits: torch.Tensor, histories: list[list[int]]) -> torch.Tensor:
    out = logits.clone()
    for r, h in enumerate(histories):
        f = _forced(h)
        out[r, SPECIAL] -= BIG
        if f is not None:
            out[r, f] += 2 * BIG
    return out


@pytest.fixture(scope="module", params=("llama", "qwen2"))
def run(request):
    model = tiny_model(request.param, seed=7)
    dec = decoder(model)
    fed = []
    feed = dec._feed

    def recording(asks):  # every forward pass's new slots [fed, len)
        fed.append([(req.fed, len(req.tokens)) for req, _ in asks])
        return feed(asks)

    dec._feed = recording
    res = dec.generate_plan(PROMPT, FMT, max_plan_tokens=40, max_branch_tokens=LIMIT, max_conclusion_tokens=10,
                            eos_token_id=EOS, logits_processor=processor)
    del dec._feed
    return model, dec, res, fed


def test_three_stages(run):
    _, _, res, _ = run
    plan = res.plan
    assert plan[2:] == [ITEM, 10, COLON, DOTS, NL, ITEM, 11, 12, COLON, DOTS, NL, ITEM, 13, COLON, DOTS, NL,
                        ITEM, END]
    assert len(res.branches) == 1 and len(res.branches[0]) == 3
    on_stop, on_eos, cut = res.branches[0]
    assert len(on_stop) == 2 + 1 and len(on_eos) == 3 + 1 and len(cut) == LIMIT + 1
    assert all(b[-1] == NL and EOS not in b and ITEM not in b for b in res.branches[0])
    seq = res.sequence.tolist()
    n = len(PROMPT) + len(plan)
    assert seq[:n] == PROMPT + plan and res.branch[:n].eq(0).all()
    for j, title in enumerate(TITLES, start=1):
        slots = [i for i in range(len(seq)) if res.branch[i] == j]
        assert [seq[i] for i in slots] == [ITEM, *title, COLON] + res.branches[0][j - 1]
    tail = [seq[i] for i in range(len(seq)) if i >= n and res.branch[i] == 0]
    assert tail == [ITEM, END] + res.suffix and len(res.suffix) == 4 and res.suffix[-1] == EOS
    assert res.segment.unique().tolist() == [0, 1, 2]
    assert torch.equal(res.positions, remap_positions(res.segment, res.branch))


def test_branches_equal_decoding_alone(run):
    """Branch j == greedy decoding of prompt + plan + item j's prompt alone (transformers, causal, same processor),
    up to its stop token (dropped) or the limit."""
    model, _, res, _ = run
    ctx0 = PROMPT + res.plan
    for j, title in enumerate(TITLES):
        ctx, out = ctx0 + [ITEM, *title, COLON], []
        while len(out) < LIMIT:
            with torch.no_grad():
                lg = model(torch.tensor([ctx])).logits[0, -1].float()
            t = int(processor(lg[None], [ctx])[0].argmax())
            if t in (EOS, ITEM):
                break
            out.append(t)
            ctx.append(t)
        assert res.branches[0][j] == out + [NL], j


def test_every_token_is_the_dense_argmax(run):
    """Every sampled token, plan and conclusion included, is the argmax of a dense-mask forward over the final
    sequence (the plan's under the plan grammar replayed); the tokens a branch stopped on, dropped from the
    sequence, are the argmax at the branch's last slot."""
    model, _, res, _ = run
    logits = dense_logits(model, res)
    mask = res.layout.dense_mask()
    grammar = PlanGrammar(FMT, {EOS}, VOCAB, torch.device("cpu"), PROMPT)
    plan_bias = {}
    for k, t in enumerate(res.plan):
        plan_bias[len(PROMPT) + k] = grammar.bias()
        grammar.feed(t)
    assert grammar.complete and [(title, COLON) for title in TITLES] == grammar.items
    checked = 0
    for slot, row in predictor_rows(res):
        h = res.sequence[:row + 1][mask[row, :row + 1]].tolist()
        lg = processor(logits[row:row + 1], [h])[0]
        if plan_bias.get(slot) is not None:
            lg = lg + plan_bias[slot]
        assert int(lg.argmax()) == int(res.sequence[slot]), slot
        checked += 1
    assert checked == int(res.sampled.sum()) == len(res.plan) + sum(len(b) - 1 for b in res.branches[0]) + 4
    for j, stop in ((1, ITEM), (2, EOS)):
        last = max(i for i in range(len(res.sequence)) if res.branch[i] == j and res.sampled[i])
        h = res.sequence[:last + 1][mask[last, :last + 1]].tolist()
        assert int(processor(logits[last:last + 1], [h])[0].argmax()) == stop


def test_forward_passes_and_no_re_prefill(run):
    """Stage 1 + 1 + the longest branch + stage 3 forward passes, and every slot fed exactly once (the conclusion
    reads the branches' KV where it is), the last token never."""
    _, _, res, fed = run
    longest = max(3, 4, LIMIT)  # sampled per branch, the dropped stop token included
    assert res.forward_passes == len(res.plan) + 1 + longest + (len(res.suffix) - 1)
    assert len(fed) == res.forward_passes
    spans = [s for step in fed for s in step]
    assert spans[0][0] == 0 and all(a == e0 for (_, e0), (a, _) in zip(spans, spans[1:]))
    assert spans[-1][1] == len(res.sequence) - 1
    # the pass after the branches feeds their last sampled tokens, their branch_close and the conclusion's prompt
    branches_end = max(i for i in range(len(res.sequence)) if res.branch[i] > 0)
    closing = next(s for s in spans if s[0] <= branches_end < s[1])
    assert closing[1] - closing[0] == 1 + len(TITLES) * len(FMT.branch_close) + len(FMT.conclusion)


def test_batch_equals_one_by_one(run):
    from aspd_kernels.decoder import ParallelDecoder

    model, dec, res, _ = run
    other = [7, 8, 9, 10, 11]  # the processor reads the prompt's length
    batch = ParallelDecoder.from_hf(model, max_seq_len=512, max_batch=2)
    got = batch.generate_plan_batch([other, PROMPT], FMT, 40, LIMIT, 10, eos_token_id=EOS,
                                    logits_processor=processor)
    want = dec.generate_plan(other, FMT, 40, LIMIT, 10, eos_token_id=EOS, logits_processor=processor)
    for g, w in zip(got, (want, res)):
        assert g.plan == w.plan and g.branches == w.branches and g.suffix == w.suffix
        assert torch.equal(g.sequence, w.sequence) and torch.equal(g.positions, w.positions)


def test_no_plan_is_a_serial_answer(run):
    model, dec, _, _ = run
    eos_first = lambda lg, hs: processor(lg, hs).index_fill(1, torch.tensor([EOS]), 5 * BIG)  # noqa: E731
    res = dec.generate_plan(PROMPT, FMT, eos_token_id=EOS, logits_processor=eos_first)
    assert res.plan == [EOS] and res.suffix == [EOS] and res.branches == [] and res.forward_passes == 1
    # the budget runs out inside the plan: no section either
    res = dec.generate_plan(PROMPT, FMT, max_plan_tokens=6, eos_token_id=EOS, logits_processor=processor)
    assert len(res.plan) == 6 and res.branches == [] and res.branch.eq(0).all()


def test_fixed_length_width(run):
    _, dec, _, _ = run
    res = dec.generate_plan(PROMPT, FMT, 40, LIMIT, 10, eos_token_id=EOS, logits_processor=processor,
                            position_strategy="fixed-length")
    assert res.width == [LIMIT + 1 + 4]  # limit + branch_close + the longest prompt [ITEM, 11, 12, COLON]
    assert torch.equal(res.positions, remap_positions(res.segment, res.branch, "fixed-length", width=res.width[0]))
    with pytest.raises(ValueError, match="width=3"):
        dec.generate_plan(PROMPT, FMT, 40, LIMIT, 10, eos_token_id=EOS, logits_processor=processor,
                          position_strategy="fixed-length", width=3)


def test_grammar_keeps_the_list_in_form():
    g = PlanGrammar(FMT, {EOS}, VOCAB, torch.device("cpu"), [1, 2, ITEM])  # the prompt opens the first item
    assert g.state == "open"
    allowed = lambda: torch.isfinite(g.bias()).nonzero().flatten().tolist()  # noqa: E731
    assert EOS not in allowed() and COLON not in allowed() and END not in allowed()  # no empty plan or title
    for t in (20, 21):
        g.feed(t)
    assert EOS not in allowed() and COLON in allowed()
    g.feed(COLON)
    for t in (DOTS, NL, ITEM):  # forced: placeholder, then the next item marker
        assert allowed() == [t]
        g.feed(t)
    assert END in allowed()
    g.feed(END)
    assert g.complete and g.items == [([20, 21], COLON)]
    short = PlanGrammar(PlanFormat((ITEM,), (COLON,), (), (END,), max_title_tokens=2, max_items=1), set(), VOCAB,
                        torch.device("cpu"), [ITEM])
    for t in (20, 21):
        short.feed(t)
    assert torch.isfinite(short.bias()).nonzero().flatten().tolist() == [COLON]  # the title is long enough
    short.feed(COLON)
    short.feed(ITEM)
    assert torch.isfinite(short.bias()).nonzero().flatten().tolist() == [END]  # enough items


def test_bad_arguments(run):
    _, dec, _, _ = run
    with pytest.raises(ValueError, match="PlanFormat.item_open"):
        PlanFormat((), (COLON,), (), (END,))
    with pytest.raises(ValueError, match="PlanFormat.max_items"):
        PlanFormat((ITEM,), (COLON,), (), (END,), max_items=0)
    with pytest.raises(ValueError, match="plan holds token ids outside"):
        dec.generate_plan(PROMPT, PlanFormat((ITEM,), (VOCAB,), (), (END,)))
    with pytest.raises(ValueError, match="needs plan.conclusion"):
        dec.generate_plan(PROMPT, PlanFormat((ITEM,), (COLON,), (), (END,)))
    with pytest.raises(ValueError, match="max_plan_tokens"):
        dec.generate_plan(PROMPT, FMT, max_plan_tokens=0)
    with pytest.raises(TypeError, match="PlanFormat"):
        dec.generate_plan(PROMPT, "####")

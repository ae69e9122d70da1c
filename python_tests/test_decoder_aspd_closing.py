"""The model-driven engine's answer format: every branch ends with ``<|/branch|>`` (on ``<|/branch|>``, on EOS taken
as one, on the branch limit, on the request budget), no section token inside a branch even when the logits favour
one, ASPD's branch-prompt and post-section text placed, and the answer reads back through ``from_aspd_tokens`` to
the decoder's own layout."""
from __future__ import annotations

import pytest
import torch

from test_decoder_helpers import VOCAB, decoder, dense_logits, predictor_rows, tiny_model
from test_decoder_helpers import one_thread  # noqa: F401  (autouse fixture)

from aspd_kernels import AspdTokens, BranchLayout, remap_positions
from aspd_kernels.decoder import Grammar

SEP, AFTER = (7, 8), (9,)
TK = AspdTokens(branch=290, branch_end=291, title=292, title_end=293, para=294, para_end=295, title_sep=SEP,
                after_para=AFTER)
EOS = 299
BIG = 1e4
PROMPT = [5, 17, 33, 90]
# one title per way a branch can end: on <|/branch|> after 2 body tokens, on EOS after 3, never (the limit cuts it)
ENDS_ON_CLOSE, ENDS_ON_EOS, NEVER_ENDS = 10, 11, 12
PLAN = [TK.title, ENDS_ON_CLOSE, TK.title_end, TK.title, ENDS_ON_EOS, TK.title_end, TK.title, NEVER_ENDS,
        TK.title_end, TK.para]
LIMIT = 5
FORBIDDEN_IN_BRANCH = [TK.branch, TK.title, TK.title_end, TK.para, TK.para_end]


def processor(logits: torch.Tensor, histories: list[list[int]]) -> torch.Tensor:
    """From each row's visible history: the plan above in serial text; inside a branch, the title's ending, and
    otherwise every section token pushed to the top (the grammar has to keep them out)."""
    out = logits.clone()
    for r, h in enumerate(histories):
        opened = max((i for i, t in enumerate(h) if t == TK.branch), default=-1)
        if opened >= 0 and TK.para_end not in h[opened:]:
            title, body = h[opened + 1], len(h) - opened - 2 - len(SEP)
            out[r, [EOS, TK.branch_end]] -= BIG
            if title == ENDS_ON_CLOSE and body == 2:
                out[r, TK.branch_end] += 2 * BIG
            elif title == ENDS_ON_EOS and body == 3:
                out[r, EOS] += 2 * BIG
            else:
                out[r, FORBIDDEN_IN_BRANCH] += BIG
            continue
        done = len(h) - len(PROMPT)
        if TK.para_end in h:  # after the section: three free tokens, then EOS
            after = len(h) - h.index(TK.para_end) - 1 - len(AFTER)
            out[r, list(TK.as_tuple()) + [EOS]] -= BIG
            if after == 3:
                out[r, EOS] += 3 * BIG
        elif done < len(PLAN):
            out[r, PLAN[done]] += BIG
    return out


@pytest.fixture(scope="module", params=("llama", "qwen2"))
def model_dec(request):
    model = tiny_model(request.param, seed=5)
    return model, decoder(model)


def _reads_back(res) -> None:
    """Read branch by branch (stable sort of the slots by section, branch), the decoded answer is ASPD-format text
    whose parse is the decoder's layout, positions included."""
    order = sorted(range(len(res.sequence)), key=lambda i: (int(res.segment[i]), int(res.branch[i])))
    lay = BranchLayout.from_aspd_tokens(res.sequence[order], TK)
    assert torch.equal(lay.segment, res.segment[order]) and torch.equal(lay.branch, res.branch[order])
    if res.position_strategy == "same-sequential":
        assert torch.equal(lay.positions(), res.positions[order])


def _branch_slots(res, j: int) -> list[int]:
    seg = int(res.segment[res.branch.tolist().index(1)])
    return [i for i in range(len(res.sequence)) if res.segment[i] == seg and res.branch[i] == j]


def test_every_branch_closed_and_read_back(model_dec):
    model, dec = model_dec
    res = dec.generate(PROMPT, 60, TK, eos_token_id=EOS, max_branch_tokens=LIMIT, logits_processor=processor)
    seq = res.sequence.tolist()
    assert len(res.branches) == 1 and len(res.branches[0]) == 3
    on_close, on_eos, cut = res.branches[0]
    assert len(on_close) == 3 and len(on_eos) == 4 and len(cut) == LIMIT + 1
    for j, b in enumerate(res.branches[0], start=1):
        slots = _branch_slots(res, j)
        assert [seq[i] for i in slots[:2 + len(SEP)]][2:] == list(SEP)  # <|branch|> title ": "
        assert [seq[i] for i in slots[2 + len(SEP):]] == b
        assert b[-1] == TK.branch_end and TK.branch_end not in b[:-1]
        assert EOS not in b and not set(b) & set(FORBIDDEN_IN_BRANCH)
    # the <|/branch|> that ends each branch: sampled, taken for EOS, appended after the limit
    assert [bool(res.sampled[_branch_slots(res, j)[-1]]) for j in (1, 2, 3)] == [True, False, False]
    # after the section: <|/para|>, ASPD's "\n", then serial text over every branch, up to EOS
    close = seq.index(TK.para_end)
    assert seq[close + 1:close + 1 + len(AFTER)] == list(AFTER) and res.branch[close] == 0
    assert len(res.suffix) == 4 and res.suffix[-1] == EOS
    assert torch.equal(res.positions, remap_positions(res.segment, res.branch))
    _reads_back(res)

    # every sampled token is the dense-mask argmax under the grammar; the slot taken for EOS was EOS's argmax
    grammar = Grammar(TK, VOCAB, torch.device("cpu"))
    logits = dense_logits(model, res)
    mask = res.layout.dense_mask()
    sampled = res.sampled.clone()
    eos_slot = _branch_slots(res, 2)[-1]
    sampled[eos_slot] = True
    res.sampled = sampled
    for slot, row in predictor_rows(res):
        h = res.sequence[:row + 1][mask[row, :row + 1]].tolist()
        lg = processor(logits[row:row + 1], [h])[0]
        if res.branch[slot] > 0:
            lg = lg + grammar.branch
        else:
            opened = max((i for i, t in enumerate(h) if t == TK.title), default=-1)
            lg = lg + grammar.serial_bias(h[-1], opened > max((i for i, t in enumerate(h) if t == TK.title_end),
                                                               default=-1))
        want = EOS if slot == eos_slot else int(res.sequence[slot])
        assert int(lg.argmax()) == want, slot


def test_budget_cut_closes_every_branch(model_dec):
    _, dec = model_dec
    # the plan's 10 serial tokens, then one step of the three branches exhausts the budget
    res = dec.generate(PROMPT, len(PLAN) + 1, TK, eos_token_id=EOS, max_branch_tokens=LIMIT,
                       logits_processor=processor)
    assert [len(b) for b in res.branches[0]] == [2, 2, 2]
    assert all(b[-1] == TK.branch_end for b in res.branches[0])
    assert res.sequence.tolist()[-1 - len(AFTER):] == [TK.para_end, *AFTER]
    _reads_back(res)


@pytest.mark.parametrize("strategy", ["same-max", "fixed-length"])
def test_closed_branches_under_other_strategies(model_dec, strategy):
    _, dec = model_dec
    res = dec.generate(PROMPT, 60, TK, eos_token_id=EOS, max_branch_tokens=LIMIT, logits_processor=processor,
                       position_strategy=strategy)
    width = None
    if strategy == "fixed-length":
        width = res.width[0]
        assert width == LIMIT + 1 + 2 + len(SEP)  # the longest branch: limit + <|/branch|>, prompt of 4
    assert torch.equal(res.positions, remap_positions(res.segment, res.branch, strategy, width=width))
    _reads_back(res)


def test_title_sep_and_after_para_checked(model_dec):
    _, dec = model_dec
    bad = AspdTokens(290, 291, 292, 293, 294, 295, title_sep=(VOCAB,))
    with pytest.raises(ValueError, match="title_sep/after_para"):
        dec.generate(PROMPT, 4, bad)
    assert TK.title_sep == SEP and AspdTokens(1, 2, 3, 4, 5, 6, [7], [8]).after_para == (8,)

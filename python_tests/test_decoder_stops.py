"""What a caller meets around the decoding loops, on a tiny random Llama: per-branch stop rules (a branch stops at
its stop token or string, its siblings go on, and it still equals decoding alone), the reason decoding stopped, the
up-front slot checks and the text kept when the slots run out, one result shape for every mode, and arguments
named in errors."""
from __future__ import annotations

import pytest

from test_decoder_helpers import decoder, tiny_model
from test_decoder_helpers import one_thread  # noqa: F401  (autouse fixture)

from aspd_kernels import AspdTokens
from aspd_kernels.decoder import PlanFormat

PREFIX = [5, 17, 33, 90]
PROMPTS = [[7, 8], [9], [10, 11, 12]]
L = 8


class WordTok:
    """``decode`` as a word-level tokenizer would: token t is the word ``w<t>``."""

    @staticmethod
    def decode(ids):
        return " ".join(f"w{t}" for t in ids)


@pytest.fixture(scope="module")
def dec():
    return decoder(tiny_model("llama", seed=3))


@pytest.fixture(scope="module")
def free(dec):
    """The branches with no stop rule: every branch runs to L."""
    res = dec.generate_branches(PREFIX, PROMPTS, L)
    assert [len(b) for b in res.branches] == [L] * 3 and res.stop_reason == "max_new_tokens"
    return res.branches


def test_a_branch_stops_at_its_stop_token(dec, free):
    stop = free[0][2]  # branch 1's third token: it stops there, at the first occurrence
    k = free[0].index(stop)
    res = dec.generate_branches(PREFIX, PROMPTS, L, stop_token_ids=[[stop], None, []])
    assert res.branches[0] == free[0][:k + 1]
    assert res.branches[1:] == free[1:]  # the siblings go on, unaffected
    # identity: branch 1 equals decoding prefix + its prompt alone with the stop token as its end
    alone = dec.generate_serial(PREFIX + PROMPTS[0], L, eos_token_id=stop)
    assert alone.suffix == res.branches[0]
    assert res.stop_reason == "max_new_tokens"  # the siblings ran into the limit


def test_one_stop_list_for_every_branch(dec, free):
    stops = [free[0][1], free[1][3], free[2][5]]
    res = dec.generate_branches(PREFIX, PROMPTS, L, stop_token_ids=stops)
    for j, b in enumerate(res.branches):
        k = min(free[j].index(t) for t in stops if t in free[j])
        assert b == free[j][:k + 1]
        assert b == dec.generate_serial(PREFIX + PROMPTS[j], L, eos_token_id=stops).suffix
    assert res.stop_reason == "stop"
    # forward passes follow the longest branch: prefix, branch prompts, one per token of the longest
    assert res.forward_passes == 1 + 1 + max(map(len, res.branches))


def test_stop_strings(dec, free):
    word = f"w{free[2][1]}"
    res = dec.generate_branches(PREFIX, PROMPTS, L, stop_strings=[[], [], [word]], tokenizer=WordTok())
    k = free[2].index(free[2][1])
    assert res.branches[2] == free[2][:k + 1] and res.branches[:2] == free[:2]
    # the same string for every branch, spelled as one string
    res = dec.generate_branches(PREFIX, PROMPTS, L, stop_strings=word, tokenizer=WordTok())
    for j, b in enumerate(res.branches):
        text = WordTok.decode(b)
        assert (word in text) == (word in WordTok.decode(free[j]))
        assert word not in WordTok.decode(b[:-1])


def test_stop_rule_errors(dec):
    with pytest.raises(ValueError, match="stop_token_ids gives 2 per-branch lists for 3 branches"):
        dec.generate_branches(PREFIX, PROMPTS, L, stop_token_ids=[[1], [2]])
    with pytest.raises(ValueError, match="stop_strings needs tokenizer"):
        dec.generate_branches(PREFIX, PROMPTS, L, stop_strings="\n")
    with pytest.raises(ValueError, match="stop_strings holds an empty string"):
        dec.generate_branches(PREFIX, PROMPTS, L, stop_strings=[""], tokenizer=WordTok())
    with pytest.raises(ValueError, match=r"stop_token_ids\[1\] holds token ids outside"):
        dec.generate_branches(PREFIX, PROMPTS, L, stop_token_ids=[[1], [10**6], []])
    with pytest.raises(ValueError, match="not a mix"):
        dec.generate_branches(PREFIX, PROMPTS, L, stop_token_ids=[1, [2], 3])


def test_text_where_ids_belong_names_the_argument(dec):
    with pytest.raises(ValueError, match="prefix_ids must be token ids.*encode it"):
        dec.generate_branches("Give three tips.", PROMPTS, L)
    with pytest.raises(ValueError, match=r"branch_prompts\[0\] must be token ids.*'1\.'"):
        dec.generate_branches(PREFIX, ["1.", "2."], L)
    with pytest.raises(ValueError, match="branch_prompts must be a list of token-id lists, one per branch, got str"):
        dec.generate_branches(PREFIX, "1.", L)
    with pytest.raises(ValueError, match="prompt_ids must be token ids"):
        dec.generate_serial("hello", 4)
    with pytest.raises(ValueError, match=r"prefix_ids must be a sequence of token ids.*float"):
        dec.generate_branches([1.5, 2], PROMPTS, L)
    with pytest.raises(ValueError, match="eos_token_id must be a token id"):
        dec.generate_serial(PREFIX, 4, eos_token_id="<eos>")


def test_up_front_slot_checks():
    small = decoder(tiny_model("llama", seed=3), max_seq_len=24)
    with pytest.raises(ValueError, match=r"prompt_ids \(4 tokens\) \+ max_new_tokens \(21\) exceed max_seq_len=24"):
        small.generate_serial(PREFIX, 21)
    assert len(small.generate_serial(PREFIX, 20).suffix) == 20
    fmt = PlanFormat((296,), (298,), (), (297,))
    with pytest.raises(ValueError, match=r"prompt_ids \(4 tokens\) \+ max_plan_tokens \(30\) exceed"):
        small.generate_plan(PREFIX, fmt, max_plan_tokens=30, max_conclusion_tokens=0)
    with pytest.raises(ValueError, match="request may need"):
        small.generate_branches(PREFIX, PROMPTS, 8)
    with pytest.raises(ValueError, match="prompt_ids holds 24 tokens, which leaves no slot"):
        small.generate(list(range(1, 25)), 4, AspdTokens(*range(290, 296)))


def _forcing(plan: list[int]):
    """A logits processor that writes ``plan`` in serial text (by history length) and then leaves the model free."""
    def proc(logits, histories):
        out = logits.clone()
        for r, h in enumerate(histories):
            done = len(h) - len(PREFIX)
            if 0 <= done < len(plan) and 294 not in h[len(PREFIX):len(PREFIX) + done]:
                out[r, plan[done]] += 1e4
        return out
    return proc


def test_model_driven_keeps_its_text_when_the_slots_run_out():
    tk = AspdTokens(branch=290, branch_end=291, title=292, title_end=293, para=294, para_end=295)
    plan = [292, 10, 293, 292, 11, 293, 294]  # two titles, then <|para|>
    big = decoder(tiny_model("llama", seed=3), max_seq_len=512)
    free = big.generate(PREFIX, 60, tk, max_branch_tokens=12, logits_processor=_forcing(plan))
    assert len(free.sections) == 1 and free.stop_reason == "max_new_tokens"
    n = 30
    small = decoder(tiny_model("llama", seed=3), max_seq_len=n)
    res = small.generate(PREFIX, 60, tk, max_branch_tokens=12, logits_processor=_forcing(plan))
    assert res.stop_reason == "max_seq_len" and len(res.sequence) <= n
    assert res.sections and all(b[-1] == tk.branch_end for b in res.sections[0])  # the section still closes
    # what was decoded is what the roomy run decoded, up to the lowered branch limit
    for b, want in zip(res.sections[0], free.sections[0]):
        assert b[:-1] == want[:len(b) - 1]


def test_plan_lowers_the_branch_limit_to_fit(dec):
    fmt = PlanFormat((296,), (298,), (), (297,), branch_close=(251,), conclusion=(296, 297))
    plan = [296, 10, 298, 296, 11, 298, 296, 297]

    def run(d):
        return d.generate_plan(PREFIX, fmt, 20, 10, 3, logits_processor=_forcing(plan))

    free = run(dec)
    assert free.plan_found and free.parallel and free.stop_reason == "max_new_tokens"
    small = decoder(tiny_model("llama", seed=3), max_seq_len=30)
    res = run(small)
    assert res.plan_found and res.stop_reason == "max_seq_len" and len(res.sequence) <= 30
    assert len(res.suffix) == 3  # the conclusion kept its room
    for b, want in zip(res.sections[0], free.sections[0]):
        assert b[-1] == 251 and b[:-1] == want[:len(b) - 1] and len(b) - 1 < 10


def test_one_shape_for_every_mode(dec):
    serial = dec.generate_serial(PREFIX, 3)
    assert serial.mode == "serial" and serial.sections == [] and not serial.parallel
    br = dec.generate_branches(PREFIX, PROMPTS, 2)
    assert br.mode == "branches" and br.sections == [br.branches] and br.parallel
    assert [len(b) for b in br.branches] == [2, 2, 2]  # res.branches keeps its flat shape in this mode
    fmt = PlanFormat((296,), (298,), (), (297,))
    found = dec.generate_plan(PREFIX, fmt, 20, 3, 0, logits_processor=_forcing([296, 10, 298, 296, 297]))
    assert found.mode == "plan" and found.sections == found.branches and len(found.sections[0]) == 1
    assert found.plan_found is True and serial.plan_found is None


def test_plan_not_found_is_said(dec):
    fmt = PlanFormat((296,), (298,), (), (297,))
    eos_first = lambda lg, hs: lg.index_fill(1, __import__("torch").tensor([299]), 1e4)  # noqa: E731
    res = dec.generate_plan(PREFIX, fmt, 20, 3, 0, eos_token_id=299, logits_processor=eos_first)
    assert res.plan_found is False and res.sections == [] and not res.parallel and res.stop_reason == "eos"
    no_items = lambda lg, hs: lg.index_fill(1, __import__("torch").tensor([296]), -1e4)  # noqa: E731
    res = dec.generate_plan(PREFIX, fmt, 5, 3, 0, logits_processor=no_items)
    assert res.plan_found is False and len(res.plan) == 5 and res.stop_reason == "max_new_tokens"

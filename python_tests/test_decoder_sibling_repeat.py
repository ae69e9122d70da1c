"""decoder.processors.no_sibling_repeat: sibling branches of one section may not write the same n-gram; serial
rows and other sections are untouched; a finished sibling still counts. Then end to end through model-driven
``generate`` on a tiny random model: the rule holds in the answer and the answer still parses."""
import torch

from aspd_kernels.decoder import no_sibling_repeat
from aspd_kernels import BranchLayout
from aspd_kernels.tokens import AspdTokens

BIG, EOS = 1e4, 299

T = AspdTokens(branch=90, branch_end=91, title=92, title_end=93, para=94, para_end=95)
V = 100
PRE = [1, 2, 92, 7, 93, 92, 8, 93, 94]


def _logits(rows):
    return torch.zeros(rows, V)


def test_serial_rows_are_left_alone():
    proc = no_sibling_repeat(T, n=2)
    lg = _logits(1)
    assert proc(lg, [[1, 2, 3, 4]]) is lg


def test_a_sibling_bigram_is_banned_and_only_for_the_other_branch():
    proc = no_sibling_repeat(T, n=2)
    a, b = PRE + [90, 7, 5, 6], PRE + [90, 8, 5]
    out = proc(_logits(2), [a, b])
    # b ends with 5; its sibling wrote "5 6", so 6 is banned for b; a ends with 6, b never wrote "6 x"
    assert out[1, 6] == float("-inf") and torch.isfinite(out[1]).sum() == V - 1
    assert torch.isfinite(out[0]).all()


def test_a_finished_sibling_still_counts_and_other_sections_do_not():
    proc = no_sibling_repeat(T, n=3)
    a, b = PRE + [90, 7, 11, 12, 13], PRE + [90, 8, 40]
    proc(_logits(2), [a, b])
    # a finished; b now ends with "11 12": a's "11 12 13" bans 13
    out = proc(_logits(1), [PRE + [90, 8, 40, 11, 12]])
    assert out[0, 13] == float("-inf") and torch.isfinite(out[0]).sum() == V - 1
    # a branch of another section (a different shared history) is not a sibling
    other = [1, 3, 92, 7, 93, 94, 90, 7, 11, 12]
    assert torch.isfinite(proc(_logits(1), [other])).all()
    # a serial row after the section (its history closes the branch) is left alone
    serial = PRE + [90, 7, 11, 12, 13, 91, 95, 11, 12]
    assert torch.isfinite(proc(_logits(1), [serial])).all()


def _forcing(tk: AspdTokens, plan: list[int], prompt_len: int, body: list[int]):
    """The serial text follows ``plan`` (three titles, then ``<|para|>``); every branch is pushed to write the
    same ``body``, then to close: without the rule, the three siblings would be identical."""
    def proc(logits, histories):
        out = logits.clone()
        for r, h in enumerate(histories):
            opened = max((i for i, t in enumerate(h) if t == tk.branch), default=-1)
            if opened >= 0 and tk.para_end not in h[opened:]:
                k = len(h) - opened - 2
                out[r, list(tk.as_tuple())] -= BIG
                out[r, body[k] if k < len(body) else tk.branch_end] += BIG
            elif tk.para_end in h:
                out[r, EOS] += BIG
            elif len(h) - prompt_len < len(plan):
                out[r, plan[len(h) - prompt_len]] += BIG
        return out
    return proc


def test_generate_keeps_the_rule_and_parses():
    from test_decoder_helpers import decoder, tiny_model

    tk = AspdTokens(branch=290, branch_end=291, title=292, title_end=293, para=294, para_end=295)
    prompt = [5, 17, 33]
    plan = [tk.title, 10, tk.title_end, tk.title, 11, tk.title_end, tk.title, 12, tk.title_end, tk.para]
    body = [40, 41, 42, 43, 44, 45]
    dec = decoder(tiny_model("llama", seed=3))
    force = _forcing(tk, plan, len(prompt), body)
    same = dec.generate(prompt, 60, tk, eos_token_id=EOS, max_branch_tokens=8, logits_processor=force)
    assert [b[:len(body)] for b in same.branches[0]] == [body] * 3  # the forcing works: siblings identical
    n = 3
    rule = no_sibling_repeat(tk, n)
    res = dec.generate(prompt, 60, tk, eos_token_id=EOS, max_branch_tokens=8,
                       logits_processor=lambda lg, hs: rule(force(lg, hs), hs))
    (sec,) = res.branches
    assert len(sec) == 3 and sec[0][:len(body)] == body  # the first branch is untouched until a sibling repeats
    grams = [{tuple(b[i:i + n]) for i in range(len(b) - n + 1)} for b in sec]
    assert all(not grams[j] & grams[k] for j in range(3) for k in range(j + 1, 3)), sec
    order = sorted(range(len(res.sequence)), key=lambda i: (int(res.segment[i]), int(res.branch[i])))
    lay = BranchLayout.from_aspd_tokens(res.sequence[order], tk)
    assert torch.equal(lay.branch, res.branch[order])

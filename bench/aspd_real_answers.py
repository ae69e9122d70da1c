"""One answer of the real-model ASPD evaluation as a record: its text read in order, whether it parses back, its
sections, repetition among sibling branches, timing and forward passes (``bench_aspd_real.py`` runs them)."""
from __future__ import annotations

import torch

from aspd_kernels.data.aspd_text import default_style, read_back
from aspd_kernels.data.rules import repeated_pairs
from aspd_kernels.hf.text import to_reading_order
from aspd_kernels.layout import BranchLayout


def _base(res, mode: str, prompt_len: int) -> dict:
    return {"mode": mode, "s": res.total_s, "tokens": res.generated_tokens, "forward_passes": res.forward_passes,
            "prompt_tokens": prompt_len, "stop": res.stop_reason}


def serial_record(tok, res, prompt_len: int, mode: str, eos: int) -> dict:
    ids = [t for t in res.suffix if t != eos]
    r = _base(res, mode, prompt_len)
    r.update(text=tok.decode(ids, skip_special_tokens=True), sections=[], parses=True, repeats=[],
             branch_tokens=0)
    return r


def aspd_record(tok, tokens, res, prompt_len: int, mode: str, eos: int) -> dict:
    """A ``generate`` result: the answer's slots in reading order must parse back (``from_aspd_tokens``) to the
    decoder's own branch ids; the text is :func:`read_back` with numbered items."""
    ids, seg, br = to_reading_order(res.sequence, res.segment, res.branch)
    ids, seg, br = ids[prompt_len:], seg[prompt_len:], br[prompt_len:]
    ids_clean = [t for t in ids if t != eos]
    parses = True
    try:
        lay = BranchLayout.from_aspd_tokens(ids, tokens)
        parses = lay.branch.tolist() == br
        text = read_back(tok, tokens, ids_clean)
    except ValueError:
        parses, text = False, tok.decode(ids_clean, skip_special_tokens=True)
    r = _base(res, mode, prompt_len)
    texts = [[tok.decode(b, skip_special_tokens=True) for b in sec] for sec in res.branches]
    lens = [[len(b) for b in sec] for sec in res.branches]
    # branch_tokens (p's numerator): the tokens sampled inside branches, not the branch slots, which also hold
    # each branch's prompt (<|branch|> + title + ":", fed in one pass) and the <|/branch|> appended where a limit
    # cut a branch
    sampled = int((res.sampled.bool() & (res.branch > 0)).sum())
    r.update(text=text, sections=[len(s) for s in res.branches], parses=parses,
             repeats=[bool(repeated_pairs(t)) for t in texts], branch_tokens=sampled,
             branch_lens=lens, branches=texts)
    return r


def plan_record(tok, res, prompt_len: int, mode: str, eos: int) -> dict:
    """A ``generate_plan`` result. With a plan: the text is the plan's lead-in (before its first ``####``), the
    branches as numbered items, then the conclusion; without one it is the serial answer."""
    r = _base(res, mode, prompt_len)
    if not res.branches:
        plan = [t for t in res.plan if t != eos]
        r.update(text=tok.decode(plan, skip_special_tokens=True), sections=[], parses=True, repeats=[],
                 branch_tokens=0, usable_plan=False)
        return r
    lead = tok.decode(res.plan, skip_special_tokens=True).split("####")[0]
    bodies = [tok.decode([t for t in b if t != eos], skip_special_tokens=True).strip() for b in res.branches]
    markers, sep = default_style(len(bodies))
    conclusion = tok.decode([t for t in res.suffix if t != eos], skip_special_tokens=True).replace("####%%%%", "")
    text = lead + sep.join(m + b for m, b in zip(markers, bodies)) + ("\n\n" + conclusion.strip()
                                                                     if conclusion.strip() else "")
    lens = [len(b) for b in res.branches]
    r.update(text=text, sections=[len(bodies)], parses=True, repeats=[bool(repeated_pairs(bodies))],
             branch_tokens=sum(lens), branch_lens=[lens], usable_plan=True, branches=[bodies])
    return r


@torch.no_grad()
def mean_logprob(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Mean log-probability (nats per token) ``model`` gives ``answer_ids`` after ``prompt_ids``."""
    if not answer_ids:
        return float("nan")
    ids = torch.tensor([prompt_ids + answer_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float(), -1)
    return float(logp.gather(1, torch.tensor(answer_ids)[:, None]).mean())

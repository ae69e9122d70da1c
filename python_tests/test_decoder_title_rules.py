"""Model-driven ``generate``: a title may not end the answer (no EOS inside an open title) and is closed after
``max_title_tokens`` tokens, so an answer always reads back with its titles; the same rule in the serial-grammar
entry the vLLM engine sends (``vllm.grammar.serial``)."""
import torch

from test_decoder_helpers import decoder, tiny_model
from test_decoder_helpers import one_thread  # noqa: F401  (autouse fixture)

from aspd_kernels import BranchLayout
from aspd_kernels.decoder.sampling import Grammar, open_title
from aspd_kernels.tokens import AspdTokens

TK = AspdTokens(branch=290, branch_end=291, title=292, title_end=293, para=294, para_end=295)
EOS, BIG, WORD = 299, 1e4, 10


def _pushy(logits, histories):
    """Opens a title, then pushes EOS inside it (the grammar must refuse), a title word second."""
    out = logits.clone()
    for r, h in enumerate(histories):
        if TK.branch in h and TK.branch_end not in h[max(i for i, t in enumerate(h) if t == TK.branch):]:
            out[r, TK.branch_end] += BIG
        elif TK.para_end in h:
            out[r, EOS] += BIG
        elif open_title(h, TK) is not None:
            out[r, EOS] += 2 * BIG
            out[r, WORD] += BIG
        elif h[-1] == TK.title_end:
            out[r, TK.para] += BIG
        else:
            out[r, TK.title] += BIG
    return out


def test_open_title_counts_tokens_since_the_open_title():
    assert open_title([1, 2], TK) is None and open_title([1, TK.title], TK) == 0
    assert open_title([TK.title, 5, 6], TK) == 2 and open_title([TK.title, 5, TK.title_end, 7], TK) is None


def test_no_eos_in_a_title_and_a_long_title_is_closed():
    dec = decoder(tiny_model("llama", seed=2))
    prompt = [5, 17, 33]
    res = dec.generate(prompt, 40, TK, eos_token_id=EOS, max_branch_tokens=4, logits_processor=_pushy,
                       max_title_tokens=3)
    order = sorted(range(len(res.sequence)), key=lambda i: (int(res.segment[i]), int(res.branch[i])))
    ids = res.sequence[order].tolist()[len(prompt):]
    assert ids[:6] == [TK.title, WORD, WORD, WORD, TK.title_end, TK.para], ids
    assert ids[-1] == EOS and res.stop_reason == "eos" and len(res.branches) == 1
    lay = BranchLayout.from_aspd_tokens(res.sequence[order], TK)
    assert torch.equal(lay.branch, res.branch[order])


def test_grammar_masks_and_the_vllm_entry():
    g = Grammar(TK, 300, torch.device("cpu"), stop_ids={EOS, 10_000}, max_title_tokens=2)
    assert g.stop_ids == (EOS,)  # ids outside the vocabulary are no stop of this model
    assert g.serial_bias_after([1, TK.title, 7])[EOS] == float("-inf")
    closing = g.serial_bias_after([1, TK.title, 7, 8])
    assert closing[TK.title_end] == 0 and torch.isinf(closing).sum() == 299
    assert g.serial_bias_after([1, 2])[EOS] == 0
    try:
        from aspd_kernels.vllm import grammar as vg
    except ImportError:  # vLLM is not installed: only the decoder side applies
        return
    assert vg.serial(g) == {vg.SERIAL: [290, 291, 292, 293, 294, 295, 2, EOS]}

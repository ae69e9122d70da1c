"""bench_aspd_real's summary on hand-made records: speedups, Amdahl share, repetition and the no_sibling_repeat
variant's rows; and aspd_kernels.cpu's dtype choice."""
import pytest
import torch

from aspd_kernels.cpu import native_bf16, resolve_dtype
from bench.aspd_real_report import table
from bench.bench_aspd_real import NR, summarize


def _rec(i, mode, s, tokens, fp, sections=(), branch_tokens=0, repeats=(), ll=-1.0, lst=True, stop="eos",
         lens=()):
    return {"id": i, "mode": mode, "s": s, "cpu_s": s, "tokens": tokens, "forward_passes": fp, "stop": stop,
            "branch_lens": [list(x) for x in lens],
            "sections": list(sections), "branch_tokens": branch_tokens, "repeats": list(repeats), "parses": True,
            "base_logprob": ll, "list": lst, "prompt": f"p{i}", "text": "t"}


def _records(with_nr: bool):
    recs = []
    for i, (sa, ss) in enumerate([(2.0, 3.0), (1.0, 2.0)]):
        # prompt 1's parallel answer ran into the token budget: its pair leaves the "both ended" figures
        recs += [_rec(i, "ft-aspd", sa, 100, 50, [4], 80, [i == 0], ll=-1.2 - i, stop=("eos", "max_new_tokens")[i],
                      lens=[(30, 20, 20, 10)]),
                 _rec(i, "ft-serial", ss, 90, 90, ll=-1.0), _rec(i, "base-serial", 3.0, 95, 95, ll=-0.8),
                 _rec(i, "base-plan", 1.5, 60, 60, ll=-0.9)]
        if with_nr:
            recs.append(_rec(i, NR, sa / 2, 100, 40, [3], 70, [False], ll=-1.1))
    return recs


def test_summary_figures():
    s = summarize(_records(with_nr=False))["list"]
    assert s["prompts"] == 2
    assert s["speedup_mean"] == pytest.approx((1.5 + 2.0) / 2)
    assert s["speedup_set"] == pytest.approx(5.0 / 3.0)
    assert s["tokens_per_fp"] == pytest.approx(200 / 100)
    assert s["parallel_token_share"] == pytest.approx(0.8)
    assert s["amdahl_k"] == pytest.approx(1 / (0.2 + 0.8 / 4))
    assert s["k_eff"] == pytest.approx(160 / 60) and s["amdahl_k_eff"] == pytest.approx(1 / (0.2 + 0.8 * 60 / 160))
    assert s["ms_per_fp"] == pytest.approx(1e3 * 3.0 / 100) and s["ms_per_fp_serial"] == pytest.approx(1e3 * 5 / 180)
    assert s["repeat_share"] == pytest.approx(0.5)
    assert s["ll_ft_aspd_parallel_only"] == pytest.approx(-1.7)
    assert s["cut"] == 0.5 and s["cut_ft-aspd"] == 0.5 and s["cut_ft-serial"] == 0.0
    assert s["uncut_pairs"] == 1 and s["ll_uncut"] == pytest.approx(-1.2) and s["ll_serial_uncut"] == -1.0
    assert s["ll_ft_serial_same_prompts"] == pytest.approx(-1.0)
    assert s["plan_speedup_mean"] == pytest.approx(2.0)
    assert "speedup_mean_nr" not in s and "no_sibling_repeat" not in table(summarize(_records(False)))


def test_summary_with_the_sibling_ban_variant():
    summary = summarize(_records(with_nr=True))
    s = summary["list"]
    assert s["speedup_mean_nr"] == pytest.approx((3.0 + 4.0) / 2)
    assert s["repeat_share_nr"] == 0.0 and s["branches_per_section_nr"] == 3
    assert s["ll_nr"] == pytest.approx(-1.1)
    assert s["uncut_pairs_nr"] == 2 and s["cut_nr"] == 0.0
    assert s["speedup_mean"] == pytest.approx(1.75)  # the plain variant's figures are untouched
    assert "`generate` + `no_sibling_repeat`: speedup per answer: mean** | 3.50" in table(summary)
    assert "| answers cut by the token budget: `generate` | 50% | 50% |" in table(summary)


def test_resolve_dtype():
    assert resolve_dtype("float32") is torch.float32 and resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("auto") is (torch.bfloat16 if native_bf16() else torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float16")


def test_merge_rescore_scores_each_text_again(tmp_path):
    """--merge --rescore replaces every record's base_logprob with the base model's score of its text (the
    scorer's tokenizer fixed after a run), and writes the report under --stem."""
    import json

    from bench.aspd_real_answers import mean_logprob
    from bench.bench_aspd_real import main

    recs = _records(with_nr=False)
    for r in recs:
        r.update(prompt="List 2 colors.", text="1. Red: warm.\n\n2. Blue: cool.", base_logprob=0.0)
    src = tmp_path / "shard.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    torch.set_num_threads(1)
    assert main(["--merge", str(src), "--rescore", "--out", str(tmp_path), "--stem", "rescored"]) == 0
    out = [json.loads(x) for x in open(tmp_path / "rescored.jsonl")]
    assert len(out) == len(recs) and len({r["base_logprob"] for r in out}) == 1
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aspd_kernels.data.distill import chat_ids
    from aspd_kernels.models import smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    want = mean_logprob(base, chat_ids(tok, "List 2 colors."), tok.encode(recs[0]["text"], add_special_tokens=False))
    assert out[0]["base_logprob"] == pytest.approx(want) and -10 < want < 0
    assert (tmp_path / "rescored.md").is_file()


def test_rescore_needs_merge():
    from bench.bench_aspd_real import parse

    with pytest.raises(SystemExit):
        parse(["--rescore"])


def test_clean_pairs_leave_out_lists_that_repeat_themselves():
    """The log-likelihood over the prompts where neither answer's list loops (rules.list_repeats on both)."""
    recs = _records(with_nr=False)
    loop = "1. A: the same words here.\n2. B: the same words here."
    clean = "1. A: one thing.\n2. B: another."
    for r in recs:
        if r["mode"] in ("ft-aspd", "ft-serial"):
            r["text"] = loop if (r["id"], r["mode"]) == (1, "ft-serial") else clean
    s = summarize(recs)["list"]
    assert s["serial_loops"] == 0.5 and s["clean_pairs"] == 1
    assert s["ll_clean"] == pytest.approx(-1.2) and s["ll_serial_clean"] == pytest.approx(-1.0)
    assert "prompts where neither answer's list repeats itself" in table(summarize(recs))

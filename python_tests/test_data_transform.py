"""aspd_kernels.data: the transformation stage (lists found, integrity and independence rules, malformed input),
with the in-memory byte tokenizer (no model, no download)."""
import pytest

from aspd_kernels.data.aspd_text import answer_ids, data_tokens, read_back
from aspd_kernels.data.rules import check_integrity, check_section, dependence
from aspd_kernels.data.structure import Item, Section, find_sections, render
from aspd_kernels.data.transform import report, transform, trim_unfinished
from aspd_kernels.hf.synthetic import byte_tokenizer
from aspd_kernels.layout import BranchLayout


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


LIST = ("Here are 3 tips for gardening:\n\n1. **Water wisely**: Water early in the morning.\n\n"
        "2. **Use compost**: Compost feeds the soil.\n\n3. **Mulch**: Mulch keeps moisture in.\n\nHappy gardening!")


def test_numbered_list_becomes_one_section_that_reads_back(tok):
    ex = transform(tok, "a", "Give 3 tips.", LIST)
    assert ex.parallel and [len(s.items) for s in ex.sections] == [3]
    sec = ex.sections[0]
    assert [it.title for it in sec.items] == ["**Water wisely**", "**Use compost**", "**Mulch**"]
    assert sec.sep == "\n\n" and [it.marker for it in sec.items] == ["1. ", "2. ", "3. "]
    text = tok.decode(ex.ids)
    assert text.startswith("Here are 3 tips for gardening:\n\n<|title|>**Water wisely**<|/title|>")
    assert "<|para|><|branch|>**Water wisely**: Water early in the morning.<|/branch|><|branch|>" in text
    assert text.endswith("<|/para|>\n\nHappy gardening!")
    # the layout parses: three branches, and the branch tokens counted
    lay = BranchLayout.from_aspd_tokens(ex.ids, data_tokens(tok))
    assert sorted(set(lay.branch.tolist())) == [0, 1, 2, 3]
    assert ex.branch_tokens == int((lay.branch > 0).sum())
    # integrity: the ids read back (with the section's markers) to the answer, character for character
    assert read_back(tok, data_tokens(tok), ex.ids, [(["1. ", "2. ", "3. "], "\n\n")]) == LIST


def test_title_markers_keep_the_list_marker_in_each_title(tok):
    ex = transform(tok, "a", "Give 3 tips.", LIST, title_markers=True)
    text = tok.decode(ex.ids)
    assert text.startswith("Here are 3 tips for gardening:\n\n<|title|>1. **Water wisely**<|/title|><|title|>2. ")
    assert "<|branch|>2. **Use compost**: Compost feeds the soil.<|/branch|>" in text
    assert ex.to_json()["title_markers"] is True and ex.text == LIST
    tk = data_tokens(tok)
    # integrity with the section's own separator, and the decoder's default read-back (numbered items, blank
    # lines) writes a branch that opens on its own marker as it is: no "1. 1. "
    assert read_back(tok, tk, ex.ids, [([""] * 3, "\n\n")]) == LIST
    assert read_back(tok, tk, ex.ids) == LIST
    bullets = "Tips:\n- Soil: Dig well.\n- Seeds: Sow thin.\n- Water: Little and often.\n\nDone."
    ex = transform(tok, "b", "p", bullets, title_markers=True)
    assert "<|branch|>- Seeds: Sow thin.<|/branch|>" in tok.decode(ex.ids)
    assert read_back(tok, tk, ex.ids).startswith("Tips:\n- Soil: Dig well.\n\n- Seeds: Sow thin.\n\n- Water")
    # and the plain format still gets numbered
    plain = transform(tok, "c", "p", bullets)
    assert read_back(tok, tk, plain.ids).startswith("Tips:\n1. Soil: Dig well.\n\n2. Seeds: Sow thin.")


@pytest.mark.parametrize("answer, kind, n", [
    ("Tips:\n- Sleep: Go to bed early.\n- Food: Eat well.\n- Move: Walk daily.", "bullet", 3),
    ("**Cost**: It is cheap.\n\n**Time**: It is quick.", "titled", 2),
    ("1) Rest: Sleep well.\n2) Water: Drink often.", "numbered", 2),
])
def test_bullets_titled_paragraphs_and_paren_numbers(tok, answer, kind, n):
    ex = transform(tok, 0, "p", answer)
    assert [(s.kind, len(s.items)) for s in ex.sections] == [(kind, n)]
    read = read_back(tok, data_tokens(tok), ex.ids, [([it.marker for it in ex.sections[0].items],
                                                      ex.sections[0].sep)])
    assert read.rstrip() == answer


@pytest.mark.parametrize("answer, why", [
    ("1. Go: run.\n3. Stop: rest.", None),                   # numbers skip: no run
    ("2. Go: run.\n3. Stop: rest.", None),                   # does not start at 1
    ("1. Go running every day.\n2. Rest a lot.", "no 'Title: text' head"),
    ("1. Go: run.\n\n2. Stop: rest.\n3. Eat: food.", "separated unevenly"),
    ("- Go: run.\n* Stop: rest.", None),                     # different bullets are not siblings
    ("1. This is a sentence. Then: more.\n2. B: c.", "no 'Title: text' head"),
])
def test_structures_that_are_not_sections(tok, answer, why):
    pieces, notes = find_sections(answer)
    assert not any(isinstance(p, Section) for p in pieces)
    assert render(pieces) == answer
    if why:
        assert any(why in n for n in notes)
    ex = transform(tok, 0, "p", answer)
    assert not ex.parallel and tok.decode(ex.ids) == answer


@pytest.mark.parametrize("body, reason", [
    (" Do this as mentioned above.", "refers to another item"),
    (" Unlike the previous tip, this is quick.", "refers to another item"),
    (" Repeat step 2 twice.", "refers to another item"),
    (" Then water the seeds.", "opens with an order word"),
    (" Finally, rest.", "opens with an order word"),
    (" Also, buy seeds.", "opens with an order word"),
    (" Dig a hole. Then plant the seed.", "continues a sequence"),
    (" Next, you dig.", "opens with an order word"),
])
def test_independence_rule_refuses_items_that_point_at_others(tok, body, reason):
    sec = Section("numbered", [Item("1. ", "Soil", " Dig well."), Item("2. ", "Seeds", body)], "\n")
    got = dependence(sec)
    assert got and any(reason in r for r in got), got
    ex = transform(tok, 0, "p", f"1. Soil: Dig well.\n2. Seeds:{body}")
    assert not ex.parallel and ex.refused


def test_independent_items_pass_and_repeated_titles_do_not(tok):
    ok = Section("bullet", [Item("- ", "Soil", " Dig well, then rake."), Item("- ", "Seeds", " Buy fresh seeds.")],
                 "\n")
    assert dependence(ok) == []  # "then" inside a sentence orders work within the item, not the items
    dup = Section("bullet", [Item("- ", "Soil", " a."), Item("- ", "**soil**", " b.")], "\n")
    assert any("repeats the title" in r for r in dependence(dup))


def test_judge_hook_can_refuse(tok):
    seen = []

    def judge(prompt, section):
        seen.append((prompt, len(section.items)))
        return False

    ex = transform(tok, 0, "Give 3 tips.", LIST, judge=judge)
    assert seen == [("Give 3 tips.", 3)] and not ex.parallel
    assert "the judge found the items dependent" in ex.refused
    sec = transform(tok, 0, "p", LIST).sections[0]
    assert check_section("p", sec, judge=lambda p, s: True) == []


def test_integrity_failure_names_the_example():
    with pytest.raises(ValueError, match=r"example 'x7'.*differ at character 3"):
        check_integrity("abcdef", "abcXef", "example 'x7'")
    check_integrity("abc\n", "abc", "ok")  # the forced line break after <|/para|> is trailing whitespace


@pytest.mark.parametrize("prompt, answer, arg", [
    ("p", "", "answer"), ("p", "   ", "answer"), ("p", None, "answer"), ("", "a", "prompt"), (3, "a", "prompt"),
])
def test_malformed_input_names_the_example(tok, prompt, answer, arg):
    with pytest.raises(ValueError, match=rf"example 42: {arg} must be a non-empty string"):
        transform(tok, 42, prompt, answer)


def test_malformed_ids_are_refused_by_read_back(tok):
    tk = data_tokens(tok)
    with pytest.raises(ValueError, match="never closed"):
        read_back(tok, tk, [tk.para, tk.branch, 65])
    with pytest.raises(ValueError, match="pieces\\[1\\]: text after a section"):
        answer_ids(tok, tk, [Section("bullet", [Item("- ", "A", " a"), Item("- ", "B", " b")], "\n"), "x"])


def test_unfinished_answers_lose_their_last_line_and_the_report_counts(tok):
    assert trim_unfinished("1. A: a.\n2. B: b.\n3. C: cu") == "1. A: a.\n2. B: b."
    assert transform(tok, 0, "p", "one line cut", finished=False) is None
    ex = transform(tok, 0, "p", "1. A: a.\n2. B: b.\n3. C: cu", finished=False)
    assert ex.trimmed and [len(s.items) for s in ex.sections] == [2]
    r = report([ex, transform(tok, 1, "p", "plain"), transform(tok, 2, "p", LIST)])
    assert r["answers"] == 3 and r["parallel_answers"] == 2 and r["branches_per_section"] == 2.5
    assert 0 < r["branch_token_share"] < 1 and r["trimmed"] == 1


def test_sibling_items_that_repeat_each_other_are_refused():
    from aspd_kernels.data.rules import repeated_pairs, repeats

    same = " This device uses white noise to create a sleep-friendly environment."
    sec = Section("numbered", [Item("1. ", "A", same), Item("2. ", "B", " Read a book before bed."),
                               Item("3. ", "C", same.replace("This", "That"))], "\n")
    assert any("item 3 repeats item 1" in r for r in dependence(sec))
    assert repeats("a b c d", "a b c d e f") and not repeats("water the plants early", "buy good seeds now")
    assert repeated_pairs(["x y z", "p q r", "x y z"]) == [(0, 2)]


def test_a_looping_list_is_cut_before_the_first_repeat(tok):
    from aspd_kernels.data.transform import cut_repetition

    loop = ("Tips:\n\n1. Noise: A white noise machine helps you sleep.\n\n2. Dark: Keep the room dark.\n\n"
            "3. Noise: A white noise machine helps you sleep.\n\n4. Noise: A white noise machine helps you sleep.")
    assert cut_repetition(loop) == loop[:loop.index("\n\n3.")]
    ex = transform(tok, 0, "p", loop)
    assert ex.trimmed and [len(s.items) for s in ex.sections] == [2]
    assert cut_repetition(LIST) == LIST


def test_lm_judge_answers_with_a_causal_lm(tok):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aspd_kernels.data.judge import lm_judge

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(cfg).eval()
    sec = transform(tok, 0, "p", LIST).sections[0]
    got = lm_judge(model, tok)(prompt="Give 3 tips.", section=sec)
    assert isinstance(got, bool)
    # a threshold no logit gap reaches refuses, one every gap passes accepts: the answer is the logit comparison
    assert lm_judge(model, tok, threshold=1e9)("p", sec) is False
    assert lm_judge(model, tok, threshold=-1e9)("p", sec) is True


def test_min_branches_keeps_short_lists_serial(tok):
    two = "Tips:\n- Sleep: Go to bed early.\n- Food: Eat well."
    assert transform(tok, 0, "p", two).parallel
    ex = transform(tok, 0, "p", two, min_branches=3)
    assert not ex.parallel and ex.refused == ["fewer than 3 items"] and tok.decode(ex.ids) == two
    assert [len(s.items) for s in transform(tok, 0, "p", LIST, min_branches=3).sections] == [3]
    with pytest.raises(ValueError, match="min_branches"):
        check_section("p", transform(tok, 0, "p", LIST).sections[0], min_branches=1)


@pytest.mark.parametrize("text, loops", [
    ("Tips:\n\n1. **Water**: drink it daily.\n\n2. **Sleep**: go to bed early.\n\n3. **Walk**: an hour outside.", False),
    ("1. **Water**: drink it daily.\n2. **Sleep**: go to bed early.\n3. **water**: keep a bottle.", True),
    ("1. Water: drink water every day, it keeps you well.\n2. Juice: drink water every day, it keeps you well.", True),
    ("No list here, only a sentence: and a colon.", False),
])
def test_list_repeats_finds_a_list_that_loops(text, loops):
    from aspd_kernels.data.rules import list_repeats

    assert list_repeats(text) is loops

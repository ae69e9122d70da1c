"""BranchLayout: section lists, ASPD tokens, incremental growth; position strategies on hand-worked examples."""
import pytest
import torch

from aspd_kernels import AspdTokens, BranchLayout, remap_positions

SECTIONS = [("serial", 3), ("parallel", [2, 3, 1]), ("serial", 2)]


def test_from_sections_contiguous():
    lay = BranchLayout.from_sections(SECTIONS)
    assert lay.segment.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2]
    assert lay.branch.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 0, 0]


def test_from_sections_interleaved_drops_finished_branches():
    lay = BranchLayout.from_sections(SECTIONS, storage="interleaved")
    assert lay.segment.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2]
    assert lay.branch.tolist() == [0, 0, 0, 1, 2, 3, 1, 2, 2, 0, 0]


# Hand-worked: prefix of 3 (positions 0..2, c=3); branches of lengths 2, 3, 1 (W = 3, K = 3); suffix of 2.
HAND = {
    # each branch restarts at c = 3; after the section c = 3 + 6
    "same-sequential": ([0, 1, 2, 3, 4, 3, 4, 5, 3, 9, 10], [0, 1, 2, 3, 3, 3, 4, 4, 5, 9, 10]),
    # after the section c = 3 + max(2, 3, 1)
    "same-max": ([0, 1, 2, 3, 4, 3, 4, 5, 3, 6, 7], [0, 1, 2, 3, 3, 3, 4, 4, 5, 6, 7]),
    # branch j starts at 3 + (j - 1) * 3; after the section c = 3 + 3 * 3
    "fixed-length": ([0, 1, 2, 3, 4, 6, 7, 8, 9, 12, 13], [0, 1, 2, 3, 6, 9, 4, 7, 8, 12, 13]),
    "sequential": (list(range(11)), list(range(11))),
}


@pytest.mark.parametrize("strategy", sorted(HAND))
@pytest.mark.parametrize("storage", ["contiguous", "interleaved"])
def test_positions_hand_worked(strategy, storage):
    lay = BranchLayout.from_sections(SECTIONS, storage=storage)
    expect = HAND[strategy][storage == "interleaved"]
    assert lay.positions(strategy).tolist() == expect
    assert remap_positions(lay.segment, lay.branch, strategy).tolist() == expect


def test_fixed_length_explicit_width():
    lay = BranchLayout.from_sections([("serial", 1), ("parallel", [1, 2]), ("serial", 1)])
    # W = 4: branch 1 at 1, branch 2 at 1 + 4; after: 1 + 2 * 4 = 9
    assert lay.positions("fixed-length", width=4).tolist() == [0, 1, 5, 6, 9]
    assert remap_positions(lay.segment, lay.branch, "fixed-length", width=4).tolist() == [0, 1, 5, 6, 9]


def test_incremental_equals_from_sections():
    lay = BranchLayout()
    lay.append_serial(3)
    lay.open_parallel()
    lay.append_step([1, 2, 3])
    lay.append_step([1, 2])
    lay.append_step([2])
    lay.close_parallel()
    lay.append_serial(2)
    ref = BranchLayout.from_sections(SECTIONS, storage="interleaved")
    assert torch.equal(lay.segment, ref.segment) and torch.equal(lay.branch, ref.branch)
    assert torch.equal(lay.dense_mask(), ref.dense_mask())


def test_from_aspd_tokens():
    t = AspdTokens(branch=100, branch_end=101, title=102, title_end=103, para=104, para_end=105)
    ids = [1, 2, 102, 7, 103, 102, 8, 103, 104, 100, 7, 9, 101, 100, 8, 101, 105, 3]
    lay = BranchLayout.from_aspd_tokens(ids, t)
    # serial up to and including <|para|>; two branches (each <|branch|> .. <|/branch|>); <|/para|> and after serial
    assert lay.branch.tolist() == [0] * 9 + [1, 1, 1, 1, 2, 2, 2] + [0, 0]
    assert lay.segment.tolist() == [0] * 9 + [1] * 7 + [2, 2]


def test_from_aspd_tokens_rejects_nested_branch():
    t = AspdTokens.qwen25()
    with pytest.raises(ValueError, match="inside an open branch"):
        BranchLayout.from_aspd_tokens([t.branch, 5, t.branch], t)


def test_from_sections_rejects_bad_kind():
    with pytest.raises(ValueError, match="sections\\[0\\]"):
        BranchLayout.from_sections([("paralel", [1])])


T = AspdTokens(branch=100, branch_end=101, title=102, title_end=103, para=104, para_end=105)
B, E, TI, TE, P, PE = T.as_tuple()


def _ids(lay: BranchLayout) -> tuple[list[int], list[int]]:
    return lay.segment.tolist(), lay.branch.tolist()


def test_from_aspd_tokens_text_after_last_branch_is_serial():
    """No <|/para|>: the section ends at its last <|/branch|>; what follows is serial and sees every branch."""
    ids = [1, P, B, 7, E, B, 8, E, 3, 4]
    seg, br = _ids(BranchLayout.from_aspd_tokens(ids, T))
    assert br == [0, 0, 1, 1, 1, 2, 2, 2, 0, 0]
    assert seg == [0, 0, 1, 1, 1, 1, 1, 1, 2, 2]
    lay = BranchLayout.from_aspd_tokens(ids, T)
    assert lay.dense_mask()[8, 2:8].all()  # the first serial token after the section sees both branches
    # same-sequential: the serial text continues after both branches' lengths, not inside branch 2
    assert lay.positions().tolist()[8:] == [2 + 6, 2 + 7]


def test_from_aspd_tokens_token_between_branches_stays_with_the_branch_before():
    ids = [1, B, 7, E, 9, 9, B, 8, E, PE, 3]
    seg, br = _ids(BranchLayout.from_aspd_tokens(ids, T))
    assert br == [0, 1, 1, 1, 1, 1, 2, 2, 2, 0, 0]
    assert seg == [0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2]


def test_from_aspd_tokens_sections_apart():
    """<|/para|>, <|para|> or <|title|> between branches close the section: the next <|branch|> opens another."""
    for sep in (PE, P, TI):
        ids = [1, B, 7, E, sep, B, 8, E]
        seg, br = _ids(BranchLayout.from_aspd_tokens(ids, T))
        assert br == [0, 1, 1, 1, 0, 1, 1, 1], sep
        assert seg == [0, 1, 1, 1, 2, 3, 3, 3], sep
    # trailing text, then a second section with its own closing
    ids = [B, 7, E, 5, TI, 6, TE, P, B, 8, E, PE]
    seg, br = _ids(BranchLayout.from_aspd_tokens(ids, T))
    assert br == [1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0]
    assert seg == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 3]


def test_from_aspd_tokens_round_trip_from_sections():
    """Both directions: a layout written out as ASPD text (branches contiguous, each section after a <|para|>, no
    <|/para|>) parses back to the same layout."""
    lay = BranchLayout.from_sections([("serial", 4), ("parallel", [3, 5, 2]), ("serial", 3),
                                      ("parallel", [2, 4]), ("serial", 1)])
    seg, br = lay.segment.tolist(), lay.branch.tolist()
    ids = []
    for i in range(len(seg)):
        first = i == 0 or (seg[i - 1], br[i - 1]) != (seg[i], br[i])
        last = i == len(seg) - 1 or (seg[i + 1], br[i + 1]) != (seg[i], br[i])
        if br[i]:
            ids.append(B if first else E if last else 50)
        else:
            ids.append(P if i + 1 < len(seg) and br[i + 1] else 40)
    back = BranchLayout.from_aspd_tokens(ids, T)
    assert torch.equal(back.segment, lay.segment) and torch.equal(back.branch, lay.branch)


@pytest.mark.parametrize("ids, pos, what", [
    ([1, B, 5, B, 6, E], 3, "inside an open branch"),
    ([1, 2, E], 2, "outside a branch"),
    ([1, B, 5, E, 7, E], 5, "outside a branch"),
    ([1, B, 5, P, E], 3, "<\\|para\\|> inside a branch"),
    ([1, B, 5, PE, E], 3, "<\\|/para\\|> inside a branch"),
    ([1, B, TI, 5, E], 2, "<\\|title\\|> inside a branch"),
    ([1, B, 5, TE, E], 3, "<\\|/title\\|> inside a branch"),
    ([1, B, 5, E, B, 6], 4, "never closed"),
])
def test_from_aspd_tokens_rejects_malformed(ids, pos, what):
    with pytest.raises(ValueError, match=f"ids\\[{pos}\\]: .*{what}"):
        BranchLayout.from_aspd_tokens(ids, T)
    with pytest.raises(ValueError, match=f"ids\\[{pos}\\]"):
        BranchLayout.from_aspd_tokens(torch.tensor(ids), T)

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

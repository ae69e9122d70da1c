"""remap_positions (torch backend) against the section-walking reference on random layouts and packed batches."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from layouts import random_batch, random_layout

from aspd_kernels import reference as R
from aspd_kernels import BranchLayout, remap_positions


@pytest.mark.parametrize("strategy", R.STRATEGIES)
@pytest.mark.parametrize("seed", range(8))
def test_one_sequence(seed, strategy):
    seg, br = random_layout(seed, max_tokens=300)
    assert torch.equal(remap_positions(seg, br, strategy), R.remap_positions(seg, br, strategy))


@pytest.mark.parametrize("strategy", R.STRATEGIES)
@pytest.mark.parametrize("width", [None, 5])
def test_packed_batch(strategy, width):
    seg, br, cu = random_batch(3, batch=4, max_tokens=120)
    got = remap_positions(seg, br, strategy, cu_seqlens=cu, width=width)
    assert torch.equal(got, R.remap_positions(seg, br, strategy, cu_seqlens=cu, width=width))


def test_segments_need_not_start_at_zero_or_be_dense():
    seg = torch.tensor([4, 4, 9, 9, 9, 12], dtype=torch.int32)
    br = torch.tensor([0, 0, 1, 2, 1, 0], dtype=torch.int32)
    assert remap_positions(seg, br).tolist() == [0, 1, 2, 2, 3, 5]


def test_empty():
    e = torch.empty(0, dtype=torch.int32)
    assert remap_positions(e, e).numel() == 0


section = st.one_of(
    st.tuples(st.just("serial"), st.integers(1, 6)),
    st.tuples(st.just("parallel"), st.lists(st.integers(0, 5), min_size=1, max_size=9).filter(any)),
)


@settings(max_examples=150, deadline=None)
@given(sections=st.lists(section, min_size=1, max_size=7), storage=st.sampled_from(["contiguous", "interleaved"]),
       strategy=st.sampled_from(R.STRATEGIES), width=st.one_of(st.none(), st.integers(1, 7)))
def test_property_matches_reference(sections, storage, strategy, width):
    lay = BranchLayout.from_sections(sections, storage=storage)
    got = remap_positions(lay.segment, lay.branch, strategy, width=width)
    assert got.tolist() == R.positions_one(lay.segment.tolist(), lay.branch.tolist(), strategy, width)

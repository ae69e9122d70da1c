"""SPEC §6 identities of the decoder on tiny random Llama and Qwen2 models (float32, greedy, CPU, torch backend)."""
from __future__ import annotations

import random

import pytest
import torch

from test_decoder_helpers import VOCAB, decoder, dense_logits, hf_greedy, predictor_rows, tiny_model
from test_decoder_helpers import one_thread  # noqa: F401  (autouse fixture)

from aspd_kernels import remap_positions
from aspd_kernels.reference import STRATEGIES
from aspd_kernels.decoder import ParallelDecoder

FAMILIES = ("llama", "qwen2")




@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    model = tiny_model(request.param, seed=FAMILIES.index(request.param))
    return model, decoder(model)


def _prompts(seed: int, k: int, prefix_len: int = 5) -> tuple[list[int], list[list[int]]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(VOCAB) for _ in range(prefix_len)]
    return prefix, [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 4))] for _ in range(k)]


def _truncate(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def _pick_eos(alone: list[list[int]], step: int = 2) -> int:
    """A token that branch 0 emits first at ``step``: it ends that branch early, others where they emit it."""
    for a in alone:
        for s in range(step, len(a) - 1):
            if a[s] not in a[:s]:
                return a[s]
    raise AssertionError("no usable EOS candidate")


def test_serial_path_equals_transformers_generate(pair):
    model, dec = pair
    prompt, _ = _prompts(1, 0, prefix_len=7)
    res = dec.generate_serial(prompt, 12)
    assert res.suffix == hf_greedy(model, prompt, 12, None)
    assert res.forward_passes == 12  # the last token is sampled, never fed
    assert res.sequence.tolist() == prompt + res.suffix


@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_branch_identity_with_eos(pair, k):
    """Branch j of one sequence == prefix + branch_prompts[j] decoded alone (package serial path and transformers);
    EOS ends branches at different steps; forward passes follow the longest branch."""
    model, dec = pair
    new = 6
    prefix, prompts = _prompts(10 + k, k)
    alone = [dec.generate_serial(prefix + p, new).suffix for p in prompts]
    eos = _pick_eos(alone)
    expect = [_truncate(a, eos) for a in alone]
    res = dec.generate_branches(prefix, prompts, new, eos_token_id=eos)
    assert res.branches == expect
    if k > 1:
        assert len({len(b) for b in expect}) > 1, "the chosen EOS should end branches at different steps"
    for j in range(min(k, 4)):  # transformers on a few branches is enough and keeps the test fast
        assert res.branches[j] == hf_greedy(model, prefix + prompts[j], new, eos)
    longest = max(map(len, res.branches))
    assert res.forward_passes == 1 + 1 + longest
    if k > 1:
        assert res.forward_passes < sum(map(len, res.branches))
    # storage: the prefix, then the prompts contiguously, then one token per live branch per step
    assert res.sequence[:len(prefix)].tolist() == prefix
    n = len(prefix) + sum(map(len, prompts))
    assert res.branch[len(prefix):n].tolist() == [j + 1 for j, p in enumerate(prompts) for _ in p]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_token_is_the_dense_argmax(pair, strategy):
    """Every sampled token == argmax of a transformers forward over the final sequence with dense_mask() and the
    remapped positions; the positions used are remap_positions of the final layout."""
    model, dec = pair
    prefix, prompts = _prompts(7, 4)
    alone = [dec.generate_serial(prefix + p, 5).suffix for p in prompts]
    eos = _pick_eos(alone, step=1)
    res = dec.generate_branches(prefix, prompts, 5, eos_token_id=eos, suffix_ids=[11, 12],
                                max_suffix_tokens=4, position_strategy=strategy)
    width = None
    if strategy == "fixed-length":
        width = 5 + max(map(len, prompts))
        assert res.width == [width]
    assert torch.equal(res.positions, remap_positions(res.segment, res.branch, strategy, width=width))
    logits = dense_logits(model, res)
    pairs = predictor_rows(res)
    assert len(pairs) == sum(map(len, res.branches)) + len(res.suffix)
    for slot, row in pairs:
        assert int(logits[row].argmax()) == int(res.sequence[slot]), (strategy, slot)
    if strategy == "same-sequential":
        assert res.branches == [_truncate(a, eos) for a in alone]
    # suffix fed with the branches' last tokens: 1 + 1 + longest + (suffix tokens - 1)
    assert res.forward_passes == 2 + max(map(len, res.branches)) + len(res.suffix) - 1


def test_branches_are_isolated_and_the_suffix_sees_them_all(pair):
    """Changing one branch's prompt leaves its siblings untouched but changes what the suffix is computed from."""
    model, dec = pair
    prefix, prompts = _prompts(3, 3)
    a = dec.generate_branches(prefix, prompts, 4, suffix_ids=[1, 2, 3], max_suffix_tokens=3)
    changed = prompts[:2] + [[(prompts[2][0] + 1) % VOCAB] + prompts[2][1:]]
    b = dec.generate_branches(prefix, changed, 4, suffix_ids=[1, 2, 3], max_suffix_tokens=3)
    assert a.branches[:2] == b.branches[:2]
    row = lambda r: int(torch.nonzero(r.sampled).flatten()[-len(r.suffix)]) - 1  # noqa: E731  the last suffix id
    la, lb = dense_logits(model, a)[row(a)], dense_logits(model, b)[row(b)]
    assert not torch.allclose(la, lb)


def test_sampling_is_seeded_and_top_k_one_is_greedy(pair):
    _, dec = pair
    prefix, prompts = _prompts(5, 3)
    kw = dict(temperature=0.9, top_k=20, top_p=0.9)
    a = dec.generate_branches(prefix, prompts, 6, seed=123, **kw)
    b = dec.generate_branches(prefix, prompts, 6, seed=123, **kw)
    c = dec.generate_branches(prefix, prompts, 6, seed=7, **kw)
    assert a.branches == b.branches
    assert a.branches != c.branches
    greedy = dec.generate_branches(prefix, prompts, 6)
    assert dec.generate_branches(prefix, prompts, 6, temperature=1.3, top_k=1, seed=0).branches == greedy.branches


def test_bad_requests_raise(pair):
    _, dec = pair
    with pytest.raises(ValueError, match="branch_prompts"):
        dec.generate_branches([1, 2], [[3], []], 4)
    with pytest.raises(ValueError, match="max_seq_len"):
        dec.generate_branches([1] * 400, [[3]] * 4, 40)
    with pytest.raises(ValueError, match="width"):
        dec.generate_branches([1], [[3, 4]], 4, position_strategy="fixed-length", width=5)
    with pytest.raises(ValueError, match="suffix_ids"):
        dec.generate_branches([1], [[3]], 2, max_suffix_tokens=2)
    with pytest.raises(ValueError, match="prefix_ids"):
        dec.generate_branches([VOCAB], [[3]], 2)
    with pytest.raises(ValueError, match="position_strategy"):
        dec.generate_branches([1], [[3]], 2, position_strategy="nope")


class _EagerReplay:
    """Builds a ``DecodeGraphs`` whose "capture" records an eager stand-in for the graph: replaying it runs
    ``model.step`` on the static buffers (with the value checks on, so a bad padding row would raise)."""

    def __new__(cls, model, cache, buckets):
        from aspd_kernels.decoder.graphs import DecodeGraphs

        class EagerReplay(DecodeGraphs):
            def _capture(self, b):
                batch, model, cache = self._batch(b), self.model, self.cache
                out = torch.full((cache.k.shape[1], b, model.config.vocab_size), float("nan"))

                class Graph:
                    def replay(self):
                        out.copy_(model.step(batch, cache, check_values=True))

                self.graphs[b] = (Graph(), out)

        return EagerReplay(model, cache, buckets)


def test_decode_graph_buffers_and_padding_on_cpu(pair):
    """The CUDA-graph path's static buffers, buckets and padding rows (q_seqlens < bucket), replayed here by an
    eager stand-in for the captured graph: results equal the plain eager path token for token."""
    _, dec = pair
    prefix, prompts = _prompts(21, 5)
    want = dec.generate_branches(prefix, prompts, 7, suffix_ids=[9], max_suffix_tokens=3)
    dec.graphs = _EagerReplay(dec.model, dec.cache, buckets=(1, 2, 4, 8))
    try:
        got = dec.generate_branches(prefix, prompts, 7, suffix_ids=[9], max_suffix_tokens=3)
        assert set(dec.graphs.graphs) <= {1, 2, 4, 8} and 8 in dec.graphs.graphs
    finally:
        dec.graphs = None
    assert got.branches == want.branches and got.suffix == want.suffix
    assert torch.equal(got.sequence, want.sequence) and torch.equal(got.positions, want.positions)


def test_decode_graphs_cover_batches_on_cpu(pair):
    """max_batch > 1: every round (requests with different live-branch counts, some sitting it out) replays one
    graph over all cache rows; results equal the eager batched path and each request decoded alone."""
    model, _ = pair
    dec = ParallelDecoder.from_hf(model, max_seq_len=256, max_batch=3)
    reqs = [_prompts(30 + i, k) for i, k in enumerate((1, 3, 5))]
    args = ([r[0] for r in reqs], [r[1] for r in reqs], 6)
    want = dec.generate_branches_batch(*args, suffix_ids=[[9], [3], [4, 5]], max_suffix_tokens=2)
    dec.graphs = _EagerReplay(dec.model, dec.cache, buckets=(1, 2, 4, 8))
    got = dec.generate_branches_batch(*args, suffix_ids=[[9], [3], [4, 5]], max_suffix_tokens=2)
    assert 8 in dec.graphs.graphs and set(dec.graphs.graphs) <= {1, 2, 4, 8}  # the widest feed picks the bucket
    for g, w, (prefix, prompts) in zip(got, want, reqs):
        assert g.branches == w.branches and g.suffix == w.suffix
        assert torch.equal(g.sequence, w.sequence) and torch.equal(g.positions, w.positions)
        alone = decoder(model).generate_branches(prefix, prompts, 6)
        assert g.branches == alone.branches


def test_sample_filters():
    from aspd_kernels.decoder import SamplingParams, sample

    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])).repeat(4000, 1)
    draw = lambda **kw: sample(logits, SamplingParams(temperature=1.0, **kw), g)  # noqa: E731
    freq = torch.bincount(draw(), minlength=5).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]), atol=0.03, rtol=0)
    assert set(draw(top_k=2).tolist()) == {0, 1}
    assert set(draw(top_p=0.65).tolist()) == {0, 1}  # 0.4 < 0.65: the second token is needed, not the third
    assert set(draw(top_p=0.1).tolist()) == {0}
    bias = torch.zeros(5)
    bias[0] = float("-inf")
    assert 0 not in sample(logits, SamplingParams(), None, bias).tolist()
    assert sample(logits, SamplingParams(), None, bias).eq(1).all()


def test_logits_equal_transformers(pair):
    """Not only the argmax: the decoder's float32 logits over a prompt, and over a parallel section against the
    dense-mask forward, equal transformers' to float32 rounding."""
    from aspd_kernels.decoder.request import Request

    model, dec = pair
    prompt, prompts = _prompts(2, 3, prefix_len=9)
    run = Request(dec.max_seq_len, dec.max_position, "same-sequential")
    slots = [run.place(t) for t in prompt]
    ours = dec._feed([(run, slots)])[0]
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)

    res = dec.generate_branches(prompt, prompts, 3, suffix_ids=[4, 5], max_suffix_tokens=2)
    run = Request(dec.max_seq_len, dec.max_position, "same-sequential")
    run.tokens, run.seg, run.br = res.sequence.tolist(), res.segment.tolist(), res.branch.tolist()
    run.pos = res.positions.tolist()
    ours = dec._feed([(run, list(range(len(run.tokens))))])[0]
    torch.testing.assert_close(ours, dense_logits(model, res), atol=2e-5, rtol=1e-4)


def test_batch_of_requests_equals_one_by_one(pair):
    """Three requests with their own prefixes, branch counts, strategies' layouts and suffixes share forward passes
    (one cache row each) and decode exactly as they do alone."""
    from aspd_kernels.decoder import ParallelDecoder

    model, dec = pair
    batch_dec = ParallelDecoder.from_hf(model, max_seq_len=512, max_batch=3)
    reqs = [_prompts(30 + i, k, prefix_len=n) for i, (k, n) in enumerate([(3, 5), (1, 2), (6, 9)])]
    alone = [dec.generate_serial(r[0] + p, 6).suffix for r in reqs for p in r[1]]
    eos = _pick_eos(alone, step=1)
    suffixes = [[1, 2], None, [3]]
    for strategy in ("same-sequential", "fixed-length"):
        got = batch_dec.generate_branches_batch([r[0] for r in reqs], [r[1] for r in reqs], 6, eos_token_id=eos,
                                                suffix_ids=suffixes, max_suffix_tokens=0,
                                                position_strategy=strategy)
        for (prefix, prompts), s, g in zip(reqs, suffixes, got):
            want = dec.generate_branches(prefix, prompts, 6, eos_token_id=eos, suffix_ids=s,
                                         position_strategy=strategy)
            assert g.branches == want.branches
            assert torch.equal(g.sequence, want.sequence) and torch.equal(g.positions, want.positions)
            assert g.forward_passes == want.forward_passes
    with pytest.raises(ValueError, match="max_batch"):
        batch_dec.generate_branches_batch([[1]] * 4, [[[2]]] * 4, 2)

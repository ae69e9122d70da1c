"""A running ``vllm serve`` as the engine (OpenAI-compatible HTTP on loopback, the plugin installed in the server,
the layout in each request's ``vllm_xargs``), tensor parallel over two CPU workers: ``VllmDecoder(server=...)``
gives exactly ``ParallelDecoder``'s tokens, layout and positions for every position strategy (``sequential``
through the host path, log-probs over HTTP), the model-driven and plan modes, a batch and concurrent async calls.
The decoder tests' forcing processors run inside the server (``vllm_forcing``). The server starts and stops under
deadlines; every test has one too."""
from __future__ import annotations

import asyncio
import os

import pytest

vllm = pytest.importorskip("vllm")

import test_decoder_plan as plan_case  # noqa: E402
from test_decoder_engine import EOS, PROMPT, TK, processor  # noqa: E402
from test_decoder_helpers import decoder  # noqa: E402
from test_vllm import HERE, TEST_LIMIT_S, _Deadline, _prompts, _same, forcing  # noqa: E402
from vllm_forcing import FQCN as FORCING  # noqa: E402
from vllm_helpers import save_tiny  # noqa: E402

from aspd_kernels.reference import STRATEGIES  # noqa: E402
from aspd_kernels.vllm import VllmDecoder  # noqa: E402
from aspd_kernels.vllm.engine import _omp_bind  # noqa: E402
from aspd_kernels.vllm.server import VllmServer  # noqa: E402

START_LIMIT_S = 480


@pytest.fixture(autouse=True)
def _deadline(request):
    with _Deadline(TEST_LIMIT_S, request.node.name):
        yield


def serving(path: str, ref, tp: int, log_dir: str, label: str):
    """Start a ``vllm serve`` of ``path`` at tensor parallelism ``tp`` with the forcing processors, yield ``(ref,
    VllmDecoder on it)``, then stop it: start and stop under deadlines, the server gone afterwards."""
    # a binding set in this process for an earlier engine would give this server another number of CPU groups
    env = {"PYTHONPATH": os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p),
           "VLLM_CPU_OMP_THREADS_BIND": _omp_bind(tp)}
    extra = ["--tensor-parallel-size", str(tp), "--enforce-eager", "--max-num-batched-tokens", "64",
             "--kv-cache-memory-bytes", str(256 << 20), "--logits-processors", FORCING,
             "--logprobs-mode", "processed_logprobs"]
    srv = VllmServer(path, max_model_len=512, env=env, extra=extra, start_timeout_s=START_LIMIT_S,
                     log=os.path.join(log_dir, "serve.log"))
    with _Deadline(START_LIMIT_S + 30, f"starting vllm serve ({label})"):
        srv.start()
    dec = VllmDecoder(path, max_model_len=512, server=srv.url, request_timeout_s=TEST_LIMIT_S)
    try:
        yield ref, dec
    finally:
        dec.close()
        with _Deadline(120, f"stopping vllm serve ({label})"):
            srv.stop()
        assert srv.proc.poll() is not None, "vllm serve is still running"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("served"))
    model = save_tiny("llama", path, seed=0)
    yield from serving(path, decoder(model), 2, str(tmp_path_factory.mktemp("log")), "tiny Llama")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_generate_branches(served, strategy):
    ref, dec = served
    prefix, prompts = _prompts(11, 4)
    kw = dict(suffix_ids=[11, 12], max_suffix_tokens=4, position_strategy=strategy)
    kw["eos_token_id"] = ref.generate_branches(prefix, prompts, 6, **kw).branches[0][1]
    _same(dec.generate_branches(prefix, prompts, 6, **kw), ref.generate_branches(prefix, prompts, 6, **kw))


@pytest.mark.parametrize("strategy", ["same-sequential", "fixed-length"])
def test_model_driven_and_plan(served, strategy):
    ref, dec = served
    kw = dict(eos_token_id=EOS, max_branch_tokens=10, position_strategy=strategy)
    with forcing(dec, "test_decoder_engine:processor"):
        got = dec.generate(PROMPT, 60, TK, **kw)
    _same(got, ref.generate(PROMPT, 60, TK, logits_processor=processor, **kw))
    args = (plan_case.PROMPT, plan_case.FMT, 40, plan_case.LIMIT, 10)
    with forcing(dec, "test_decoder_plan:processor"):
        got = dec.generate_plan(*args, eos_token_id=plan_case.EOS, position_strategy=strategy)
    _same(got, ref.generate_plan(*args, eos_token_id=plan_case.EOS, position_strategy=strategy,
                                 logits_processor=plan_case.processor))


def test_batch_and_async(served):
    ref, dec = served
    cases = [_prompts(200 + i, 1 + i % 3, prefix_len=30 + 7 * i) for i in range(4)]

    async def all_at_once():
        return await asyncio.gather(*(dec.generate_branches_async(p, b, 5, suffix_ids=[3], max_suffix_tokens=3)
                                      for p, b in cases))

    got = asyncio.run(all_at_once())
    batch = dec.generate_branches_batch([c[0] for c in cases], [c[1] for c in cases], 5, suffix_ids=[[3]] * 4,
                                        max_suffix_tokens=3)
    for (prefix, prompts), g, b in zip(cases, got, batch):
        want = ref.generate_branches(prefix, prompts, 5, suffix_ids=[3], max_suffix_tokens=3)
        _same(g, want)
        _same(b, want)


def test_a_malformed_layout_is_refused_with_http_400(served):
    _, dec = served
    from aspd_kernels.decoder.sampling import SamplingParams
    from aspd_kernels.vllm.runs import Run

    ragged = {"aspd_seg": [0, 0], "aspd_br": [0], "aspd_pos": [0, 1]}
    short = {"aspd_seg": [0, 0], "aspd_br": [0, 0], "aspd_pos": [0, 1]}  # two entries, three prompt tokens
    for i, extra in enumerate((ragged, short)):
        bad = Run(None, [], 2, set(), extra=extra, plain=[1, 2, 3])
        with pytest.raises(ValueError, match="HTTP 400"):
            dec._loop.run(dec.client.run(bad, SamplingParams(), f"bad-{i}", dec.counters), TEST_LIMIT_S)
    assert dec.plain_greedy([[1, 2, 3]], 2)  # the server still serves

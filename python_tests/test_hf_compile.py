"""attn_implementation="aspd" under torch.compile: transformers' compiled generation with a static cache
(``fullgraph=True``, no recompilation for a shorter prompt) and a branch layout given as tensors, traced whole.

The two generation tests reproduce the semantics of transformers' ``GenerationTesterMixin``
``test_generate_compile_model_forward_fullgraph`` and ``test_static_cache_no_recompile_with_smaller_length`` on tiny
random Llama and Qwen2 models. Dynamo's ``aot_eager`` backend: the same tracing as inductor (fullgraph, guards, the
ops' fake implementations through AOTAutograd) without the minute of C++ code generation per graph on a CPU.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import aspd_kernels.hf as ah  # noqa: E402,F401  (registers "aspd")
from aspd_kernels.hf.synthetic import byte_tokenizer, synthetic_dataset  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config  # noqa: E402
from transformers.generation import CompileConfig  # noqa: E402
from transformers.testing_utils import CaptureLogger  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config}
BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def _one_thread_fresh_dynamo():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.compiler.reset()
    yield
    torch.compiler.reset()
    torch.set_num_threads(n)


def tiny(kind: str, vocab: int = 99):
    """transformers' model-tester sizes (hidden 32, 2 layers, 4/2 heads), float32."""
    torch.manual_seed(0)
    cfg = CONFIGS[kind](vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=ah.NAME, dtype=torch.float32).eval()


def compile_kwargs(**kw) -> dict:
    cc = CompileConfig(fullgraph=True, dynamic=False, backend=BACKEND)  # a dynamic shape is an error
    cc._compile_all_devices = True  # compile on the CPU too
    return dict(use_cache=True, do_sample=False, max_new_tokens=5, return_dict_in_generate=True, output_scores=True,
                compile_config=cc, **kw)


def generate_logging_recompiles(model, inputs: list[dict], **kw) -> tuple[list, str]:
    """``generate`` on each input, dynamo's guard failures captured (transformers' test does the same)."""
    outs = []
    torch._logging.set_logs(recompiles_verbose=True)
    try:
        with CaptureLogger(hf_logging.get_logger("torch._dynamo.guards")) as cl:
            for x in inputs:
                outs.append(model.generate(**x, **kw))
    finally:
        torch._logging.set_logs()
    return outs, cl.out


def assert_same_generation(a, b):
    assert a.sequences.tolist() == b.sequences.tolist()
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_generate_compile_model_forward_fullgraph(kind):
    """Two batches of the same shape (left padding in each): eager generation with a dynamic cache, then
    generation with a static cache whose decode forward transformers compiles with ``fullgraph=True``: same tokens
    and scores, the compiled call used, and no recompilation for the second batch."""
    model = tiny(kind)
    ids = torch.randint(1, 99, (4, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, :2] = 0
    mask[3, :4] = 0
    inputs = [dict(input_ids=ids[:2], attention_mask=mask[:2]), dict(input_ids=ids[2:], attention_mask=mask[2:])]
    kw = compile_kwargs()
    with torch.compiler.set_stance("force_eager"):
        eager = [model.generate(**x, **kw) for x in inputs]
    assert not hasattr(model, "_compiled_call")  # a dynamic cache: nothing compiled
    compiled, log = generate_logging_recompiles(model, inputs, cache_implementation="static", **kw)
    assert hasattr(model, "_compiled_call")
    assert "Recompiling" not in log, log
    for a, b in zip(eager, compiled):
        assert_same_generation(a, b)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_static_cache_no_recompile_with_smaller_length(kind):
    """A static cache sized by a long prompt, then a shorter prompt: the cache keeps its size, so the compiled
    decode step must serve it unchanged (``fail_on_recompile``); the tokens equal eager generation's."""
    model = tiny(kind)
    gen = torch.Generator().manual_seed(2)
    long, short = torch.randint(1, 99, (1, 12), generator=gen), torch.randint(1, 99, (1, 5), generator=gen)
    kw = compile_kwargs(cache_implementation="static")
    with torch.compiler.set_stance("force_eager"):
        ref = [model.generate(x, attention_mask=torch.ones_like(x), **kw) for x in (long, short)]
    first = model.generate(long, attention_mask=torch.ones_like(long), **kw)
    with torch.compiler.set_stance("fail_on_recompile"):
        second = model.generate(short, attention_mask=torch.ones_like(short), **kw)
    assert hasattr(model, "_compiled_call")
    assert_same_generation(first, ref[0])
    assert_same_generation(second, ref[1])


def test_layout_tensors_trace_whole():
    """A training forward with the branch layout, packing and a padding mask given as tensors compiles as one
    graph (``fullgraph=True``: a host read would break it) and equals the eager forward; the same for packing
    found from restarting position ids."""
    tok = byte_tokenizer()
    model = tiny("llama", vocab=len(tok))
    examples = [ah.encode_example(tok, p, r) for p, r in synthetic_dataset(2, seed=1)]
    batch = ah.AspdCollator()(examples)
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    packed = torch.compile(lambda **b: model(**b).logits, fullgraph=True, backend=count)
    torch.testing.assert_close(packed(**batch), model(**batch).logits, rtol=1e-5, atol=1e-5)

    n = min(len(e["input_ids"]) for e in examples)
    rows = {key: torch.stack([e[src][:n] for e in examples])
            for key, src in (("input_ids", "input_ids"), ("position_ids", "position_ids"), ("aspd_segment", "segment"),
                             ("aspd_branch", "branch"))}
    rows["attention_mask"] = torch.ones(2, n, dtype=torch.long)
    rows["attention_mask"][1, n - 3:] = 0  # right padding
    padded = torch.compile(lambda **b: model(**b).logits, fullgraph=True, backend=count)
    valid = rows["attention_mask"].bool()
    torch.testing.assert_close(padded(**rows)[valid], model(**rows).logits[valid], rtol=1e-5, atol=1e-5)

    ids = torch.randint(0, 200, (1, 20))
    pos = torch.cat([torch.arange(8), torch.arange(12)])[None]
    restart = torch.compile(lambda i, p: model(i, position_ids=p, use_cache=False).logits, fullgraph=True,
                            backend=count)
    got = restart(ids, pos)
    torch.testing.assert_close(got, model(ids, position_ids=pos, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, 8:], model(ids[:, 8:], position_ids=pos[:, 8:]).logits, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 3

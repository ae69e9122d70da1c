"""Shared pieces of the vLLM tests and benchmark (no tests here): tiny random Llama/Qwen2 directories vLLM can load,
greedy plain generation through an engine, and stock vLLM (our plugin off) in a child process.

Run as a script it is that child: ``python vllm_helpers.py MODEL_DIR PROMPTS_JSON MAX_TOKENS`` prints the greedy
tokens of stock vLLM (``VLLM_PLUGINS`` set without ``aspd_kernels``, so CPU_ATTN is vLLM's own) as JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys

# vLLM keeps only the plugins VLLM_PLUGINS names; this one is vLLM's own, so ours stays out
MARK = "STOCK_GREEDY "  # vLLM logs to stdout too: the result line carries this mark
STOCK_ENV = {"VLLM_PLUGINS": "lora_filesystem_resolver"}
ENGINE_ARGS = dict(max_model_len=512, enable_chunked_prefill=True, max_num_batched_tokens=64,
                   kv_cache_memory_bytes=256 << 20, max_num_seqs=64,
                   enforce_eager=True)  # no torch.compile: starts faster, same kernels either way on these sizes


def save_tiny(family: str, path: str, seed: int = 0):
    """The decoder tests' tiny random model with head size 32 (vLLM's CPU attention needs a multiple of 32)."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_decoder_helpers import tiny_model

    model = tiny_model(family, seed=seed, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    model.save_pretrained(path)
    return model


def stock_greedy(model_dir: str, prompts: list[list[int]], max_tokens: int, timeout: float = 400) -> list[list[int]]:
    """Greedy tokens of stock vLLM (vLLM's own CPU_ATTN) in a child process with the same engine arguments."""
    env = {**os.environ, **STOCK_ENV}
    out = subprocess.run([sys.executable, __file__, model_dir, json.dumps(prompts), str(max_tokens)], env=env,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"stock vLLM failed:\n{out.stderr[-3000:]}")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(MARK)]
    if not lines:
        raise RuntimeError(f"stock vLLM printed no result:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][len(MARK):])


def _main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model_dir, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model_dir, skip_tokenizer_init=True, dtype="float32", block_size=32, enable_prefix_caching=True,
              **ENGINE_ARGS)
    # twice: the second pass hits the prefix cache, as the plugin's engine will
    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp)
    again = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp)
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == [list(o.outputs[0].token_ids) for o in again], "stock vLLM disagrees with itself"
    print(MARK + json.dumps(got), flush=True)


if __name__ == "__main__":
    _main()

"""The decoder of SPEC §6: a thin serial/parallel decoding loop over a Llama-family model that calls the ops.

    from aspd_kernels.decoder import ParallelDecoder
    dec = ParallelDecoder.from_hf("path/to/model")          # or an in-memory transformers model
    res = dec.generate_branches(prefix_ids, [prompt_1, prompt_2], max_new_tokens=64, eos_token_id=eos)
    res.branches, res.forward_passes, res.tokens_per_s
    res = dec.generate(prompt_ids, 512, tokens=AspdTokens.from_tokenizer(tok))   # ASPD-trained models

Files: config (hyper-parameters, rope scaling), model (the network over the ops), weights (loading), cache (static
KV cache), sampling (greedy/sampled, grammar masks), request (one request's slots and positions), engine
(ParallelDecoder), graphs (CUDA graphs of decode steps), result (DecodeResult).
"""
from .config import ModelConfig
from .engine import ParallelDecoder
from .model import Transformer
from .result import DecodeResult
from .sampling import Grammar, SamplingParams, sample

__all__ = ["ParallelDecoder", "DecodeResult", "ModelConfig", "Transformer", "Grammar", "SamplingParams", "sample"]

"""The decoder (SPEC section 6; ``docs/decoder.md``): a thin serial/parallel decoding loop over a Llama-family model
that calls the ops, one static KV cache, several branches of an answer in one sequence.

    from aspd_kernels.decoder import ParallelDecoder, PlanFormat
    dec = ParallelDecoder.from_hf("path/to/model")          # or an in-memory transformers model
    res = dec.generate_branches(prefix_ids, [prompt_1, prompt_2], max_new_tokens=64, eos_token_id=eos)
    res = dec.generate(prompt_ids, 512, tokens=AspdTokens.from_tokenizer(tok))       # ASPD-trained models
    res = dec.generate_plan(prompt_ids, PlanFormat.yu(tok), eos_token_id=eos)        # any instruct model
    res.branches, res.forward_passes, res.tokens_per_s

Files: engine (ParallelDecoder, assembled from the modes), driver (forward pass, lockstep driver), serial,
branches, aspd, plan + plan_format (the modes), request (one request's slots and positions), config, model,
weights, cache, graphs (CUDA graphs of decode steps), sampling (greedy/sampled, ASPD grammar masks), stops (the
caller's branches' stop rules), processors (logits processors for them), result.
"""
from .config import ModelConfig
from .engine import ParallelDecoder
from .model import Transformer
from .plan_format import YU_INSTRUCTION, PlanFormat, PlanGrammar
from .processors import distinct_starts, no_sibling_repeat
from .result import DecodeResult
from .sampling import Grammar, SamplingParams, sample

__all__ = ["ParallelDecoder", "DecodeResult", "ModelConfig", "Transformer", "Grammar", "SamplingParams", "sample",
           "PlanFormat", "PlanGrammar", "YU_INSTRUCTION", "distinct_starts", "no_sibling_repeat"]

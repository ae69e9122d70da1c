"""A test-only vLLM logits processor (loaded by FQCN into the test engines): it runs one of the decoder tests'
host logits processors inside vLLM's sampler, so that the engine-sampled path sees the same forcing the
``ParallelDecoder`` reference gets. A request opts in with ``extra_args["test_force"] = "module:function"``; the
function gets ``(logits [1, V], [history])``, history being the request's prompt + output (the tokens that row sees,
in storage order, which is what the decoder passes)."""
from __future__ import annotations

import importlib

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

FQCN = "vllm_forcing:Forcing"


class Forcing(AdapterLogitsProcessor):
    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        name = (params.extra_args or {}).get("test_force")
        if not name:
            return None
        mod, fn = name.split(":")
        f = getattr(importlib.import_module(mod), fn)

        def apply(prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            h = [*prompt_ids, *output_ids]
            return f(logits[None].float(), [h])[0].to(logits.dtype)

        return apply

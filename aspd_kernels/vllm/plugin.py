"""The vLLM plugin (entry point ``vllm.general_plugins``: ``aspd_kernels = aspd_kernels.vllm.plugin:register``).

vLLM calls :func:`register` in every process it starts (the front end, the engine core, each worker), so the
backend override and the layout patches hold wherever the model runs. ``VLLM_PLUGINS`` (vLLM's own allowlist)
turns it off: set it to a list without ``aspd_kernels`` to run stock vLLM.
"""
from __future__ import annotations

BACKEND = "aspd_kernels.vllm.backend.AspdAttentionBackend"


def register() -> None:
    """Take over ``CPU_ATTN`` (the CPU platform selects no other), register the backend as ``ASPD`` for other
    platforms, teach vLLM's model runner and prefix cache the request layouts, and refuse a layout where the
    engine's settings cannot apply it (:mod:`.guard`). Idempotent."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from . import guard, layout

    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND)
    if "ASPD" not in AttentionBackendEnum.__members__:
        register_backend("ASPD", BACKEND)
    layout.install()
    guard.install()

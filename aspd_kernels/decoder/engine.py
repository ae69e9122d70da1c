"""``ParallelDecoder``: serial text and parallel sections decoded in ONE sequence over one static KV cache (SPEC
section 6; ``docs/decoder.md``). The class is assembled from its modes, one file each:

- ``driver.py``   the model, the cache, the forward pass, the lockstep driver of the requests' programs;
- ``serial.py``   ``generate_serial``: plain decoding, and the serial steps after a section;
- ``branches.py`` ``generate_branches[_batch]``: the caller's branch prompts; the branch loop all modes share;
- ``aspd.py``     ``generate[_batch]``: model-driven, the six ASPD tokens;
- ``plan.py``     ``generate_plan[_batch]``: training-free, a plan the model writes, then its items in parallel.
"""
from __future__ import annotations

import torch

from ..models import resolve_model_path
from .aspd import AspdMode
from .plan import PlanMode
from .weights import build, parse_dtype, read_directory, read_module


class ParallelDecoder(PlanMode, AspdMode):
    """A Llama-family model with a static KV cache, decoding serial text and parallel sections in one sequence.

    Build with :meth:`from_hf`. ``max_seq_len`` bounds the slots of one request; ``max_position`` the rotary
    positions (they can exceed the slots with the fixed-length strategy); ``max_batch`` the requests decoded
    together by the ``*_batch`` methods (each has its own cache row).
    """

    @classmethod
    def from_hf(cls, model_or_path, *, device: torch.device | str | None = None,
                dtype: torch.dtype | str | None = None, max_seq_len: int = 4096, max_position: int | None = None,
                max_batch: int = 1, cuda_graphs: bool | None = None,
                check_values: bool | None = None) -> "ParallelDecoder":
        """From a local Hugging Face directory (``config.json`` + safetensors), a ``.gguf`` file or ``"smollm2"``
        (converted once and cached: :mod:`aspd_kernels.models`), or an in-memory ``transformers`` causal LM (its
        tensors are shared when device and dtype already match).

        device: default the model's device (in-memory) or CUDA when available (directory).
        dtype: default the in-memory model's dtype, else the config's ``dtype``/``torch_dtype``.
        max_position: rows of the rotary table (default ``max_seq_len``).
        """
        if isinstance(model_or_path, str) or hasattr(model_or_path, "__fspath__"):
            dev = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
            cfg, state = read_directory(resolve_model_path(model_or_path), dev)
            default_dtype = None
        else:
            cfg, state = read_module(model_or_path)
            p = next(model_or_path.parameters())
            dev = torch.device(device if device is not None else p.device)
            default_dtype = p.dtype
        model = build(cfg, state, device=dev, dtype=parse_dtype(dtype) or default_dtype,
                      max_position=max_position or max_seq_len)
        return cls(model, max_seq_len=max_seq_len, max_batch=max_batch, cuda_graphs=cuda_graphs,
                   check_values=check_values)

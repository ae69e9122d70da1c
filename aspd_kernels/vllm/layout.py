"""The layout of a vLLM request (segment, branch and rotary position of every prompt token) and the two places
vLLM must learn it: the model runner (the positions it feeds the rotary embedding, and the ids the attention backend
writes into its per-slot id cache) and the prefix cache's block hashes.

A request carries its layout in ``SamplingParams.extra_args`` (the only per-request channel vLLM sends to every
worker, tensor-parallel ranks included; a server's ``vllm_xargs``, which takes flat lists only) as three keys,
``aspd_seg``, ``aspd_br``, ``aspd_pos``: one int per prompt token each. A request without them is plain causal
text (segment 0, branch 0, positions 0, 1, 2, ...). Tokens past the
layout (a request's own generated tokens) continue its last token: same segment and branch, position + 1.

Nothing here imports vLLM at module level: the package imports without it, and :func:`install` patches it in the
process that calls it (the plugin calls it in every vLLM process, engine core and workers).
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

KEYS = {"seg": "aspd_seg", "br": "aspd_br", "pos": "aspd_pos"}


def encode(segment: list[int], branch: list[int], positions: list[int]) -> dict[str, Any]:
    """``extra_args`` for a request whose prompt has this layout (three int lists of the prompt's length)."""
    if not len(segment) == len(branch) == len(positions):
        raise ValueError("segment, branch and positions need one entry per prompt token")
    return {KEYS["seg"]: [int(s) for s in segment], KEYS["br"]: [int(b) for b in branch],
            KEYS["pos"]: [int(p) for p in positions]}


def layout_of(extra_args: dict | None) -> dict | None:
    """``{"seg", "br", "pos"}`` of a request's ``extra_args``, None without a layout; ``ValueError`` for a partial
    or ragged one (a malformed layout must not run as plain text)."""
    if not extra_args or not any(k in extra_args for k in KEYS.values()):
        return None
    lay = {name: extra_args.get(key) for name, key in KEYS.items()}
    if not all(isinstance(v, list) and v for v in lay.values()) or len({len(v) for v in lay.values()}) != 1:
        raise ValueError(f"extra_args: a layout needs {sorted(KEYS.values())}, non-empty int lists of one length")
    return lay


def has_layout(extra_args: dict | None) -> bool:
    """Whether a request's ``extra_args`` carry a layout."""
    return layout_of(extra_args) is not None


def needs_mask(lay: dict) -> bool:
    """Whether a layout's attention differs from plain causal attention: some segment holds two branches, whose
    tokens must not see each other. One branch per segment (a branch run as its own request, positions remapped
    or not) is plain causal attention at the layout's positions, which vLLM's own kernel computes."""
    seg, br = np.asarray(lay["seg"]), np.asarray(lay["br"])
    inside = br > 0
    if not inside.any():
        return False
    pairs = np.unique(np.stack([seg[inside], br[inside]]), axis=1)
    return len(np.unique(pairs[0])) < pairs.shape[1]


def request_ids(extra_args: dict | None, start: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Segment, branch (int32 ``[n]``) and positions (int64 ``[n]``, None = vLLM's own) of tokens
    ``start .. start+n-1`` of a request."""
    lay = layout_of(extra_args)
    if lay is None:
        return np.zeros(n, np.int32), np.zeros(n, np.int32), None
    seg, br, pos = lay["seg"], lay["br"], lay["pos"]
    m = len(seg)
    idx = np.arange(start, start + n)
    inside = np.minimum(idx, m - 1)
    s = np.asarray(seg, np.int32)[inside]
    b = np.asarray(br, np.int32)[inside]
    # past the layout: the request's own generated tokens continue its last token (position + 1 each)
    p = np.asarray(pos, np.int64)[inside] + np.maximum(idx - (m - 1), 0)
    return s, b, p


class StepIds:
    """Per-process record of the step being prepared: segment and branch of each scheduled token in batch order.
    The model runner fills it right before the attention metadata is built; the backend's builder reads it."""

    seg: np.ndarray = np.zeros(0, np.int32)
    br: np.ndarray = np.zeros(0, np.int32)
    has_layout: bool = False  # a request of the step needs the branch mask (``needs_mask``)


def _prepare_with_layout(runner, total: int) -> None:
    """After vLLM's ``_prepare_inputs`` (which computed slot mapping from the plain positions): record the step's
    ids and overwrite the positions of requests that carry a layout."""
    batch = runner.input_batch
    seg = np.zeros(total, np.int32)
    br = np.zeros(total, np.int32)
    has_layout = False
    qsl = runner.query_start_loc.cpu
    for i, rid in enumerate(batch.req_ids):
        a, e = int(qsl[i]), int(qsl[i + 1])
        if e == a:
            continue
        state = runner.requests[rid]
        extra = state.sampling_params.extra_args if state.sampling_params is not None else None
        lay = layout_of(extra)
        if lay is None:
            continue
        has_layout = has_layout or needs_mask(lay)
        start = int(batch.num_computed_tokens_cpu[i])
        s, b, p = request_ids(extra, start, e - a)
        seg[a:e], br[a:e] = s, b
        runner.positions[a:e] = runner.positions.new_tensor(p)
    StepIds.seg, StepIds.br, StepIds.has_layout = seg, br, has_layout


def _patch_model_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner._prepare_inputs, "_aspd", False):
        return
    orig = GPUModelRunner._prepare_inputs

    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        out = orig(self, scheduler_output, *args, **kwargs)
        _prepare_with_layout(self, scheduler_output.total_num_scheduled_tokens)
        return out

    _prepare_inputs._aspd = True
    GPUModelRunner._prepare_inputs = _prepare_inputs

    # one step's layers share the op's per-step plan (lengths, block table, id caches: the same for every layer)
    from ..torch_backend.step_cache import step_scope

    forward = GPUModelRunner._model_forward

    def _model_forward(self, *args, **kwargs):
        with step_scope():
            return forward(self, *args, **kwargs)

    GPUModelRunner._model_forward = _model_forward


def block_key(extra_args: dict | None, start: int, end: int) -> tuple | None:
    """An extra block-hash key for tokens ``start .. end-1``: None where they are plain causal text (segment 0,
    branch 0, position = index), so such blocks stay shared with plain requests; else a digest of their ids and
    positions. Hashes chain, so every block after a keyed one differs too."""
    lay = layout_of(extra_args)
    if lay is None:
        return None
    s, b, p = request_ids(extra_args, start, end - start)
    if not s.any() and not b.any() and np.array_equal(p, np.arange(start, end)):
        return None
    digest = hashlib.blake2b(np.concatenate([s.astype(np.int64), b.astype(np.int64), p]).tobytes(),
                             digest_size=16).hexdigest()
    return ("aspd_layout", digest)


def _patch_block_hash() -> None:
    """Same tokens under another layout are other KV: the prefix cache must not hand one's blocks to the other."""
    from vllm.v1.core import block_pool, kv_cache_utils

    orig = kv_cache_utils.generate_block_hash_extra_keys
    if getattr(orig, "_aspd", False):
        return

    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, mm_idx = orig(request, start_token_idx, end_token_idx, start_mm_idx)
        sp = getattr(request, "sampling_params", None)
        extra = block_key(sp.extra_args if sp is not None else None, start_token_idx, end_token_idx)
        if extra is None:
            return keys, mm_idx
        return (*(keys or ()), extra), mm_idx

    generate_block_hash_extra_keys._aspd = True
    kv_cache_utils.generate_block_hash_extra_keys = generate_block_hash_extra_keys
    if hasattr(block_pool, "generate_block_hash_extra_keys"):
        block_pool.generate_block_hash_extra_keys = generate_block_hash_extra_keys


def install() -> None:
    """Patch vLLM in this process (idempotent)."""
    _patch_model_runner()
    _patch_block_hash()

"""aspd_kernels: branch-masked attention kernels for decoding several branches of an answer inside one sequence.

Public API (SPEC sections 4-6): the ops ``branch_attention``, ``branch_attention_with_kvcache``,
``remap_positions`` and ``rope_append_kv`` (also under ``torch.ops.aspd``), the layout helper ``BranchLayout``
and the ASPD token ids ``AspdTokens``. The decoder lives in ``aspd_kernels.decoder``.
"""
from .branch_attention import branch_attention
from .branch_attention_with_kvcache import branch_attention_with_kvcache
from .layout import BranchLayout
from .remap_positions import remap_positions
from .rope_append_kv import rope_append_kv, rope_cos_sin_cache
from .tokens import AspdTokens

__version__ = "0.1.0"

__all__ = [
    "branch_attention",
    "branch_attention_with_kvcache",
    "remap_positions",
    "rope_append_kv",
    "rope_cos_sin_cache",
    "BranchLayout",
    "AspdTokens",
]

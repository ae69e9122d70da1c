"""The pure-torch backend: any device, any float dtype (float64 included); the CPU path of every op."""
from .attention import branch_attention_bwd, branch_attention_fwd, branch_attention_with_kvcache
from .positions import remap_positions
from .rope_append_kv import rope_append_kv

__all__ = ["branch_attention_fwd", "branch_attention_bwd", "branch_attention_with_kvcache", "remap_positions",
           "rope_append_kv"]

"""The Triton backend: one module per op, each exporting the functions of the backend contract (``_dispatch``).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``. Each module also lists ``AOT_SPECS``:
the kernels and signatures that ``.ci/aot_compile_triton.py`` compiles for sm_90 and sm_80 in CI.
"""
from .branch_attention_with_kvcache import branch_attention_with_kvcache  # noqa: E402
from .remap_positions import remap_positions  # noqa: E402
from .rope_append_kv import rope_append_kv  # noqa: E402
from .branch_attention import branch_attention_fwd, branch_attention_bwd  # noqa: F401

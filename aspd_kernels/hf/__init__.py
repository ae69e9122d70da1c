"""Hugging Face transformers integration: ``attn_implementation="aspd"``, training-data packing, special tokens.

Importing this module registers ``"aspd"`` with ``transformers.AttentionInterface`` and
``transformers.masking_utils.AttentionMaskInterface`` (``register(name)`` adds more names)::

    import aspd_kernels.hf as ah
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="aspd")
    tokens = ah.add_aspd_tokens(tok, model)                       # six special tokens, embeddings resized
    examples = [ah.encode_example(tok, prompt, answer) for prompt, answer in data]
    batch = ah.AspdCollator()(examples)                            # one packed row, cu_seq_lens, branch layout
    loss = model(**batch).loss                                     # branch_attention in every layer
    text = ah.layout_to_text(ids, segment, branch, tok)            # decoder storage -> readable text

Without ``aspd_segment``/``aspd_branch`` the model attends causally (``generate`` works as usual).
See ``attention.py`` for every keyword the attention call reads.
"""
from .attention import NAME, aspd_attention_forward, aspd_mask, register
from .collator import AspdCollator, group_by_tokens
from .packing import IGNORE_INDEX, build_example, encode_example
from .text import contiguous_order, interleaved_order, layout_to_text, to_reading_order
from .tokens import add_aspd_tokens

register()

__all__ = [
    "NAME",
    "register",
    "aspd_attention_forward",
    "aspd_mask",
    "AspdCollator",
    "group_by_tokens",
    "IGNORE_INDEX",
    "build_example",
    "encode_example",
    "add_aspd_tokens",
    "contiguous_order",
    "interleaved_order",
    "layout_to_text",
    "to_reading_order",
]

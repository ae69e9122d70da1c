"""The real-model ASPD pipeline: a prompt set, self-distilled serial answers, their transformation into
ASPD-format training data, and fine-tuning with ``attn_implementation="aspd"`` (``docs/aspd_pipeline.md``).

- ``prompts``     the committed prompt set (``prompts.jsonl``: train and held-out splits);
- ``distill``     the base model answers the prompts serially through ``ParallelDecoder`` (resumable CLI);
- ``structure``   lists and "Title: text" items found in an answer;
- ``rules``       independence (items that refer to each other or to their order), repetition, integrity;
- ``aspd_text``   pieces <-> ASPD-format ids, and ids read back to text;
- ``transform``   the transformation stage and its report (CLI);
- ``judge``       an optional yes/no judge over a local causal LM;
- ``finetune``    the CPU fine-tune (CLI).
"""
from .aspd_text import answer_ids, data_tokens, read_back
from .structure import Item, Section, find_sections, render
from .transform import Example, report, transform

__all__ = ["Item", "Section", "Example", "find_sections", "render", "answer_ids", "data_tokens", "read_back",
           "transform", "report"]

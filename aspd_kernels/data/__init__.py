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

The modules are imported one by one (``from aspd_kernels.data.transform import transform``): each CLI runs as
``python -m aspd_kernels.data.<name>``.
"""

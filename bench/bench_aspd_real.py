"""ASPD end to end on a real model: the fine-tuned SmolLM2 decoding model-driven (``generate``) against the same
model decoding serially and the base model decoding serially, plus the training-free plan mode (``generate_plan``)
on the base model, over the held-out prompts, interleaved prompt by prompt in one process.

    python -m bench --ops aspd-real                        # = python -m bench.bench_aspd_real
    python -m bench.bench_aspd_real --ft .aspd_data/ft --lists 16 --others 8 --max-new-tokens 128

Per answer: wall-clock (``DecodeResult.total_s``, prefill included), generated tokens, forward passes, sections
and branches, whether it parses back, sibling repetition, and the BASE model's mean token log-likelihood of the
answer's text read in order (given the same chat prompt). The fine-tuned model's serial answers are decoded with
the six ASPD tokens banned, so they are its plain answers. Writes ``<date>-cpu-aspd-real.md`` (tables, examples),
``.jsonl`` (every answer) and ``.png``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from tqdm import tqdm

from aspd_kernels.data.rules import list_repeats

from .aspd_real_answers import aspd_record, mean_logprob, plan_record, serial_record

MODES = ("ft-aspd", "ft-serial", "base-serial", "base-plan")
NR = "ft-aspd-nr"  # ft-aspd with decoder.no_sibling_repeat, decoded when --sibling-ngram is given


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.bench_aspd_real", description=__doc__.split("\n\n")[0])
    p.add_argument("--ft", default=".aspd_data/ft", help="the fine-tuned checkpoint (aspd_kernels.data.finetune)")
    p.add_argument("--base", default="smollm2")
    p.add_argument("--lists", type=int, default=16, help="held-out prompts that invite lists")
    p.add_argument("--others", type=int, default=8, help="held-out prompts that do not")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-branch-tokens", type=int, default=64)
    p.add_argument("--max-plan-tokens", type=int, default=80)
    p.add_argument("--sibling-ngram", type=int, default=0, metavar="N",
                   help=f"also decode {NR}: generate with decoder.no_sibling_repeat(tokens, N), no branch writes "
                        "an N-gram a sibling wrote (0: off)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the decoders' dtype, every mode alike (auto: bfloat16 on a CPU with native bfloat16, "
                        "aspd_kernels.cpu; the log-likelihood scorer stays float32)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="decode only every N-th prompt from the I-th (0-based) and write its records alone "
                        "(<stem>.shardIofN.jsonl), so N processes on N cores share the set; --merge reports them")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSONL",
                   help="write the report from these shards' records instead of decoding")
    p.add_argument("--rescore", action="store_true",
                   help="with --merge: score every record's text again with --base (after a fix to the scorer)")
    p.add_argument("--stem", default=None, help="output file name without extension (default <date>-cpu-aspd-real)")
    args = p.parse_args(argv)
    if args.rescore and not args.merge:
        p.error("--rescore needs --merge (a fresh run scores its answers already)")
    if args.shard is not None:
        try:
            i, n = (int(x) for x in args.shard.split("/"))
            if not 0 <= i < n:
                raise ValueError
        except ValueError:
            p.error(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}")
        args.shard = (i, n)
    return args


def ban(ids: list[int]):
    def proc(logits, histories):
        logits[:, ids] = float("-inf")
        return logits
    return proc


def run(args) -> list[dict]:
    from transformers import AutoTokenizer

    from aspd_kernels.cpu import resolve_dtype
    from aspd_kernels.data.aspd_text import data_tokens
    from aspd_kernels.data.distill import chat_ids
    from aspd_kernels.data.prompts import load_prompts
    from aspd_kernels.decoder import YU_INSTRUCTION, ParallelDecoder, PlanFormat, no_sibling_repeat
    from aspd_kernels.models import resolve_model_path

    base_path = resolve_model_path(args.base)
    tok_b, tok_f = AutoTokenizer.from_pretrained(base_path), AutoTokenizer.from_pretrained(args.ft)
    tokens = data_tokens(tok_f)
    eos = tok_b.eos_token_id
    kw = dict(dtype=resolve_dtype(args.dtype), max_seq_len=640, max_batch=1)
    dec_b, dec_f = ParallelDecoder.from_hf(base_path, **kw), ParallelDecoder.from_hf(args.ft, **kw)
    plan = PlanFormat.yu(tok_b)
    held = load_prompts("heldout")
    rows = [r for r in held if r["list"]][: args.lists] + [r for r in held if not r["list"]][: args.others]
    if args.shard is not None:
        rows = rows[args.shard[0]::args.shard[1]]
    n, mb = args.max_new_tokens, args.max_branch_tokens
    banned = ban(list(tokens.as_tuple()))
    dec_b.generate_serial(chat_ids(tok_b, "Hi."), 4, eos_token_id=eos)  # warm-up: first-call costs off the clock
    dec_f.generate(chat_ids(tok_b, "Hi."), 4, tokens, eos_token_id=eos)
    out = []
    for r in tqdm(rows, desc="aspd-real", unit="prompt", file=sys.stderr):
        p = chat_ids(tok_b, r["prompt"])
        pp = chat_ids(tok_b, f"{r['prompt']}\n{YU_INSTRUCTION}")
        recs, cpu = [], []
        calls = [
            lambda: aspd_record(tok_f, tokens, dec_f.generate(p, n, tokens, eos_token_id=eos, max_branch_tokens=mb),
                                len(p), "ft-aspd", eos),
            lambda: serial_record(tok_f, dec_f.generate_serial(p, n, eos_token_id=eos, logits_processor=banned),
                                  len(p), "ft-serial", eos),
            lambda: serial_record(tok_b, dec_b.generate_serial(p, n, eos_token_id=eos), len(p), "base-serial", eos),
            lambda: plan_record(tok_b, dec_b.generate_plan(pp, plan, max_plan_tokens=args.max_plan_tokens,
                                                           max_branch_tokens=mb, max_conclusion_tokens=48,
                                                           eos_token_id=eos), len(pp), "base-plan", eos),
        ]
        if args.sibling_ngram:
            calls.append(lambda: aspd_record(tok_f, tokens, dec_f.generate(
                p, n, tokens, eos_token_id=eos, max_branch_tokens=mb,
                logits_processor=no_sibling_repeat(tokens, args.sibling_ngram)), len(p), NR, eos))
        for call in calls:
            # process CPU time as well as wall-clock: on a CPU shared with other jobs, wall-clock swings with
            # their load; with one torch thread the process time is what the decode itself cost
            c0 = time.process_time()
            rec = call()
            rec["cpu_s"] = time.process_time() - c0
            recs.append(rec)
        for rec in recs:
            rec.update(id=r["id"], prompt=r["prompt"], list=r["list"])
        out += recs
    del dec_b, dec_f
    return score(out, base_path)


def score(recs: list[dict], base_path: str) -> list[dict]:
    """Set each record's ``base_logprob``: the float32 base model's mean log-probability per token of the
    record's text (read in order) after its prompt's chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aspd_kernels.data.distill import chat_ids

    tok = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    for rec in tqdm(recs, desc="base log-likelihood", unit="answer", file=sys.stderr):
        p = chat_ids(tok, rec["prompt"])
        rec["base_logprob"] = mean_logprob(base, p, tok.encode(rec["text"].strip(), add_special_tokens=False))
    return recs


def _mean(xs):
    xs = [x for x in xs if x == x]
    return statistics.mean(xs) if xs else float("nan")


def aspd_figures(a: list[dict], f: list[dict]) -> dict:
    """The figures of model-driven answers ``a`` against the same prompts' serial answers ``f`` (same order)."""
    row: dict = {}
    secs = [k for x in a for k in x["sections"]]
    row["parallel_share"] = sum(bool(x["sections"]) for x in a) / len(a)
    row["branches_per_section"] = _mean(secs)
    row["tokens_per_fp"] = sum(x["tokens"] for x in a) / max(1, sum(x["forward_passes"] for x in a))
    sp = [fs["s"] / x["s"] for x, fs in zip(a, f)]
    row["speedup_median"], row["speedup_mean"] = statistics.median(sp), _mean(sp)
    row["speedup_set"] = sum(x["s"] for x in f) / sum(x["s"] for x in a)
    cp = [fs["cpu_s"] / x["cpu_s"] for x, fs in zip(a, f)]
    row["cpu_speedup_median"], row["cpu_speedup_mean"] = statistics.median(cp), _mean(cp)
    row["cpu_speedup_set"] = sum(x["cpu_s"] for x in f) / sum(x["cpu_s"] for x in a)
    row["tps_ratio"] = (sum(x["tokens"] for x in a) / sum(x["s"] for x in a)) / (
        sum(x["tokens"] for x in f) / sum(x["s"] for x in f))
    # Amdahl: the share p of the answer's tokens decoded inside branches, K branches at once
    p = sum(x["branch_tokens"] for x in a) / max(1, sum(x["tokens"] for x in a))
    k = row["branches_per_section"] if secs else 1.0
    row["parallel_token_share"] = p
    row["amdahl_k"] = 1.0 / ((1 - p) + p / k) if k == k else 1.0
    row["amdahl_inf"] = 1.0 / (1 - p) if p < 1 else float("inf")
    # a section takes as many passes as its LONGEST branch: K_eff = branch tokens / sum of the longest branches
    lens = [sec for x in a for sec in x.get("branch_lens", [])]
    k_eff = sum(map(sum, lens)) / sum(map(max, lens)) if lens else float("nan")
    row["k_eff"] = k_eff
    row["amdahl_k_eff"] = 1.0 / ((1 - p) + p / k_eff) if k_eff == k_eff else 1.0
    row["ms_per_fp"] = 1e3 * sum(x["s"] for x in a) / max(1, sum(x["forward_passes"] for x in a))
    row["ms_per_fp_serial"] = 1e3 * sum(x["s"] for x in f) / max(1, sum(x["forward_passes"] for x in f))
    row["parses"] = sum(x["parses"] for x in a) / len(a)
    row["ll_ft_aspd_parallel_only"] = _mean([x["base_logprob"] for x in a if x["sections"]])
    row["ll"] = _mean([x["base_logprob"] for x in a])
    row["len"] = _mean([x["tokens"] for x in a])
    rep = [v for x in a for v in x["repeats"]]
    row["repeat_share"] = sum(rep) / len(rep) if rep else float("nan")
    # an answer cut by the token budget inside a section cuts every branch mid-sentence, and the text read in
    # order then jumps from each cut to the next item: the log-likelihood of the pairs where both answers ended
    # by themselves tells that apart from what parallel decoding does to a finished answer
    row["cut"] = _cut_share(a)
    done = [(x, fs) for x, fs in zip(a, f) if x["sections"] and x.get("stop") == fs.get("stop") == "eos"]
    row["uncut_pairs"] = len(done)
    row["ll_uncut"] = _mean([x["base_logprob"] for x, _ in done])
    row["ll_serial_uncut"] = _mean([fs["base_logprob"] for _, fs in done])
    # a greedy answer that loops (two equal items) is likely text to the scorer: the pairs where neither
    # answer's list repeats itself (rules.list_repeats, the same test on both texts) compare answers that do not
    par = [(x, fs) for x, fs in zip(a, f) if x["sections"]]
    row["serial_loops"] = _mean([float(list_repeats(fs["text"])) for _, fs in par])
    clean = [(x, fs) for x, fs in par if not list_repeats(x["text"]) and not list_repeats(fs["text"])]
    row["clean_pairs"] = len(clean)
    row["ll_clean"] = _mean([x["base_logprob"] for x, _ in clean])
    row["ll_serial_clean"] = _mean([fs["base_logprob"] for _, fs in clean])
    return row


def _cut_share(rs: list[dict]) -> float:
    """The share of answers that ended on the token budget (nan for records without a stop reason)."""
    known = [r["stop"] for r in rs if r.get("stop")]
    return sum(s == "max_new_tokens" for s in known) / len(known) if known else float("nan")


def summarize(recs: list[dict]) -> dict:
    by = {(r["id"], r["mode"]): r for r in recs}
    ids = sorted({r["id"] for r in recs})
    s: dict = {}
    for subset, keep in (("list", lambda i: by[(i, "ft-aspd")]["list"]), ("other", lambda i: not by[(i, "ft-aspd")]
                                                                          ["list"]), ("all", lambda i: True)):
        sel = [i for i in ids if keep(i)]
        if not sel:
            continue
        row = {"prompts": len(sel)}
        a = [by[(i, "ft-aspd")] for i in sel]
        f = [by[(i, "ft-serial")] for i in sel]
        b = [by[(i, "base-serial")] for i in sel]
        pl = [by[(i, "base-plan")] for i in sel]
        row.update(aspd_figures(a, f))
        nr = [by[(i, NR)] for i in sel if (i, NR) in by]
        if len(nr) == len(sel):
            row.update({f"{k}_nr": v for k, v in aspd_figures(nr, f).items()})
            row["ll_ft_serial_same_prompts_nr"] = _mean([by[(x["id"], "ft-serial")]["base_logprob"]
                                                         for x in nr if x["sections"]])
        for name, grp in (("ft-aspd", a), ("ft-serial", f), ("base-serial", b), ("base-plan", pl)):
            row[f"ll_{name}"] = _mean([x["base_logprob"] for x in grp])
            row[f"len_{name}"] = _mean([x["tokens"] for x in grp])
            row[f"cut_{name}"] = _cut_share(grp)
        row["ll_ft_serial_same_prompts"] = _mean([by[(x["id"], "ft-serial")]["base_logprob"]
                                                  for x in a if x["sections"]])
        row["plan_usable"] = sum(x.get("usable_plan", False) for x in pl) / len(pl)
        sp_plan = [bs["s"] / x["s"] for x, bs in zip(pl, b)]
        row["plan_speedup_mean"], row["plan_speedup_median"] = _mean(sp_plan), statistics.median(sp_plan)
        row["plan_cpu_speedup_mean"] = _mean([bs["cpu_s"] / x["cpu_s"] for x, bs in zip(pl, b)])
        prep = [v for x in pl for v in x["repeats"]]
        row["plan_repeat_share"] = sum(prep) / len(prep) if prep else float("nan")
        s[subset] = row
    return s


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    from aspd_kernels.cpu import native_bf16, resolve_dtype

    from .aspd_real_report import write_report

    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.stem or f"{date}-cpu-aspd-real")
    if args.merge:
        recs = [json.loads(line) for path in args.merge for line in open(path) if line.strip()]
        if args.rescore:
            from aspd_kernels.models import resolve_model_path

            recs = score(recs, resolve_model_path(args.base))
    else:
        recs = run(args)
    if args.shard is not None:
        path = f"{stem}.shard{args.shard[0]}of{args.shard[1]}.jsonl"
        with open(path, "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
        print(f"{len(recs)} records -> {path}")
        return 0
    with open(stem + ".jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    import transformers

    env = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
           "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
                     f"{args.threads} torch thread(s), decoders in {resolve_dtype(args.dtype)}, native bfloat16: "
                     f"{native_bf16()})",
           "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                       f"Python {platform.python_version()}",
           "command": "python -m bench.bench_aspd_real " + " ".join(sys.argv[1:] if argv is None else argv)}
    summary = summarize(recs)
    write_report(stem, recs, summary, env, args)
    print(open(stem + ".md").read().split("## Example answers")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Markdown report and plot of ``bench_aspd_real.py``."""
from __future__ import annotations


def _f(x, fmt="{:.2f}"):
    return "n/a" if x != x else fmt.format(x)


def _pct(x):
    return _f(100 * x, "{:.0f}%")


def table(summary: dict) -> str:
    cols = [c for c in ("list", "other", "all") if c in summary]
    rows = [
        ("held-out prompts", "prompts", lambda v: str(v)),
        ("fine-tuned `generate`: answers with a parallel section", "parallel_share", _pct),
        ("branches per section", "branches_per_section", _f),
        ("generated tokens per forward pass", "tokens_per_fp", _f),
        ("answer tokens sampled inside branches (p; no branch prompts, no appended end tokens)",
         "parallel_token_share", _pct),
        ("**speedup vs the same model serial, per answer: median**", "speedup_median", _f),
        ("**speedup per answer: mean**", "speedup_mean", _f),
        ("speedup over the set (sum of serial s / sum of parallel s)", "speedup_set", _f),
        ("process-CPU-time speedup per answer: median", "cpu_speedup_median", _f),
        ("process-CPU-time speedup per answer: mean", "cpu_speedup_mean", _f),
        ("process-CPU-time speedup over the set", "cpu_speedup_set", _f),
        ("tokens/s ratio (parallel / serial)", "tps_ratio", _f),
        ("Amdahl bound 1/((1-p)+p/K), K = branches per section", "amdahl_k", _f),
        ("Amdahl bound 1/(1-p) (any number of branches)", "amdahl_inf", _f),
        ("K_eff: branch tokens / tokens of each section's longest branch", "k_eff", _f),
        ("bound from the branch lengths 1/((1-p)+p/K_eff) (passes saved if a pass cost the same for any rows)",
         "amdahl_k_eff", _f),
        ("ms per forward pass: `generate` (prefill included)", "ms_per_fp", _f),
        ("ms per forward pass: fine-tuned serial", "ms_per_fp_serial", _f),
        ("answers that parse back (`from_aspd_tokens`)", "parses", _pct),
        ("sections whose sibling branches repeat each other", "repeat_share", _pct),
        ("base log-lik/token: fine-tuned `generate`", "ll_ft-aspd", _f),
        ("base log-lik/token: fine-tuned serial", "ll_ft-serial", _f),
        ("base log-lik/token: base serial", "ll_base-serial", _f),
        ("base log-lik/token: base plan mode", "ll_base-plan", _f),
        ("base log-lik/token, answers WITH a section: `generate`", "ll_ft_aspd_parallel_only", _f),
        ("... the same prompts, fine-tuned serial", "ll_ft_serial_same_prompts", _f),
        ("answers cut by the token budget: `generate`", "cut_ft-aspd", _pct),
        ("answers cut by the token budget: fine-tuned serial", "cut_ft-serial", _pct),
        ("answers cut by the token budget: base serial", "cut_base-serial", _pct),
        ("prompts where the `generate` answer (with a section) and the serial one both ended with EOS",
         "uncut_pairs", lambda v: str(v)),
        ("... base log-lik/token there: `generate`", "ll_uncut", _f),
        ("... base log-lik/token there: fine-tuned serial", "ll_serial_uncut", _f),
        ("... the same prompts: fine-tuned serial answers whose list repeats itself (two equal titles or bodies)",
         "serial_loops", _pct),
        ("prompts where neither answer's list repeats itself (`rules.list_repeats` on both texts)",
         "clean_pairs", lambda v: str(v)),
        ("... base log-lik/token there: `generate`", "ll_clean", _f),
        ("... base log-lik/token there: fine-tuned serial", "ll_serial_clean", _f),
        ("answer length (generated tokens): `generate`", "len_ft-aspd", _f),
        ("answer length: fine-tuned serial", "len_ft-serial", _f),
        ("answer length: base serial", "len_base-serial", _f),
        ("answer length: base plan mode", "len_base-plan", _f),
        ("plan mode (base): usable plans", "plan_usable", _pct),
        ("plan mode speedup vs base serial, per answer: mean", "plan_speedup_mean", _f),
        ("plan mode speedup per answer: median", "plan_speedup_median", _f),
        ("plan mode process-CPU-time speedup per answer: mean", "plan_cpu_speedup_mean", _f),
        ("plan mode: sections whose branches repeat each other", "plan_repeat_share", _pct),
    ]
    if "speedup_mean_nr" in summary[cols[0]]:
        nr = "`generate` + `no_sibling_repeat`"
        rows += [
            (f"{nr}: answers with a parallel section", "parallel_share_nr", _pct),
            (f"{nr}: branches per section", "branches_per_section_nr", _f),
            (f"{nr}: generated tokens per forward pass", "tokens_per_fp_nr", _f),
            (f"{nr}: answer tokens inside branches (p)", "parallel_token_share_nr", _pct),
            (f"{nr}: bound from the branch lengths 1/((1-p)+p/K_eff)", "amdahl_k_eff_nr", _f),
            (f"**{nr}: speedup vs the same model serial, per answer: median**", "speedup_median_nr", _f),
            (f"**{nr}: speedup per answer: mean**", "speedup_mean_nr", _f),
            (f"{nr}: answers that parse back", "parses_nr", _pct),
            (f"{nr}: sections whose sibling branches repeat each other", "repeat_share_nr", _pct),
            (f"{nr}: base log-lik/token", "ll_nr", _f),
            (f"{nr}: base log-lik/token, answers WITH a section", "ll_ft_aspd_parallel_only_nr", _f),
            ("... the same prompts, fine-tuned serial", "ll_ft_serial_same_prompts_nr", _f),
            (f"{nr}: answers cut by the token budget", "cut_nr", _pct),
            (f"{nr}: prompts where it (with a section) and the serial answer both ended with EOS",
             "uncut_pairs_nr", lambda v: str(v)),
            ("... base log-lik/token there: it", "ll_uncut_nr", _f),
            ("... base log-lik/token there: fine-tuned serial", "ll_serial_uncut_nr", _f),
            (f"{nr}: prompts where neither answer's list repeats itself", "clean_pairs_nr", lambda v: str(v)),
            ("... base log-lik/token there: it", "ll_clean_nr", _f),
            ("... base log-lik/token there: fine-tuned serial", "ll_serial_clean_nr", _f),
            (f"{nr}: answer length", "len_nr", _f),
        ]
    head = "| figure | " + " | ".join({"list": "list-inviting", "other": "not list-inviting",
                                       "all": "all"}[c] for c in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]
    for label, key, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(summary[c][key]) for c in cols) + " |")
    return "\n".join(lines)


def examples(recs: list[dict], k: int = 3) -> str:
    by = {(r["id"], r["mode"]): r for r in recs}
    ids = [r["id"] for r in recs if r["mode"] == "ft-aspd" and r["sections"]][:k]
    ids += [r["id"] for r in recs if r["mode"] == "ft-aspd" and not r["sections"]][:1]
    out = []
    for i in ids:
        a = by[(i, "ft-aspd")]
        out.append(f"### {a['prompt']}\n")
        for mode in ("ft-aspd", "ft-aspd-nr", "ft-serial", "base-serial", "base-plan"):
            r = by.get((i, mode))
            if r is None:
                continue
            info = (f"{r['tokens']} tokens, {r['forward_passes']} forward passes, {r['s']:.1f} s"
                    + (f", sections {r['sections']}" if r["sections"] else ""))
            out.append(f"**{mode}** ({info}):\n\n```text\n{r['text'].strip()}\n```\n")
    return "\n".join(out)


def plot(stem: str, recs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["id"], r["mode"]): r for r in recs}
    ids = sorted({r["id"] for r in recs})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    sp = [by[(i, "ft-serial")]["s"] / by[(i, "ft-aspd")]["s"] for i in ids]
    colors = ["C1" if by[(i, "ft-aspd")]["sections"] else "C0" for i in ids]
    axes[0].bar(range(len(ids)), sp, color=colors)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_xlabel("held-out prompt (orange: answer with a parallel section)")
    axes[0].set_ylabel("speedup (serial s / generate s)")
    axes[0].set_title("fine-tuned SmolLM2-135M: generate vs serial", fontsize=9)
    modes = ("ft-aspd", "ft-serial", "base-serial", "base-plan")
    ll = [[by[(i, m)]["base_logprob"] for i in ids if by[(i, m)]["base_logprob"] == by[(i, m)]["base_logprob"]]
          for m in modes]
    axes[1].boxplot(ll, tick_labels=modes)
    axes[1].set_ylabel("base model mean log-prob / token")
    axes[1].set_title("quality: the base model's log-likelihood of each answer", fontsize=9)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)
    plt.close(fig)


def write_report(stem: str, recs: list[dict], summary: dict, env: dict, args) -> None:
    import os

    plot(stem, recs)
    md = [f"# ASPD end to end on SmolLM2-135M-Instruct (CPU)\n",
          f"- date: {env['date']}; commit: {env['commit']}",
          f"- device: {env['device']}",
          f"- versions: {env['versions']}",
          f"- command: `{env['command']}`",
          f"- fine-tuned checkpoint: `{args.ft}`; max new tokens {args.max_new_tokens}, max branch tokens "
          f"{args.max_branch_tokens}; greedy; "
          + (f"ft-aspd-nr: `generate` with `no_sibling_repeat(tokens, {args.sibling_ngram})`; "
             if args.sibling_ngram else "")
          + "wall-clock = `DecodeResult.total_s` (prefill included), modes "
          "interleaved prompt by prompt\n",
          table(summary), "",
          f"![speedup and quality]({os.path.basename(stem)}.png)\n",
          "## Example answers\n", examples(recs)]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md) + "\n")

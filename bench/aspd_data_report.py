"""The data side of the real-model ASPD run, as a results page: the distilled answers, the transformation report,
the fine-tune's loss (its PNG copied beside the page).

    python -m bench.aspd_data_report --data .aspd_data --out bench/results
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys


def _jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.aspd_data_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=".aspd_data")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--note", default="", help="a line on how the run was made (commands, limits)")
    args = p.parse_args(argv)
    from aspd_kernels.data.prompts import load_prompts
    from aspd_kernels.data.aspd_text import from_json
    from aspd_kernels.data.transform import Example, format_report, report

    serial = _jsonl(os.path.join(args.data, "serial.jsonl"))
    aspd = _jsonl(os.path.join(args.data, "aspd.jsonl"))
    loss = _jsonl(os.path.join(args.data, "ft", "loss.jsonl"))
    exs = [Example(r["id"], r["prompt"], r["text"], from_json(r["pieces"]), [0] * r["answer_tokens"],
                   r["branch_tokens"], r["refused"], r["trimmed"]) for r in aspd]
    train = load_prompts("train")
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    stem = os.path.join(args.out, f"{date}-cpu-aspd-data")
    shutil.copyfile(os.path.join(args.data, "ft", "loss.png"), stem + "-loss.png")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    n_tok = [r["tokens"] for r in serial]
    first = sum(x["loss"] for x in loss[:5]) / max(1, len(loss[:5]))
    last = sum(x["loss"] for x in loss[-10:]) / max(1, len(loss[-10:]))
    par = next((e for e in exs if e.parallel and len(e.sections[0].items) >= 3), next(e for e in exs if e.parallel))
    md = [
        "# Real-model ASPD data: self-distilled SmolLM2-135M-Instruct answers, transformed\n",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; commit: {commit}; "
        f"device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible; what else ran "
        "beside the distillation and the fine-tune, if anything, is in the note below)",
        f"- command: `python -m bench.aspd_data_report {' '.join(sys.argv[1:] if argv is None else argv)}`",
        *([f"- {args.note}"] if args.note else []),
        "",
        "## Distillation\n",
        "| figure | value |", "|---|---|",
        f"| train prompts in the set | {len(train)} |",
        f"| answered (greedy, chat template, `generate_serial_batch`) | {len(serial)} |",
        f"| of them list-inviting | {sum(r['list'] for r in serial)} |",
        f"| generated tokens | {sum(n_tok)} (mean {sum(n_tok) / max(1, len(n_tok)):.0f}) |",
        f"| ended with EOS inside the cap | {sum(r['finished'] for r in serial)} |",
        "",
        "## Transformation (`python -m aspd_kernels.data.transform`)\n",
        format_report(report(exs)),
        "",
        "## Fine-tune (`python -m aspd_kernels.data.finetune`)\n",
        f"{len(loss)} steps, {sum(x['tokens'] for x in loss)} tokens, {loss[-1]['s']:.0f} s; loss (nats/token over "
        f"the answers) {first:.3f} (mean of the first 5 steps) -> {last:.3f} (mean of the last 10).\n",
        f"![loss]({os.path.basename(stem)}-loss.png)\n",
        "## One transformed answer\n",
        f"Prompt: {par.prompt}\n",
        "```text", _aspd_text(par), "```",
    ]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"-> {stem}.md")
    return 0


def _aspd_text(ex) -> str:
    from aspd_kernels.data.structure import Section

    out = []
    for p in ex.pieces:
        if isinstance(p, str):
            out.append(p)
            continue
        out.append("".join(f"<|title|>{it.title}<|/title|>" for it in p.items) + "<|para|>")
        out.append("".join(f"<|branch|>{it.title}:{it.body}<|/branch|>" for it in p.items) + "<|/para|>")
    return "".join(out)


if __name__ == "__main__":
    sys.exit(main())

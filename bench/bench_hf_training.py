"""One training step (forward + backward) of a transformers causal LM on a packed row of branch-structured
examples: ``attn_implementation="aspd"`` (``branch_attention``; layout ids, no mask) against ``"sdpa"`` and
``"eager"`` given the dense block-diagonal 4-D mask and ``"flex_attention"`` given a ``BlockMask`` built from the
same ids. Standalone (not part of ``python -m bench``)::

    python -m bench.bench_hf_training                                  # GPU: 8k, 16k, 32k packed tokens
    python -m bench.bench_hf_training --tokens 16384 --impls aspd,flex_attention --out /tmp/train.jsonl
    python -m bench.bench_hf_training --device cpu --tokens 256 --hidden 64 --heads 4 --kv-heads 2 \\
        --intermediate 128 --vocab 512 --dtype float32                # harness check on a CPU

Each example: serial prefix (1/4), ``--branches`` equal branches (1/2, contiguous), serial suffix (1/4), positions
``same-sequential``; examples of ``--example-tokens`` packed to ``--tokens``. ``ms`` = median of ``--reps`` steps
(CUDA events; wall clock on a CPU) after two warm-up steps (compilation); ``build_ms`` = building the mask / block
mask from the ids (paid whenever the layout changes, i.e. every batch); peak memory over the timed steps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import aspd_kernels.hf as ah
from aspd_kernels import BranchLayout


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_hf_training", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="8192,16384,32768", help="packed tokens per row, comma-separated")
    ap.add_argument("--impls", default="aspd,sdpa,eager,flex_attention")
    ap.add_argument("--model", choices=["llama", "qwen2"], default="llama")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--example-tokens", type=int, default=2048)
    ap.add_argument("--branches", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="", help="append one JSON line per measurement to this file")
    return ap.parse_args(argv)


def packed_layout(n: int, example: int, k: int):
    """(segment, branch, positions, cu_seqlens, lengths) of ``n`` tokens of examples of ``example`` tokens."""
    segs, brs, poss, lengths = [], [], [], []
    left = n
    while left > 0:
        e = min(example, left)
        body = e // 2 // k * k
        pre = (e - body) // 2
        sections = [("serial", pre)]
        if body:
            sections.append(("parallel", [body // k] * k))
        sections.append(("serial", e - pre - body))
        lay = BranchLayout.from_sections(sections)
        segs.append(lay.segment)
        brs.append(lay.branch)
        poss.append(lay.positions("same-sequential"))
        lengths.append(e)
        left -= e
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return torch.cat(segs), torch.cat(brs), torch.cat(poss), cu, lengths


def dense_mask(seg, br, doc) -> torch.Tensor:
    """bool [N, N] (built on seg's device): same example, causal, branch rule."""
    n = seg.numel()
    idx = torch.arange(n, device=seg.device)
    return ((doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])
            & ((seg[:, None] != seg[None, :]) | (br[:, None] == br[None, :])))


def inputs_for(impl: str, ids, pos, seg, br, doc, cu, lengths, dtype):
    """(forward kwargs, build seconds) for ``impl``."""
    base = {"input_ids": ids, "labels": ids, "position_ids": pos, "use_cache": False}
    sync(ids.device)
    t0 = time.perf_counter()
    if impl == "aspd":
        kw = dict(base, aspd_segment=seg[None], aspd_branch=br[None], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                  max_length_q=max(lengths), max_length_k=max(lengths), aspd_check_values=False)
    elif impl == "sdpa":
        kw = dict(base, attention_mask=dense_mask(seg, br, doc)[None, None])
    elif impl == "eager":
        m = dense_mask(seg, br, doc)
        kw = dict(base, attention_mask=torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(
            ~m, torch.finfo(dtype).min)[None, None])
    elif impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, k):
            return (doc[q] == doc[k]) & (k <= q) & ((seg[k] != seg[q]) | (br[k] == br[q]))

        n = ids.shape[1]
        # compiled on a GPU, as transformers' own flex mask builder does
        block = create_block_mask(mask_mod, 1, None, n, n, device=ids.device, _compile=ids.device.type == "cuda")
        kw = dict(base, attention_mask=block)
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    sync(ids.device)
    return kw, time.perf_counter() - t0


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def step_ms(model, kw, dev) -> float:
    model.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(**kw).loss.backward()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    model(**kw).loss.backward()
    return (time.perf_counter() - t0) * 1e3


def main(argv=None) -> list[dict]:
    args = parse(argv)
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[args.model]
    cfg = cls(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
              num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
              max_position_embeddings=1 << 17)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=ah.NAME, dtype=dtype).to(dev)
    model.train()
    rows = []
    for n in [int(x) for x in args.tokens.split(",")]:
        seg, br, pos, cu, lengths = packed_layout(n, args.example_tokens, args.branches)
        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        seg, br, cu, doc = seg.to(dev), br.to(dev), cu.to(dev), doc.to(dev)
        pos = pos.to(dev, torch.int64)[None]
        ids = torch.randint(0, args.vocab, (1, n), device=dev)
        for impl in args.impls.split(","):
            row = {"tokens": n, "impl": impl, "model": args.model, "layers": args.layers, "hidden": args.hidden,
                   "heads": args.heads, "kv_heads": args.kv_heads, "dtype": args.dtype,
                   "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                   "example_tokens": args.example_tokens, "branches": args.branches}
            try:
                model.set_attn_implementation(impl)
                kw, build = inputs_for(impl, ids, pos, seg, br, doc, cu, lengths, dtype)
                for _ in range(2):
                    step_ms(model, kw, dev)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                times = [step_ms(model, kw, dev) for _ in range(args.reps)]
                row.update(status="ok", ms=statistics.median(times), build_ms=build * 1e3,
                           peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None)
            except torch.cuda.OutOfMemoryError:
                row.update(status="oom")
            except Exception as exc:  # noqa: BLE001 - one failed implementation must not end the table
                row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:300])
            finally:
                kw = None
                model.zero_grad(set_to_none=True)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print_table(rows)
    return rows


def print_table(rows: list[dict]) -> None:
    print("| tokens | impl | fwd+bwd ms | tokens/s | mask build ms | peak GiB | aspd speed-up |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    ref = {r["tokens"]: r["ms"] for r in rows if r["impl"] == "aspd" and r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            print(f"| {r['tokens']} | {r['impl']} | {r['status']} | | | | |")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        up = f"{r['ms'] / ref[r['tokens']]:.2f}x" if r["tokens"] in ref else "-"
        print(f"| {r['tokens']} | {r['impl']} | {r['ms']:.1f} | {r['tokens'] / r['ms'] * 1e3:,.0f} | "
              f"{r['build_ms']:.1f} | {peak} | {up} |")


if __name__ == "__main__":
    main()

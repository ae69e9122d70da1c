"""Sweep the Triton decode tiles on this GPU and write its tuned table (``aspd_kernels/triton/tuned/<device>.json``,
read by ``tile_configs.decode_config_for``; format in ``aspd_kernels/triton/tuned_tiles.py``).

    python -m bench.tune_decode [--grid quick|full] [--time-limit 150] [--out-json PATH] [--results PATH.jsonl]
    python -m bench.tune_decode --dry        # CPU, Triton interpreted, tiny shapes: the whole flow, no timing claim

Per row bucket (K = 1, 16, 64 new tokens at GQA 4: 16-, 64- and 128-row tiles) and cache kind (contiguous, paged
with 16-slot pages), at N = 32k, Hq/Hkv 32/8, D = 128, bf16 (``--grid full`` adds D = 64): every (key tile, warps,
stages) of the grid (quick: key tiles 64/128 x warps 4/8 x stages 4/5, and 2 warps; about 2 s a config with its
compile, 9 configs and 4 split counts a bucket: about 2 minutes for the 6 buckets, an estimate), each checked
against the default tiles' output, then timed as CUDA-graph replays with L2 emptied by reading before every replay
(``bench.timing``, as ``bench.decode_probe``). The best beats the default by at least ``--min-gain`` or the
bucket keeps the default (no entry). At the best tiles, split counts around FA3's
rule are timed too (``split_probe`` in the entry: recorded for the next decision, not applied). The JSON and the
JSONL rows are written after every bucket, so a run cut by ``--time-limit`` keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time

if "--dry" in sys.argv[1:]:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from aspd_kernels.triton import tuned_tiles  # noqa: E402
from aspd_kernels.triton.tile_configs import Config, block_d, capability, decode_config  # noqa: E402

from .common import git_commit  # noqa: E402
from .decode_inputs import decode_inputs, tk, triton_step  # noqa: E402
from .timing import measure  # noqa: E402

GRIDS = {  # (block_n, num_warps, num_stages)
    "quick": [(bn, w, s) for bn in (64, 128) for w in (4, 8) for s in (4, 5)] + [(64, 2, 4)],
    "full": [(bn, w, s) for bn in (32, 64, 128) for w in (2, 4, 8) for s in (3, 4, 5, 6)],
    "dry": [(32, 4, 3)],
}


def _time(fn, device: torch.device) -> float:
    """Microseconds: median of graph replays, L2 emptied by reading (GPU); perf_counter medians on the CPU."""
    t = measure(fn, device, min_reps=20, max_reps=40, warmup=1, graph=True, flush=True, flush_by="read")
    return t.ms * 1e3


def _write_json(path: str, table: dict) -> None:
    tuned_tiles.validate(table, path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def sweep_bucket(shape: dict, k: int, paged: bool, grid: list, device: torch.device, cap: int, deadline: float,
                 log) -> tuple[dict | None, list[dict]]:
    """(entry or None, result rows) for one (row bucket, paged) at ``shape``."""
    n, hq, hkv, d, dtype = shape["n"], shape["hq"], shape["hkv"], shape["d"], shape["dtype"]
    x = decode_inputs(n, k, hq, hkv, d, dtype, device, paged=paged)
    base = decode_config(k * (hq // hkv), d, dtype, cap)
    want = triton_step(x, config=base).float()
    key = dict(op="decode", dtype=tuned_tiles.dtype_name(dtype), block_d=block_d(d), block_m=base.block_m,
               paged=paged)
    rows = []

    def timed(cfg: Config, splits: int | None = None) -> dict:
        r = dict(key, K=k, n=n, block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                 splits=splits or "auto")
        try:
            out = triton_step(x, config=cfg, num_splits=splits).float()
            err = ((out - want).norm() / want.norm().clamp_min(1e-30)).item()
            r["rel_err"] = err
            if not err < 2e-2:
                r.update(status="error", reason=f"output differs from the default tiles' (rel err {err:.1e})")
            else:
                r.update(status="ok", us=_time(lambda: triton_step(x, config=cfg, num_splits=splits), device))
        except Exception as exc:  # noqa: BLE001 - a config that does not compile or launch is a row, not a crash
            r.update(status="error", reason=f"{type(exc).__name__}: {str(exc).strip()[:200]}")
        rows.append(r)
        log(r)
        return r

    default = timed(base)
    best = default if default["status"] == "ok" else None
    for bn, w, st in grid:
        if time.monotonic() > deadline:
            break
        if (bn, w, st) == (base.block_n, base.num_warps, base.num_stages):
            continue
        r = timed(Config(base.block_m, bn, w, st))
        if r["status"] == "ok" and (best is None or r["us"] < best["us"]):
            best = r
    if best is None or default["status"] != "ok":
        return None, rows
    cfg = Config(base.block_m, best["block_n"], best["num_warps"], best["num_stages"])
    programs = hkv * -(-(k * (hq // hkv)) // cfg.block_m)
    rule = tk.num_splits_for(1, hkv, programs // hkv, n, x["q"].device, cfg.block_n)
    sms = tk._sm_count(device.index if device.type == "cuda" else None)
    probe = {}
    for s in sorted({max(1, rule // 2), rule, 2 * rule, max(1, sms // programs)}):
        if time.monotonic() > deadline:
            break
        r = timed(cfg, s)
        if r["status"] == "ok":
            probe[str(s)] = r["us"]
    entry = dict(key, block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, us=best["us"],
                 default_us=default["us"], default=[base.block_n, base.num_warps, base.num_stages],
                 split_rule=rule, split_probe=probe)
    return entry, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tune_decode", description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=("quick", "full"), default="quick")
    ap.add_argument("--time-limit", type=float, default=150.0, help="seconds; what is measured by then is kept")
    ap.add_argument("--min-gain", type=float, default=0.03, help="an entry must beat the default by this fraction")
    ap.add_argument("--out-json", default="", help="default: aspd_kernels/triton/tuned/<device>.json (GPU)")
    ap.add_argument("--results", default="", help="JSONL of every timing (default: beside --out-json)")
    ap.add_argument("--dry", action="store_true", help="CPU, interpreted, tiny shapes (a flow check)")
    args = ap.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.time_limit
    if args.dry:
        device, name, cap = torch.device("cpu"), "cpu-dry", 90
        shapes = [dict(n=160, hq=4, hkv=1, d=16, dtype=torch.float16)]
        buckets, grid = [(1, False), (16, True)], GRIDS["dry"]
        out_json = args.out_json or os.path.join("/tmp", "aspd-tune-dry", "cpu-dry.json")
    else:
        if not torch.cuda.is_available():
            sys.exit("tune_decode: needs a CUDA GPU (or --dry)")
        device = torch.device("cuda")
        name, cap = torch.cuda.get_device_name(), capability(torch.device("cuda"))
        shapes = [dict(n=32768, hq=32, hkv=8, d=128, dtype=torch.bfloat16)]
        if args.grid == "full":
            shapes.append(dict(n=32768, hq=32, hkv=8, d=64, dtype=torch.bfloat16))
        # contiguous first (the key benchmark's cases), so a cut run has swept those
        buckets, grid = [(1, False), (16, False), (64, False), (1, True), (16, True), (64, True)], GRIDS[args.grid]
        out_json = args.out_json or os.path.join(tuned_tiles.TUNED_DIR, tuned_tiles.device_slug(name) + ".json")
    results = args.results or out_json[: -len(".json")] + "-sweep.jsonl"
    table = dict(device=name, capability=cap, triton=__import__("triton").__version__, torch=torch.__version__,
                 date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), commit=git_commit(),
                 command="python -m bench.tune_decode " + " ".join(argv if argv is not None else sys.argv[1:]),
                 shape={k: (str(v).replace("torch.", "") if k == "dtype" else v) for k, v in shapes[0].items()},
                 entries=[])
    os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
    with open(results, "w") as f:
        def log(r):
            f.write(json.dumps(r) + "\n")
            f.flush()
            us = f"{r['us']:8.1f} us" if "us" in r else r.get("reason", "")[:60]
            print(f"K={r['K']:3d} {'paged' if r['paged'] else 'contig'} d{r['block_d']} n{r['block_n']:<3d} "
                  f"w{r['num_warps']} s{r['num_stages']} splits={r['splits']}: {us}", flush=True)

        for shape in shapes:
            for k, paged in buckets:
                if time.monotonic() > deadline:
                    print(f"time limit {args.time_limit:.0f}s: K={k} paged={paged} not swept", flush=True)
                    continue
                entry, _ = sweep_bucket(shape, k, paged, grid, device, cap, deadline, log)
                # dry: every bucket's best is written, so the flow writes (and validates) entries too
                if entry is not None and (args.dry or entry["us"] <= (1 - args.min_gain) * entry["default_us"]):
                    table["entries"].append(entry)
                _write_json(out_json, table)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    _write_json(out_json, table)
    print(f"\n{len(table['entries'])} tuned entries -> {out_json} ({time.monotonic() - start:.0f}s); "
          f"timings -> {results}")
    print(f"{'bucket':<28} {'default us':>10} {'tuned us':>9}  tiles (n, warps, stages)  splits rule -> probe")
    for e in table["entries"]:
        print(f"{e['dtype']} d{e['block_d']} m{e['block_m']} {'paged' if e['paged'] else 'contig':<6}      "
              f"{e['default_us']:10.1f} {e['us']:9.1f}  {e['block_n']}, {e['num_warps']}, {e['num_stages']}"
              f"  (was {e['default']})  {e['split_rule']} -> {e['split_probe']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Per-device tuned tiles, vLLM-style: ``tuned/<device>.json`` tables written by the sweep (``bench/tune_decode.py``
on a GPU), read here, fixed for the life of the process. No runtime autotuning: a table is a file in the package,
so a CUDA-graph capture or a torch.compile trace sees the same tiles on every step.

A table::

    {"device": "NVIDIA H200", "capability": 90, "triton": "3.6.0", "date": ..., "commit": ..., "command": ...,
     "entries": [{"op": "decode", "dtype": "bf16", "block_d": 128, "block_m": 16, "paged": false,
                  "block_n": 64, "num_warps": 4, "num_stages": 4, "us": 41.0, "default_us": 47.5}, ...]}

keyed by op, dtype, head size class (the padded width ``block_d``), row bucket (``block_m``, the query rows of a
tile the default table picks, so a tuned entry never changes how rows are tiled) and paged/contiguous. An entry
replaces only ``block_n``, ``num_warps`` and ``num_stages``; anything not in the table falls back to the default
tables of ``tile_configs``. The file name is the device name in lower case with every other character a dash
(``device_slug``); an entry is used only on a device of that name and of the table's capability. CI compiles every
entry of every committed table for its capability (``aot_specs``), with the spill, shared-memory and overlap checks.
"""
from __future__ import annotations

import functools
import json
import os

import torch

TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")
OPS = ("decode",)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
KEY_FIELDS = ("op", "dtype", "block_d", "block_m", "paged")
TILE_FIELDS = ("block_n", "num_warps", "num_stages")


def device_slug(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"`` (the table's file name without ``.json``)."""
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug


def dtype_name(dtype: torch.dtype) -> str | None:
    return next((k for k, v in DTYPES.items() if v == dtype), None)


def validate(table: dict, where: str = "table") -> None:
    """Raise ``ValueError`` naming the field when ``table`` is not a well-formed tuned table."""
    for field in ("device", "capability", "entries"):
        if field not in table:
            raise ValueError(f"{where}: missing {field!r}")
    if not isinstance(table["capability"], int) or table["capability"] < 70:
        raise ValueError(f"{where}: capability must be an int >= 70, got {table['capability']!r}")
    seen = set()
    for i, e in enumerate(table["entries"]):
        missing = [f for f in KEY_FIELDS + TILE_FIELDS if f not in e]
        if missing:
            raise ValueError(f"{where}: entry {i} lacks {missing}")
        if e["op"] not in OPS or e["dtype"] not in DTYPES or not isinstance(e["paged"], bool):
            raise ValueError(f"{where}: entry {i} has op/dtype/paged {e['op']!r}/{e['dtype']!r}/{e['paged']!r}")
        for f in ("block_d", "block_m", "block_n", "num_warps"):
            v = e[f]
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"{where}: entry {i} {f} = {v!r} is not a power of two")
        if e["block_n"] < 16 or not isinstance(e["num_stages"], int) or not 1 <= e["num_stages"] <= 8:
            raise ValueError(f"{where}: entry {i} block_n {e['block_n']} (>= 16) / num_stages {e['num_stages']}")
        key = tuple(e[f] for f in KEY_FIELDS)
        if key in seen:
            raise ValueError(f"{where}: entry {i} repeats the key {key}")
        seen.add(key)


def load(path: str) -> dict:
    with open(path) as f:
        table = json.load(f)
    validate(table, path)
    return table


@functools.cache
def committed_tables() -> tuple[tuple[str, dict], ...]:
    """``((path, table), ...)`` of every ``tuned/*.json`` in the package, sorted by name."""
    if not os.path.isdir(TUNED_DIR):
        return ()
    return tuple((os.path.join(TUNED_DIR, n), load(os.path.join(TUNED_DIR, n)))
                 for n in sorted(os.listdir(TUNED_DIR)) if n.endswith(".json"))


@functools.cache
def _index(slug: str, capability: int) -> dict:
    for path, table in committed_tables():
        if os.path.basename(path)[: -len(".json")] == slug and table["capability"] == capability:
            return {tuple(e[f] for f in KEY_FIELDS): e for e in table["entries"]}
    return {}


@functools.cache
def _device_slug(index: int) -> str:
    return device_slug(torch.cuda.get_device_name(index))


def lookup(op: str, dtype: torch.dtype, block_d: int, block_m: int, paged: bool, device: torch.device,
           capability: int) -> dict | None:
    """The tuned entry for this key on ``device`` (a CUDA device), or None: not CUDA, no table, no entry."""
    name = dtype_name(dtype)
    if device.type != "cuda" or name is None:
        return None
    slug = _device_slug(torch.cuda.current_device() if device.index is None else device.index)
    return _index(slug, capability).get((op, name, block_d, block_m, paged))

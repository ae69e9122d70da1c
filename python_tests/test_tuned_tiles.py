"""Tuned decode tiles: the table format and its checks, the lookup (device name + capability + key), the CI specs
made from a table, and the sweep and bandwidth stages end to end in their CPU dry modes."""
import json
import os

import pytest
import torch

from aspd_kernels.triton import aot_specs, tuned_tiles
from aspd_kernels.triton.tile_configs import decode_config, decode_config_for


def _table(**over):
    entry = dict(op="decode", dtype="bf16", block_d=128, block_m=16, paged=False, block_n=128, num_warps=8,
                 num_stages=5)
    entry.update(over)
    return {"device": "NVIDIA H200", "capability": 90, "entries": [entry]}


def test_a_wellformed_table_validates():
    tuned_tiles.validate(_table())


@pytest.mark.parametrize("bad, what", [
    (dict(block_n=96), "power of two"),
    (dict(num_warps=3), "power of two"),
    (dict(op="prefill"), "op/dtype/paged"),
    (dict(dtype="fp32"), "op/dtype/paged"),
    (dict(num_stages=0), "num_stages"),
    (dict(block_n=8), "block_n"),
])
def test_bad_entries_are_refused_by_name(bad, what):
    with pytest.raises(ValueError, match=what):
        tuned_tiles.validate(_table(**bad))


def test_missing_fields_and_repeated_keys_are_refused():
    t = _table()
    del t["entries"][0]["num_stages"]
    with pytest.raises(ValueError, match="num_stages"):
        tuned_tiles.validate(t)
    t = _table()
    t["entries"].append(dict(t["entries"][0]))
    with pytest.raises(ValueError, match="repeats"):
        tuned_tiles.validate(t)
    with pytest.raises(ValueError, match="capability"):
        tuned_tiles.validate({**_table(), "capability": "sm90"})


def test_device_slug():
    assert tuned_tiles.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert tuned_tiles.device_slug("NVIDIA  H200 (x)") == "nvidia-h200-x"


def test_lookup_matches_device_capability_and_key(monkeypatch, tmp_path):
    path = str(tmp_path / "nvidia-h200.json")
    monkeypatch.setattr(tuned_tiles, "committed_tables", lambda: ((path, _table()),))
    monkeypatch.setattr(tuned_tiles, "_device_slug", lambda index: "nvidia-h200")
    tuned_tiles._index.cache_clear()
    try:
        dev = torch.device("cuda", 0)
        hit = tuned_tiles.lookup("decode", torch.bfloat16, 128, 16, False, dev, 90)
        assert hit is not None and (hit["block_n"], hit["num_warps"], hit["num_stages"]) == (128, 8, 5)
        assert tuned_tiles.lookup("decode", torch.bfloat16, 128, 16, True, dev, 90) is None  # paged: no entry
        assert tuned_tiles.lookup("decode", torch.float16, 128, 16, False, dev, 90) is None
        assert tuned_tiles.lookup("decode", torch.bfloat16, 128, 16, False, dev, 80) is None  # other capability
        assert tuned_tiles.lookup("decode", torch.bfloat16, 128, 16, False, torch.device("cpu"), 90) is None
        monkeypatch.setattr(tuned_tiles, "_device_slug", lambda index: "nvidia-h100-80gb-hbm3")
        assert tuned_tiles.lookup("decode", torch.bfloat16, 128, 16, False, dev, 90) is None  # other device
    finally:
        tuned_tiles._index.cache_clear()


def test_off_the_gpu_the_default_tables_apply():
    for rows in (4, 64, 256):
        assert decode_config_for(rows, 128, torch.bfloat16, torch.device("cpu"), True) == \
            decode_config(rows, 128, torch.bfloat16, 90)


def test_every_entry_becomes_a_checked_compile_spec():
    tables = [("/x/nvidia-h200.json", _table()), ("/x/nvidia-a100.json", {**_table(paged=True), "capability": 80})]
    specs = aot_specs.tuned_specs(tables)
    assert [s["name"] for s in specs] == ["tuned_nvidia-h200_decode_bf16_d128_m16_sm90",
                                          "tuned_nvidia-a100_decode_bf16_d128_m16_paged_sm80"]
    assert all(s["overlap"] and s["num_stages"] == 5 and s["num_warps"] == 8 for s in specs)
    assert specs[0]["constexprs"]["BLOCK_N"] == 128 and specs[1]["constexprs"]["PAGED"] is True
    assert specs[1]["target"] == 80 and specs[1]["smem_capabilities"] == (80,)


def test_committed_tables_are_wellformed():
    for path, table in tuned_tiles.committed_tables():  # validated on load
        assert os.path.basename(path) == tuned_tiles.device_slug(table["device"]) + ".json"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="the dry modes run interpreted")
def test_sweep_and_bandwidth_dry_runs_end_to_end(tmp_path):
    from bench import decode_bandwidth, tune_decode

    out = str(tmp_path / "cpu-dry.json")
    assert tune_decode.main(["--dry", "--out-json", out]) == 0
    table = tuned_tiles.load(out)
    assert len(table["entries"]) == 2 and {e["paged"] for e in table["entries"]} == {False, True}
    with open(out[: -len(".json")] + "-sweep.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert rows and all(r["status"] == "ok" and r["rel_err"] < 2e-2 for r in rows)
    jsonl = str(tmp_path / "bw.jsonl")
    assert decode_bandwidth.main(["--dry", "--out", jsonl]) == 0
    with open(jsonl) as f:
        lines = [json.loads(line) for line in f]
    assert "copy_gbps" in lines[0]["ceilings"] and [r["K"] for r in lines[1:]] == [1, 4]


def test_profiler_split_of_kernel_times():
    from bench.decode_bandwidth import split_kernel_times

    got = split_kernel_times([("_decode_kernel", 80.0), ("_merge_kernel", 8.0), ("reduce_kernel", 500.0),
                              ("decode_mma_kernel", 40.0), ("decode_merge_kernel", 4.0)], steps=4)
    assert got == {"decode_us": 30.0, "merge_us": 3.0}


def test_summary_judges_the_bandwidth_rows(tmp_path):
    from bench.gpu_summary import summarize

    rows = [{"ceilings": {"copy_gbps": 4000.0}},
            dict(status="ok", n=16384, K=1, backend="auto", resolved="triton", total_us=20.0, frac_copy=0.9,
                 decode_us=17.0, merge_us=2.0),
            dict(status="ok", n=16384, K=64, backend="auto", resolved="cuda", total_us=60.0, frac_copy=0.4),
            dict(status="error", n=131072, K=4, backend="triton", reason="OutOfMemoryError: ...")]
    (tmp_path / "decode-bandwidth.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "tune-sweep.jsonl").write_text(json.dumps(dict(op="decode", K=1, status="ok")) + "\n")
    text = summarize(str(tmp_path))
    assert "| 16384 | 1 | auto (triton) | 20.0 | 90% | 17.0 | 2.0 | met (85%) |" in text
    assert "| 16384 | 64 | auto (cuda) | 60.0 | 40% | - | - | MISSED (50%) |" in text
    assert "OutOfMemoryError" in text and "## decode" not in text  # the sweep's rows are not bench rows

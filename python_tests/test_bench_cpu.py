"""The CPU-runnable pieces of bench/: pytest-benchmark timings (reported, never asserted) of the torch paths, and
checks that the benchmark harness counts work correctly and writes rows that follow bench/README.md's schema."""
from __future__ import annotations

import json
import pathlib
import os
import subprocess

import pytest
import torch
from layouts import random_layout

from aspd_kernels import BranchLayout, branch_attention, branch_attention_with_kvcache, remap_positions
from aspd_kernels.reference import dense_mask
from bench import __main__ as bench_main
from bench import bench_branch_attention, bench_branch_attention_backward, bench_branch_attention_with_kvcache
from bench import bench_remap_positions
from bench import bench_rope_append_kv, report
from bench.cases import AttnCase, build_layout, visible_counts
from bench.common import ROW_KEYS, validate_row

# ----------------------------------------------------------------------------------- work counted by the harness


@pytest.mark.parametrize("seed", range(12))
def test_visible_counts_match_dense_mask(seed):
    seg, br = random_layout(seed, max_tokens=300)
    assert torch.equal(visible_counts(seg, br), dense_mask(seg, br).sum(1).long())


@pytest.mark.parametrize("n,k", [(256, 1), (1000, 7), (4096, 64)])
@pytest.mark.parametrize("storage", ["contiguous", "interleaved"])
@pytest.mark.parametrize("decode", [False, True])
def test_bench_layouts(n, k, storage, decode):
    seg, br, info = build_layout(n, k, storage, decode)
    assert seg.numel() == n
    assert info["prefix"] + k * info["branch_len"] + info["suffix"] == n
    assert torch.equal(visible_counts(seg, br)[-64:], dense_mask(seg, br)[-64:].sum(1).long())
    if decode:  # the queries of a decoding step: the newest token of every branch, in branch order
        assert br[n - k:].tolist() == list(range(1, k + 1))
        assert [int((br == j).sum()) for j in range(1, k + 1)] == [info["branch_len"]] * k


# ---------------------------------------------------------------------------------- pytest-benchmark timings


def test_bench_remap_positions_torch(benchmark):
    seg, br, info = build_layout(8192, 16, "interleaved", decode=False)
    pos = benchmark(lambda: remap_positions(seg, br, backend="torch", check_values=False))
    p, length, s = info["prefix"], info["branch_len"], info["suffix"]
    lay = BranchLayout.from_sections([("serial", p), ("parallel", [length] * 16), ("serial", s)], "interleaved")
    assert torch.equal(pos, lay.positions())
    assert int(pos[-1]) == 8191  # same-sequential: the suffix continues after the sum of branch lengths


def test_bench_branch_layout_from_sections(benchmark):
    lay = benchmark(lambda: BranchLayout.from_sections([("serial", 2048), ("parallel", [128] * 16)], "interleaved"))
    assert len(lay) == 4096


def test_bench_branch_attention_torch(benchmark):
    seg, br, _ = build_layout(384, 4, "interleaved", decode=False)
    q, k, v = torch.randn(384, 4, 32), torch.randn(384, 2, 32), torch.randn(384, 2, 32)
    cu = torch.tensor([0, 384], dtype=torch.int32)
    out = benchmark(lambda: branch_attention(q, k, v, seg, br, cu, cu, 384, 384, backend="torch", check_values=False))
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_bench_kvcache_torch(benchmark):
    seg, br, _ = build_layout(2048, 8, "interleaved", decode=True)
    kc, vc = torch.randn(1, 2048, 2, 64), torch.randn(1, 2048, 2, 64)
    q = torch.randn(1, 8, 8, 64)
    lens = torch.tensor([2048], dtype=torch.int32)
    out = benchmark(lambda: branch_attention_with_kvcache(q, kc, vc, lens, seg[None], br[None], backend="torch",
                                                          check_values=False))
    assert out.shape == q.shape and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------ the harness end to end


def _tiny_cases(monkeypatch):
    monkeypatch.setattr(bench_branch_attention, "cases",
                        lambda ctx: [AttnCase(160, 3, "interleaved", 4, 2, 32, "tokens"),
                                     AttnCase(200, 2, "contiguous", 4, 4, 32, "tokens")])
    monkeypatch.setattr(bench_branch_attention_backward, "cases",
                        lambda ctx: [AttnCase(144, 3, "interleaved", 4, 2, 32, "tokens")])
    monkeypatch.setattr(bench_branch_attention_with_kvcache, "cases",
                        lambda ctx: [AttnCase(300, 5, "interleaved", 4, 2, 32, "tokens")])
    monkeypatch.setattr(bench_remap_positions, "cases",
                        lambda ctx: [bench_remap_positions.PosCase(512, 4, "interleaved", "tokens")])
    monkeypatch.setattr(bench_rope_append_kv, "cases",
                        lambda ctx: [bench_rope_append_kv.RopeCase(4, 256, 4, 2, 32, "decode")])


def test_harness_writes_valid_rows(tmp_path, monkeypatch):
    _tiny_cases(monkeypatch)
    ops = "branch_attention,branch_attention_backward,branch_attention_with_kvcache,remap_positions,rope_append_kv"
    rc = bench_main.main(["--ops", ops, "--out", str(tmp_path), "--tag", "t", "--budget-s", "0.01",
                          "--device", "cpu"])
    files = sorted(os.listdir(tmp_path))
    jsonl = [f for f in files if f.endswith("-cpu-t.jsonl")]
    assert len(jsonl) == 1, files
    prefix = jsonl[0][: -len(".jsonl")]
    assert prefix + ".md" in files and prefix + ".png" in files
    with open(tmp_path / jsonl[0]) as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        assert validate_row(r) == [], (r["op"], r.get("backend"), r.get("baseline"), validate_row(r))
        assert set(ROW_KEYS) <= set(r)
    errors = [(r["op"], r["backend"] or r["baseline"], r["reason"]) for r in rows if r["status"] == "error"]
    assert rc == (1 if errors else 0)
    assert not errors, errors
    ceilings = {r["baseline"]: r for r in rows if r["op"] == "ceiling"}
    assert ceilings["copy"]["gbps"] > 0 and ceilings["matmul"]["tflops"] > 0
    for op in ops.split(","):
        torch_rows = [r for r in rows if r["op"] == op and r["backend"] == "torch"]
        assert torch_rows and all(r["status"] == "ok" for r in torch_rows), op
        for r in torch_rows:
            assert r["gbps"] > 0 and r["fraction_of_ceiling"]["bandwidth"] > 0
            assert r["ratio"], f"{op}: no ratio to any baseline"
            base = {b["baseline"]: b["ms"] for b in rows if b["op"] == op and b["baseline"] and b["status"] == "ok"
                    and b["shape"] == r["shape"] and b["layout"] == r["layout"]}
            for name, ms in base.items():
                assert r["ratio"][name] == pytest.approx(ms / r["ms"])
        skipped = [r for r in rows if r["op"] == op and r["status"] == "skipped"]
        assert all(r["reason"] for r in skipped)
        assert {r["backend"] for r in skipped if r["backend"]} >= {"cuda", "triton"}  # no GPU here
    attn = [r for r in rows if r["op"] == "branch_attention" and r["backend"] == "torch"]
    for r in attn:  # FLOP from visible pairs: 4 * Hq * D * pairs
        assert r["flops"] == 4 * r["shape"]["Hq"] * r["shape"]["D"] * r["layout"]["visible_pairs"]
        assert r["layout"]["visible_pairs"] < r["layout"]["causal_pairs"]
    bwd = [r for r in rows if r["op"] == "branch_attention_backward" and r["backend"] == "torch"]
    assert bwd and all(r["flops"] == 14 * r["shape"]["Hq"] * r["shape"]["D"] * r["layout"]["visible_pairs"]
                       for r in bwd)
    flex = [r for r in rows if r["baseline"] == "flex" and r["status"] == "ok"]
    assert flex and all(r["extra_ms"]["layout_changes"] > r["ms"] for r in flex)
    md = report.markdown(rows)
    assert "not the point" in md and "## branch_attention" in md


def test_report_on_a_mask_cap_skip(tmp_path, monkeypatch):
    _tiny_cases(monkeypatch)
    rc = bench_main.main(["--ops", "branch_attention", "--out", str(tmp_path), "--budget-s", "0.01",
                          "--device", "cpu", "--mask-cap-gb", "0.00001"])
    assert rc == 0
    rows = report.load([str(p) for p in tmp_path.glob("*.jsonl")])
    dense = [r for r in rows if r["baseline"] == "sdpa_dense"]
    assert dense and all(r["status"] == "skipped" and "cap" in r["reason"] for r in dense)
    assert "Skipped and failed" in report.markdown(rows)


def test_cases_filter_runs_only_matching_cases(tmp_path, monkeypatch):
    """--cases keeps the cases whose key contains one of the ';'-separated strings (the GPU suite's 'key' stage)."""
    monkeypatch.setattr(bench_remap_positions, "cases",
                        lambda ctx: [bench_remap_positions.PosCase(n, 4, "interleaved", "tokens") for n in (64, 96)])
    rc = bench_main.main(["--ops", "remap_positions", "--out", str(tmp_path), "--budget-s", "0.01",
                          "--device", "cpu", "--cases", "N=96 K=4; N=1 K=99"])
    assert rc == 0
    rows = report.load([str(p) for p in tmp_path.glob("*.jsonl")])
    cases = {r["case"] for r in rows if r["op"] == "remap_positions"}
    assert cases == {"N=96 K=4 interleaved"}


def test_e2e_tiny_model_or_clear_error():
    """With the decoder: a real tiny run whose parallel decoding needs fewer forward passes than serial decoding.
    Without it: an error row naming the missing decoder (never a number)."""
    from bench import bench_e2e
    from bench.common import Context, environment

    ctx = Context(device=torch.device("cpu"), dtype=torch.float32, grid="cpu", ceilings={}, budget_s=0.01,
                  mask_cap_bytes=1 << 20, torch_backend_max_tokens=0, env=environment(torch.device("cpu")))
    case = bench_e2e.E2ECase("tiny-llama-cpu", (1, 3), 6, (), 3, 2, 8, 2)
    rows = bench_e2e.run_case(ctx, case)
    for r in rows:
        assert validate_row(r) == []
    try:
        import aspd_kernels.decoder as dec  # noqa: F401
        has = hasattr(dec, "ParallelDecoder")
    except ImportError:
        has = False
    if not has:
        assert len(rows) == 1 and rows[0]["status"] == "error" and "decoder" in rows[0]["reason"]
        pytest.skip("aspd_kernels.decoder.ParallelDecoder does not exist yet: the e2e gives an error row")
    assert all(r["status"] == "ok" for r in rows), [r["reason"] for r in rows]
    par = [r for r in rows if r["backend"] and r["layout"]["workload"] == "branches"]
    assert [r["layout"]["K"] for r in par] == [1, 3]
    k3 = par[1]["e2e"]
    assert k3["generated_tokens"] == 3 * 6
    assert k3["forward_passes"] < k3["serial_forward_passes"]
    mixed = [r for r in rows if r["backend"] and r["layout"]["workload"] == "mixed"]
    assert mixed and 2.8 < mixed[0]["e2e"]["speedup_limit"] < 2.9
    assert all(r["e2e"]["over_limit"] is (r["e2e"]["speedup"] > 1.1 * r["e2e"]["speedup_limit"])
               for r in par + mixed)


def test_default_output_folder_is_bench_out_in_the_current_directory(tmp_path, monkeypatch):
    """A user's run writes into ./bench-out (ignored by git at the repository root), never into bench/results/."""
    results = pathlib.Path(bench_main.__file__).parent / "results"
    before = sorted(p.name for p in results.iterdir())
    assert bench_main.parse([]).out == "bench-out"
    monkeypatch.setattr(bench_remap_positions, "cases",
                        lambda ctx: [bench_remap_positions.PosCase(64, 4, "interleaved", "tokens")])
    monkeypatch.chdir(tmp_path)
    assert bench_main.main(["--ops", "remap_positions", "--budget-s", "0.01", "--device", "cpu"]) == 0
    written = sorted(p.name for p in (tmp_path / "bench-out").iterdir())
    assert [n for n in written if n.endswith("-cpu.jsonl")] and [n for n in written if n.endswith("-cpu.md")]
    assert sorted(p.name for p in results.iterdir()) == before
    root = pathlib.Path(bench_main.__file__).parent.parent
    ignored = subprocess.run(["git", "check-ignore", "-q", "bench-out/x.md"], cwd=root, timeout=30)
    assert ignored.returncode == 0, "bench-out/ must be ignored by git"


def test_ratios_print_with_the_digits_they_need():
    from bench.report import ratio

    assert [ratio(x) for x in (0.0042, 0.013, 0.31, 1.0, 1.894, 12.34, 99.96, 123.4, 4321.0)] == [
        "0.00420x", "0.0130x", "0.310x", "1.00x", "1.89x", "12.3x", "100x", "123x", "4,321x"]
    assert ratio(3e-5) == "3.0e-05x" and ratio(0) == "0x" and ratio(None) == ""
    assert all(ratio(x) != "0.00x" for x in (1e-3, 4e-3, 1e-6))


def test_e2e_speedup_above_its_limit_is_flagged():
    """The runs are timed in interleaved rounds; a speedup still above its limit K is marked as noise in the row and
    the report, never printed as a result."""
    from bench import bench_e2e

    r = {"status": "ok", "backend": "torch", "baseline": None, "ms": 10.0, "shape": {"model": "m"},
         "layout": {"workload": "branches", "K": 1, "branch_len": 8}, "fraction_of_ceiling": {},
         "e2e": {"speedup": 1.89, "speedup_limit": 1.0, "forward_passes": 10, "serial_forward_passes": 8,
                 "tokens_per_s": 1.0, "over_limit": 1.89 > bench_e2e.OVER_LIMIT * 1.0}}
    table = report.e2e_table([r])
    assert "1.89x (above its limit: a noisy run, not a result)" in table and "| 1.00x |" in table
    r["e2e"].update(speedup=0.87, over_limit=False)
    assert "above its limit" not in report.e2e_table([r]) and "0.870x" in report.e2e_table([r])


def test_cpu_threads_leave_busy_cores_alone(monkeypatch):
    """A loaded machine gets fewer torch threads (at least one), a quiet one torch's choice, --threads wins."""
    n = torch.get_num_threads()
    monkeypatch.setattr(bench_main.os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
    monkeypatch.setattr(bench_main.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert bench_main.cpu_threads(0) == (n, None)
    monkeypatch.setattr(bench_main.os, "getloadavg", lambda: (20.5, 0.0, 0.0))
    got, note = bench_main.cpu_threads(0)
    assert got == 1 and (note is None) == (n == 1)
    assert bench_main.cpu_threads(3) == (3, None)


def test_e2e_cpu_default_is_the_real_model():
    from bench import bench_e2e
    from bench.common import Context, environment

    ctx = Context(device=torch.device("cpu"), dtype=torch.float32, grid="cpu", ceilings={}, budget_s=0.01,
                  mask_cap_bytes=1 << 20, torch_backend_max_tokens=0, env=environment(torch.device("cpu")))
    (case,) = bench_e2e.cases(ctx)
    assert case.model == "smollm2-135m" and case.model in bench_e2e.REAL and case.mixed_len == 0
    assert [c.model for c in bench_e2e.cases(ctx, ["tiny-llama-cpu"])] == ["tiny-llama-cpu"]


# ------------------------------------------------------------------ the baselines compute what they claim to


@pytest.mark.parametrize("storage", ["contiguous", "interleaved"])
def test_baselines_compute_the_branch_mask(storage):
    """Dense SDPA and FlexAttention give the package's output; K separate sequences give it on the branch tokens
    (the identity "branch j in one sequence == prefix + branch j alone"); the mask-free ceiling does not."""
    from bench import baselines

    case = AttnCase(192, 3, storage, 4, 2, 16, "tokens")
    seg, br, info = build_layout(case.n, case.k, storage, decode=False)
    q, k, v = torch.randn(case.n, 4, 16), torch.randn(case.n, 2, 16), torch.randn(case.n, 2, 16)
    cu = torch.tensor([0, case.n], dtype=torch.int32)
    ref = branch_attention(q, k, v, seg, br, cu, cu, case.n, case.n, backend="torch")
    got = {name: setup()["fn"]() for name, setup, why in baselines.prefill(case, q, k, v, seg, br, info, 1 << 30,
                                                                           False) if setup is not None}
    for name in ("sdpa_dense", "flex"):
        torch.testing.assert_close(got[name][0].transpose(0, 1), ref, atol=1e-5, rtol=1e-5)
    sep = got["separate_sequences"]  # [K, Hq, P + L, D]
    p = info["prefix"]
    for j in range(1, case.k + 1):
        torch.testing.assert_close(sep[j - 1, :, p:].transpose(0, 1), ref[br == j], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got["flash_causal"][0].transpose(0, 1), ref, atol=1e-3)

    seg, br, info = build_layout(case.n, case.k, storage, decode=True)
    kc, vc = k[None].contiguous(), v[None].contiguous()
    qd = torch.randn(1, case.k, 4, 16)
    lens = torch.tensor([case.n], dtype=torch.int32)
    ref = branch_attention_with_kvcache(qd, kc, vc, lens, seg[None], br[None], backend="torch")
    got = {name: setup()["fn"]() for name, setup, why in baselines.decode(case, qd, kc, vc, seg[None], br[None],
                                                                          info, 1 << 30, False) if setup is not None}
    for name in ("sdpa_dense", "flex"):
        torch.testing.assert_close(got[name][0].transpose(0, 1)[None], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["separate_sequences"][:, :, 0][None], ref, atol=1e-5, rtol=1e-5)


def test_floors_count_causal_pairs_for_one_branch():
    """bench.floors: with K = 1 the layout is plain causal (N(N+1)/2 visible pairs); more branches hide pairs;
    a decode step moves the whole cache (memory-bound) while a long prefill is compute-bound."""
    from bench.floors import floors

    rows = floors(4300.0, 780.0)
    prefill = {r["K"]: r for r in rows if r["op"] == "branch_attention" and r["N"] == 32768}
    assert prefill[1]["pairs"] == 32768 * 32769 // 2
    assert prefill[64]["pairs"] < prefill[16]["pairs"] < prefill[1]["pairs"]
    assert all(r["flop_us"] > r["bytes_us"] for r in rows if r["op"] == "branch_attention")
    assert all(r["bytes_us"] > r["flop_us"] for r in rows if r["op"] == "branch_attention_with_kvcache")

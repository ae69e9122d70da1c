"""vLLM's own attention backend-correctness harness (``tests/v1/attention/dense/test_attention_backends.py``) run
against vLLM's ``CPU_ATTN`` twice: stock (our plugin filtered out by ``VLLM_PLUGINS``) and with this package's plugin
loaded as vLLM loads it in every process it starts (``vllm.plugins.load_general_plugins``, entry point
``vllm.general_plugins: aspd_kernels``), which puts ``AspdAttentionBackend`` behind ``CPU_ATTN``. Writes a Markdown
table: pass/fail per case for both runs and the largest difference between the two runs' outputs.

Downloads nothing. vLLM's test files are not part of this repository: pass the folder that holds them (a vLLM
checkout, or the files copied into ``DIR/tests/v1/attention/``):

    nice -n 15 python bench/vllm_harness.py --vllm-tests /tmp/vllm_tests --vllm-commit "vllm-project/vllm 2d7cd76" \\
        --out bench/results/2026-12-02-cpu-vllm-harness.md

The files are copied to a scratch folder and adapted there to run on a CPU, each adaptation an exact text
replacement that must match (else the run stops, naming it): see ``ADAPTATIONS``. Llama-3-8B's attention shape
comes from its config alone (``LLAMA3_8B``, put in a scratch Hugging Face cache, offline); dtype ``auto`` is its
bfloat16.
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
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HARNESS = "tests/v1/attention/dense/test_attention_backends.py"
SELECT = "test_causal_backend_correctness or test_non_causal_backend_correctness"
STOCK_ENV = {"VLLM_PLUGINS": "lora_filesystem_resolver"}  # vLLM's own plugin: an allowlist without ours

# (file, old, new, why): the only changes made to vLLM's files
ADAPTATIONS = [
    (HARNESS, "\nNON_CAUSAL_BACKENDS_TO_TEST = [\n",
     "\nBACKENDS_TO_TEST = [AttentionBackendEnum.CPU_ATTN]\nNON_CAUSAL_BACKENDS_TO_TEST = [\n",
     "the causal cases drive CPU_ATTN, the one backend vLLM's CPU platform selects (the GPU list is FLASH_ATTN, "
     "FLEX_ATTENTION, TRITON_ATTN)"),
    (HARNESS, "\nif current_platform.is_rocm():\n    NON_CAUSAL_BACKENDS_TO_TEST",
     "\nNON_CAUSAL_BACKENDS_TO_TEST = [AttentionBackendEnum.CPU_ATTN]\n"
     "if current_platform.is_rocm():\n    NON_CAUSAL_BACKENDS_TO_TEST",
     "the non-causal cases drive CPU_ATTN (CPU_ATTN.supports_non_causal() is True)"),
    (HARNESS, '[AttentionBackendEnum.FLEX_ATTENTION]\n        if is_torch_equal_or_newer("2.9.0.dev0")',
     '[AttentionBackendEnum.FLEX_ATTENTION]\n        if False and is_torch_equal_or_newer("2.9.0.dev0")',
     "no second FLEX_ATTENTION pass at block size 128 (a GPU backend, not the one under test)"),
    (HARNESS, "    mock_layer.layer_name = layer_names[0]\n",
     "    mock_layer.layer_name = layer_names[0]\n    mock_layer.isa = builder.isa\n",
     "CPU_ATTN's cache writer and kernel read the layer's ISA, which its builder sets only on layers registered in "
     "the config (the harness's mock layer is not): give the mock layer the builder's ISA"),
    (HARNESS, "        if backend_name in ROCM_BACKENDS_TO_TEST:\n",
     "        if backend_name in ROCM_BACKENDS_TO_TEST + [AttentionBackendEnum.CPU_ATTN]:\n",
     "the context goes into the cache through the backend's own writer (`do_kv_cache_update` over the randomized "
     "block table), the path the harness takes for the ROCm backends: CPU_ATTN's cache is not the harness's "
     "per-token [K | V] rows but, per block and head, the block's keys then its values, packed for the ISA; "
     "written as the harness writes it, stock CPU_ATTN reads other numbers (97% of elements off on small_decode)"),
]

LLAMA3_8B = {  # meta-llama/Meta-Llama-3-8B config.json (attention shape: 32 query, 8 KV heads, head size 128)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0", "use_cache": True, "vocab_size": 128256}

# Our conftest (vLLM's root tests/conftest.py is not copied: it imports its whole test stack). It provides the
# fixture the harness asks for, loads vLLM's general plugins as every vLLM process does at start, checks which
# class is behind CPU_ATTN, and saves each case's backend output so the two runs can be compared value for value.
CONFTEST = '''
import os
import pytest
import torch
from vllm.plugins import load_general_plugins

load_general_plugins()


@pytest.fixture
def default_vllm_config():
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config

    config = VllmConfig(device_config=DeviceConfig(device="cpu"))
    with set_current_vllm_config(config):
        yield config


def pytest_sessionstart(session):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    cls = AttentionBackendEnum.CPU_ATTN.get_class()
    want = os.environ["HARNESS_EXPECT_BACKEND"]
    if cls.__name__ != want:
        raise pytest.UsageError(f"CPU_ATTN resolves to {cls.__module__}.{cls.__name__}, expected {want}")


@pytest.fixture(autouse=True)
def _dump_outputs(request, monkeypatch):
    mod = request.module
    run = mod.run_attention_backend
    calls = []

    def recording(*args, **kwargs):
        out = run(*args, **kwargs)
        calls.append(out.detach().cpu().clone())
        return out

    monkeypatch.setattr(mod, "run_attention_backend", recording)
    yield
    torch.save(calls, os.path.join(os.environ["HARNESS_DUMP"], request.node.name.replace("/", "_") + ".pt"))
'''


def block_size_adaptation(bs: int) -> tuple:
    return (HARNESS, "    block_size: int = 16,\n    atol: float = 1e-2,\n",
            f"    block_size: int = {bs},\n    atol: float = 1e-2,\n",
            f"block size {bs} instead of the harness's 16: CPU_ATTN's kernel block sizes are multiples of 32 "
            "(`get_supported_kernel_block_sizes`), the size vLLM gives it when serving; at 16 it runs its `vec16` "
            "ISA, which has no fp8 cache")


def prepare(src: Path, work: Path, block_size: int) -> list[str]:
    """Copy vLLM's attention tests to ``work``, apply ``ADAPTATIONS``, add our conftest and the offline config."""
    for rel in ("tests/v1/attention/utils.py", "tests/v1/attention/conftest.py", HARNESS):
        if not (src / rel).is_file():
            raise SystemExit(f"--vllm-tests: {src / rel} is missing")
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, work / rel)
    applied = []
    for rel, old, new, why in ADAPTATIONS + ([block_size_adaptation(block_size)] if block_size != 16 else []):
        path = work / rel
        text = path.read_text()
        if old not in text:
            raise SystemExit(f"adaptation not applicable to {rel} (vLLM's file changed?): {why}")
        path.write_text(text.replace(old, new))
        applied.append(f"`{rel}` ({text.count(old)}x): {why}")
    (work / "tests/conftest.py").write_text(CONFTEST)
    snap = work / "hf/hub/models--meta-llama--Meta-Llama-3-8B/snapshots/0"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(LLAMA3_8B))
    (work / "hf/hub/models--meta-llama--Meta-Llama-3-8B/refs").mkdir()
    (work / "hf/hub/models--meta-llama--Meta-Llama-3-8B/refs/main").write_text("0")
    return applied


def run(work: Path, name: str, env_extra: dict, expect: str, select: str, timeout: float) -> dict:
    """One pytest run of the harness; returns {case: (outcome, message)} and the dump folder."""
    dump = work / f"dump-{name}"
    dump.mkdir()
    xml = work / f"{name}.xml"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    env.update(env_extra, HARNESS_EXPECT_BACKEND=expect, HARNESS_DUMP=str(dump), HF_HOME=str(work / "hf"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(work), env.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(work),
           "-k", select, f"--junitxml={xml}", HARNESS]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    if not xml.exists():
        raise SystemExit(f"{name} run produced no report (rc {proc.returncode}):\n{proc.stdout[-3000:]}"
                         f"\n{proc.stderr[-3000:]}")
    cases = {}
    for tc in ET.parse(xml).getroot().iter("testcase"):
        bad = tc.find("failure") if tc.find("failure") is not None else tc.find("error")
        if bad is not None:
            msg = next((ln.strip() for ln in (bad.get("message") or "").splitlines()
                        if "Mismatched" in ln or "Greatest" in ln), (bad.get("message") or "").splitlines()[0][:160])
            cases[tc.get("name")] = ("fail", msg)
        elif tc.find("skipped") is not None:
            cases[tc.get("name")] = ("skip", (tc.find("skipped").get("message") or "")[:160])
        else:
            cases[tc.get("name")] = ("pass", "")
    return {"cases": cases, "dump": dump, "rc": proc.returncode, "tail": proc.stdout[-400:]}


def diff(a: Path, b: Path) -> str:
    """Largest |stock - plugin| over a case's backend outputs ("=" when bit-identical)."""
    import torch

    if not (a.exists() and b.exists()):
        return "no output" if not (a.exists() or b.exists()) else "one run raised"
    xa, xb = torch.load(a), torch.load(b)
    if not xa and not xb:
        return "= (both raised)"
    if len(xa) != len(xb):
        return f"{len(xa)} vs {len(xb)} outputs"
    if all(p.dtype == q.dtype and torch.equal(p.view(torch.uint8), q.view(torch.uint8)) for p, q in zip(xa, xb)):
        return "= (bitwise)"
    return f"{max(float((p.float() - q.float()).abs().max()) for p, q in zip(xa, xb)):.3g}"


def section(src: Path, block_size: int, select: str, timeout: float, backend: str) -> tuple[list[str], bool]:
    """Both runs at one block size: the section's Markdown lines and whether the runs agree everywhere."""
    with tempfile.TemporaryDirectory(prefix="vllm-harness-") as tmp:
        work = Path(tmp)
        applied = prepare(src, work, block_size)
        stock = run(work, "stock", STOCK_ENV, "CPUAttentionBackend", select, timeout)
        ours = run(work, "plugin", {}, backend.rsplit(".", 1)[1], select, timeout)
        names = sorted(set(stock["cases"]) | set(ours["cases"]))
        rows = [(n, stock["cases"].get(n, ("absent", "")), ours["cases"].get(n, ("absent", "")),
                 diff(*(r["dump"] / (n.replace("/", "_") + ".pt") for r in (stock, ours)))) for n in names]

    def count(run_, what):
        return sum(1 for o, _ in run_["cases"].values() if o == what)

    same = bool(rows) and all(s[0] == p[0] and d.startswith("=") for _, s, p, d in rows)
    lines = [f"## Block size {block_size}", "",
             f"stock: {count(stock, 'pass')} passed, {count(stock, 'fail')} failed, {count(stock, 'skip')} skipped; "
             f"plugin: {count(ours, 'pass')} passed, {count(ours, 'fail')} failed, {count(ours, 'skip')} skipped; "
             + ("**the same outcome and bit-identical outputs in every case**" if same else "**the runs differ**"),
             "", "Adaptations to vLLM's files (nothing else changed):", ""]
    lines += [f"{i}. {a}" for i, a in enumerate(applied, 1)]
    lines += ["", "| case | stock | plugin | max abs(stock - plugin) | stock's failure |", "|---|---|---|---|---|"]
    for n, (so, sm), (po, pm), d in rows:
        lines.append(f"| `{n}` | {so} | {po} | {d} | {sm.replace('|', '/')} |")
    return lines + [""], same


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-tests", required=True, type=Path, help="folder holding tests/v1/attention/ of vLLM")
    ap.add_argument("--vllm-commit", default="?", help="where the test files come from: vLLM commit(s), changes (free text for the report)")
    ap.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    ap.add_argument("-k", dest="select", default=SELECT, help=f"pytest -k selection (default: {SELECT!r})")
    ap.add_argument("--block-sizes", default="16,32", help="comma-separated; 16 is the harness's own default")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per pytest run")
    args = ap.parse_args(argv)
    import torch
    import vllm

    from aspd_kernels.vllm.plugin import BACKEND

    t0 = _dt.datetime.now()
    sizes = [int(b) for b in args.block_sizes.split(",")]
    body, same = [], True
    for bs in sizes:
        lines, ok = section(args.vllm_tests.resolve(), bs, args.select, args.timeout, BACKEND)
        body, same = body + lines, same and ok
    secs = (_dt.datetime.now() - t0).total_seconds()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    head = [
        "# vLLM's attention backend-correctness harness on CPU_ATTN: stock vs. with aspd_kernels' plugin", "",
        f"- date: {t0:%Y-%m-%d}; device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores); "
        f"vllm {vllm.__version__}, torch {torch.__version__}; aspd_kernels commit {commit}",
        f"- vLLM test files (`{HARNESS}`, `tests/v1/attention/utils.py`, `tests/v1/attention/conftest.py`): "
        f"{args.vllm_commit}; cases `-k \"{args.select}\"`; Llama-3-8B attention shape (32 query / 8 KV heads, "
        "head size 128), dtype auto = bfloat16",
        f"- command: `nice -n 15 python bench/vllm_harness.py --vllm-tests DIR --vllm-commit \"...\" "
        f"-k \"{args.select}\" --block-sizes {args.block_sizes} --out {args.out}` ({secs:.0f} s)",
        "- stock: `VLLM_PLUGINS=lora_filesystem_resolver` (an allowlist without `aspd_kernels`), CPU_ATTN = "
        "`CPUAttentionBackend`; plugin: `VLLM_PLUGINS` unset, every installed plugin loaded as vLLM loads them, "
        f"CPU_ATTN = `{BACKEND}` (checked at the start of each run); max abs(stock - plugin) compares the two "
        "runs' backend outputs case by case",
        "- verdict: " + ("**with the plugin every case has stock's outcome and stock's bits**" if same
                         else "**the runs differ**"), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(head + body))
    print("\n".join(head))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

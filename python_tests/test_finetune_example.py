"""examples/finetune_aspd.py runs end to end on CPU and learns."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "finetune_aspd.py"
SMALL = ["--steps", "8", "--train-examples", "16", "--eval-examples", "4", "--hidden", "32"]


def test_script_runs():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(SCRIPT), *SMALL], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"step\s+loss\s+tokens", out)
    assert "finetune" in proc.stderr  # the tqdm bar
    m = re.search(r"held-out loss ([0-9.]+) -> ([0-9.]+)", out)
    assert m, out
    assert float(m.group(2)) < float(m.group(1))


def test_main_qwen2_learns():
    spec = importlib.util.spec_from_file_location("finetune_aspd", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import torch

    threads = torch.get_num_threads()
    try:
        res = mod.main(["--model", "qwen2", *SMALL, "--strategy", "same-max"])
    finally:
        torch.set_num_threads(threads)
    assert len(res["losses"]) == 8
    assert res["losses"][-1] < res["losses"][0]
    assert res["eval_after"] < res["eval_before"] - 0.2

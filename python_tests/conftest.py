import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # python_tests/layouts.py

import torch  # noqa: E402

# Without a GPU the Triton kernels run in the interpreter. It must be switched on before any test module (or
# anything they import) loads aspd_kernels.triton, since kernels decorated earlier cannot be interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "0")
    return f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, TRITON_INTERPRET={interp}"

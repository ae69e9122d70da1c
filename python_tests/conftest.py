import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # python_tests/layouts.py

import torch  # noqa: E402

# Without a GPU the Triton kernels run in the interpreter. It must be switched on before any test module (or
# anything they import) loads aspd_kernels.triton, since kernels decorated earlier cannot be interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from triton_probe import interpreter_problem, interpreting  # noqa: E402

# test files whose kernels run in the Triton interpreter on a CPU
_INTERPRETED = ("test_triton_", "test_large_offsets")


def pytest_collection_modifyitems(config, items):
    """On a CPU whose triton interpreter cannot run our kernels (triton 3.6 with numpy >= 2.4), the interpreted
    Triton tests skip with that reason instead of failing on the interpreter; CI's triton 3.7 runs them all."""
    if not interpreting():
        return
    interpreted = [it for it in items if it.path.name.startswith(_INTERPRETED)]
    if not interpreted:
        return
    problem = interpreter_problem()
    if problem is not None:
        for it in interpreted:
            it.add_marker(pytest.mark.skip(reason=problem))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "0")
    return f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, TRITON_INTERPRET={interp}"

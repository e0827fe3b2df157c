"""Test-suite set-up.

The Triton interpreter must be switched on before anything imports triton, and outputs are
allocated poisoned (NaN) so that an element a kernel forgets to write fails its comparison.
"""

import os

import torch  # does not import triton

# Without CUDA the Triton kernels run through the interpreter on CPU tensors; with CUDA the same
# tests run compiled. Either way this must happen before anything imports triton.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["MOSEAR_POISON_OUTPUTS"] = "1"
# Under pytest-xdist (scripts/test.sh runs one worker per core) each worker computes on one thread:
# two workers with two intra-op threads each would fight over the same two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

import pytest  # noqa: E402

# Backends every op test runs on. Triton runs through the interpreter on CPU tensors here,
# compiled when CUDA is present (see `device` below).
MOSE_BACKENDS = ["torch", "triton"]
AR_BACKENDS = ["torch", "triton"]


def pytest_report_header(config):
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (Triton interpreter on CPU)"
    return f"torch {torch.__version__}; CUDA device: {cuda}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    """Where kernels are tested: CUDA when present (compiled), else the CPU (interpreted Triton)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

"""Run the Triton kernel tests on the CPU under the Triton interpreter.

``triton.jit`` reads TRITON_INTERPRET when a kernel is defined, at import time, so the kernel
tests run in a fresh interpreter process with the variable set.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

KERNEL_TESTS = sorted(str(path) for path in Path(__file__).parent.glob("test_*_triton.py"))


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available(),
    reason="the kernel tests run directly in this process",
)
def test_kernels_under_interpreter():
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    environment.pop("BUMBLEBEE_KERNELS", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS],
        capture_output=True, text=True, env=environment, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

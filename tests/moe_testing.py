"""Shared set-up of the MoE kernel and layer tests: the device, the Triton interpreter, exact fp32, tolerances.

Without a GPU the Triton kernels run in Triton's interpreter: TRITON_INTERPRET=1 is set when this module is
imported, which the test modules do before importing moebalance.kernels (pytest imports every test module at
collection, before any test runs, and ``triton.jit`` reads the variable when the kernel module is first
imported). With a GPU the same tests run on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 off: fp32 means fp32 on the Triton and the torch path alike."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def close(a, b, tol: float) -> None:
    """Same shape and equal within tol (absolute and relative), compared in float64 on the CPU."""
    assert a is not None and a.shape == b.shape, (None if a is None else a.shape, b.shape)
    torch.testing.assert_close(a.detach().cpu().double(), b.detach().cpu().double(), rtol=tol, atol=tol)

"""Kernel tests: one device per process.

A test that takes ``device`` runs its CPU cases under the Triton interpreter (small shapes;
CI, ``make test``) or its CUDA cases compiled on a GPU (real shapes, marked ``gpu``; the
device machine: ``pytest tests/kernels -m gpu``). Triton decides between interpreting and
compiling when a kernel is defined, so the choice is made here, before any test module
imports the kernels: the GPU when one is visible and TRITON_INTERPRET is not set, else the
interpreter (``TRITON_INTERPRET=1 pytest tests/kernels`` runs the CPU cases on a GPU
machine too). The other device's cases are skipped. Tests without ``device`` (host-side
logic) run in either process.
"""
import os
import pathlib

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    skip_cpu = pytest.mark.skip(reason="CPU cases run under the Triton interpreter: "
                                       "TRITON_INTERPRET=1, or a machine without a GPU")
    for item in items:
        if HERE not in pathlib.Path(str(item.fspath)).parents:
            continue
        device = getattr(item, "callspec", None) and item.callspec.params.get("device")
        if device == "cuda" and not ON_GPU:
            item.add_marker(skip_cuda)
        elif device == "cpu" and ON_GPU:
            item.add_marker(skip_cpu)

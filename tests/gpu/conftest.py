"""GPU tests: skipped where no CUDA device is present (CI); run on the device machine."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        item.add_marker(skip)

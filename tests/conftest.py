"""Shared pytest set-up: GPU tests skip on CPU-only machines."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (./run gpu on the H200)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""Shared fixtures: tiny seeded models built in-process; nothing here touches the network."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: tests never download
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny():
    from engine.presets import build_preset

    return build_preset("tiny")


@pytest.fixture(scope="session")
def gpu_tiny():
    """The tiny preset on the GPU (fp32); tests using it skip where torch sees no CUDA device."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU visible to torch (the CUDA build of torch on an NVIDIA machine)")
    from engine.presets import build_preset

    return build_preset("tiny", device="cuda")


@pytest.fixture
def one_thread():
    """One torch thread, as in each rank of the several-device tests, so in-process references run the
    same kernels and match the ranks bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""The training tests use tiny tensors: one intra-op thread avoids OpenMP contention on a shared CPU (it made
single tests 5-10x slower under load). Restored afterwards for the rest of the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

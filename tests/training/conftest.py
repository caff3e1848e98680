"""The training tests run with one intra-op torch thread (tests/conftest.py `one_torch_thread`)."""

from __future__ import annotations

import pytest

from tests.conftest import one_torch_thread

_one_torch_thread = pytest.fixture(autouse=True, scope="package")(one_torch_thread)

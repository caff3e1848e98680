"""Fixtures of the hardening tests (fuzzing, properties, security). The helpers of tests/api/conftest.py are
imported, not redefined; its autouse fixture does not reach this directory, so it is repeated here.

Tests add the figures that docs/RELIABILITY.md quotes to `FIGURES`; they are printed at the end of the run
whatever the capture mode, under the heading "hardening figures".
"""

from __future__ import annotations

import pytest

from tests.api.conftest import without_equipoise_environment

FIGURES: list[str] = []


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    without_equipoise_environment(monkeypatch)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("hardening figures")
        for line in FIGURES:
            terminalreporter.write_line(line)

"""The speech-to-text model, loaded once for the call tests (CPU, two threads)."""

from __future__ import annotations

import pytest

from model.speech_to_text import SpeechToText


@pytest.fixture(scope="session")
def stt() -> SpeechToText:
    return SpeechToText("cpu", cpu_threads=2)

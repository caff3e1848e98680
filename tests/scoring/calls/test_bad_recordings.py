"""Recordings the call pipeline refuses: each gets an AudioError subclass with a clear message, none a crash; a
2-hour recording is refused from its header, before it is decoded."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from core.settings import MAX_CALL_SECONDS, load_settings
from model.audio import AudioEmpty, AudioError, AudioTooLong, AudioTooManyChannels, AudioUndecodable, decode_channels
from model.channels import ChannelNamesMismatch
from model.speech_to_text import SpeechToText
from scoring.calls import CallOptions, process_call


def _wav(seconds: float, rate: int = 8_000, channels: int = 2, fmt: str = "WAV") -> bytes:
    time_axis = np.arange(round(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 300 * time_axis)
    buffer = io.BytesIO()
    sf.write(buffer, np.repeat(tone[:, None], channels, axis=1), rate, format=fmt, subtype="PCM_16")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("recording", "error", "message"),
    [
        (b"", AudioEmpty, "empty"),
        (b"this is a text file, not a recording" * 10, AudioUndecodable, "cannot be decoded"),
        (_wav(1.0)[:30], AudioUndecodable, "cannot be decoded"),  # truncated inside the header
        (_wav(1.0, rate=1_000), AudioUndecodable, "sample rate is 1000 Hz; accepted: 8000-48000 Hz"),
        (_wav(1.0, rate=96_000), AudioUndecodable, "sample rate is 96000 Hz"),
        (_wav(0.2, channels=16), AudioTooManyChannels, "16 channels; the limit is 8"),
    ],
    ids=["zero-length", "not-audio", "truncated-header", "1-kHz", "96-kHz", "16-channels"],
)
def test_a_bad_recording_gets_a_clear_error(stt: SpeechToText, recording: bytes, error: type, message: str) -> None:
    with pytest.raises(error, match=message) as raised:
        process_call(recording, stt=stt)
    assert isinstance(raised.value, AudioError) and raised.value.code


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_a_truncated_body_is_decoded_as_far_as_it_goes_or_refused(stt: SpeechToText, fmt: str) -> None:
    whole = _wav(3.0, fmt=fmt)
    try:
        result = process_call(whole[: len(whole) // 2], stt=stt)
    except AudioError as error:
        assert error.code in {"audio_undecodable", "audio_empty"}
    else:
        assert result.duration_s <= 3.0


def test_a_two_hour_recording_is_refused_from_its_header(stt: SpeechToText, tmp_path: Path) -> None:
    path = tmp_path / "two-hours.flac"
    with sf.SoundFile(path, "w", 8_000, 1, format="FLAC", subtype="PCM_16") as file:
        block = np.zeros(8_000 * 600, dtype=np.int16)
        for _ in range(12):
            file.write(block)
    start = time.perf_counter()
    with pytest.raises(AudioTooLong, match="lasts 7200.00 s; the limit is 3600 s") as raised:
        process_call(path, stt=stt)
    assert time.perf_counter() - start < 0.5  # decoding two hours would take seconds
    assert raised.value.limit == MAX_CALL_SECONDS == load_settings().max_call_seconds
    options = CallOptions.from_settings(load_settings(max_call_seconds=10.0))
    with pytest.raises(AudioTooLong, match="the limit is 10 s"):
        process_call(_wav(11.0), stt=stt, options=options)


def test_roles_must_name_every_channel(stt: SpeechToText) -> None:
    with pytest.raises(ChannelNamesMismatch, match="2 channels but 3 channel names"):
        process_call(_wav(0.5), "agent,customer,supervisor", stt=stt)
    with pytest.raises(ValueError, match="must differ"):
        process_call(_wav(0.5), "agent,agent", stt=stt)


def test_decode_channels_checks_the_source_rate_only_when_asked() -> None:
    assert decode_channels(_wav(0.1, rate=1_000)).shape == (2, 1_600)
    assert decode_channels(_wav(0.1, rate=8_000), source_rates=(8_000, 48_000)).shape == (2, 1_600)
    with pytest.raises(AudioUndecodable, match="sample rate is 7999 Hz") as raised:
        decode_channels(_wav(0.1, rate=7_999), source_rates=(8_000, 48_000))
    assert (raised.value.limit, raised.value.actual, raised.value.unit) == (8_000, 7_999, "hertz")

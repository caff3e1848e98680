from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from model.audio import (
    SAMPLE_RATE,
    AudioEmpty,
    AudioError,
    AudioHeader,
    AudioTooLarge,
    AudioTooLong,
    AudioTooManyChannels,
    AudioUndecodable,
    check_audio_header,
    decode_audio,
)


def _wav_bytes(samples: np.ndarray, rate: int, format: str = "WAV", subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=format, subtype=subtype)
    return buffer.getvalue()


def _tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.8 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


@pytest.mark.data
def test_ravdess_ogg_is_decoded_at_16k(data_dir: Path) -> None:
    path = data_dir / "ravdess/audio/Actor_01/03-01-01-01-01-01-01.ogg"
    audio = decode_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 3.303 * SAMPLE_RATE) < 0.01 * SAMPLE_RATE  # labels.csv: 3.303 s
    assert 0 < np.abs(audio).max() <= 1.0
    np.testing.assert_array_equal(decode_audio(path.read_bytes()), audio)


@pytest.mark.data
def test_emodb_flac_is_resampled_from_22050(data_dir: Path) -> None:
    path = data_dir / "emodb/audio/03a01Fa.flac"
    assert sf.info(path).samplerate == 22050
    audio = decode_audio(path)
    assert audio.dtype == np.float32 and audio.shape == (2 * SAMPLE_RATE,)
    np.testing.assert_array_equal(decode_audio(path.read_bytes()), audio)


def test_stereo_44k1_wav_becomes_16k_mono_mean(tmp_path: Path) -> None:
    left = _tone(1.5, 44100)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, np.zeros_like(left)], axis=1), 44100, subtype="FLOAT")
    audio = decode_audio(path)
    assert audio.dtype == np.float32 and audio.shape == (24000,)
    # The mean of a 0.8 sine and silence is a 0.4 sine: RMS 0.4 / sqrt(2).
    assert np.sqrt(np.mean(audio[1000:-1000] ** 2)) == pytest.approx(0.4 / np.sqrt(2), rel=0.01)
    np.testing.assert_array_equal(decode_audio(path.read_bytes()), audio)


def test_limits_are_keyword_arguments(tmp_path: Path) -> None:
    data = _wav_bytes(_tone(3.0, 16000), 16000)
    with pytest.raises(AudioTooLong) as too_long:
        decode_audio(data, max_seconds=2.0)
    assert (too_long.value.limit, too_long.value.actual, too_long.value.unit) == (2.0, 3.0, "seconds")
    assert "3.00 s" in too_long.value.message and "2 s" in too_long.value.message
    with pytest.raises(AudioTooLarge) as too_large:
        decode_audio(data, max_bytes=1000)
    assert (too_large.value.limit, too_large.value.actual) == (1000, len(data))
    assert len(decode_audio(data, max_seconds=3.0)) == 3 * SAMPLE_RATE


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"", AudioEmpty),
        (_wav_bytes(np.zeros((0, 1), dtype=np.float32), 16000), AudioEmpty),
        (b"RIFF\x00\x00garbage" * 50, AudioUndecodable),
        (np.random.default_rng(0).bytes(4096), AudioUndecodable),
        (_wav_bytes(_tone(0.5, 16000), 16000, format="AIFF"), AudioUndecodable),
        (_wav_bytes(np.full(100, np.nan, dtype=np.float32), 16000, subtype="FLOAT"), AudioUndecodable),
    ],
    ids=["zero-bytes", "zero-frames", "garbage-riff", "random", "aiff", "nan"],
)
def test_bad_input_raises_its_error(tmp_path: Path, content: bytes, error: type[AudioError]) -> None:
    path = tmp_path / "clip.wav"
    path.write_bytes(content)
    for source in (path, content):
        with pytest.raises(error) as raised:
            decode_audio(source)
        assert isinstance(raised.value, ValueError) and raised.value.code.startswith("audio_")
        assert raised.value.message


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AudioUndecodable, match="not a regular file"):
        decode_audio(tmp_path)


def test_huge_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.wav"
    with path.open("wb") as file:
        file.truncate(3 * 1024**3)  # sparse: 3 GB long, no blocks on disk
    read_before = _bytes_read()
    started = time.perf_counter()
    with pytest.raises(AudioTooLarge) as raised:
        decode_audio(path)
    assert time.perf_counter() - started < 0.5
    assert raised.value.actual == 3 * 1024**3
    if read_before is not None:
        assert _bytes_read() - read_before < 64 * 1024  # /proc/self/io counts every byte read


def _bytes_read() -> int | None:
    proc = Path("/proc/self/io")
    if not proc.exists():
        return None
    fields = dict(line.split(": ") for line in proc.read_text().splitlines())
    return int(fields["rchar"])


def test_the_header_check_refuses_what_decoding_would_without_decoding(tmp_path: Path) -> None:
    path = tmp_path / "call.wav"
    path.write_bytes(_wav_bytes(np.zeros((8_000 * 3, 2), np.float32), 8_000))
    limits = dict(max_bytes=10**6, max_seconds=5.0, max_channels=2, source_rates=(8_000, 48_000))
    assert check_audio_header(path, **limits) == AudioHeader(3.0, 2, 8_000)
    with pytest.raises(AudioTooLong):
        check_audio_header(path, **{**limits, "max_seconds": 2.0})
    with pytest.raises(AudioTooManyChannels):
        check_audio_header(path, **{**limits, "max_channels": 1})
    with pytest.raises(AudioUndecodable, match="8000 Hz; accepted: 16000-48000"):
        check_audio_header(path, **{**limits, "source_rates": (16_000, 48_000)})
    path.write_bytes(b"RIFF" + bytes(40))
    with pytest.raises(AudioUndecodable):
        check_audio_header(path, **limits)


def test_mp3_is_decoded(tmp_path: Path) -> None:
    tone = 0.3 * np.sin(2 * np.pi * 300 * np.arange(16_000) / 16_000)
    path = tmp_path / "tone.mp3"
    sf.write(path, np.stack([tone, tone], axis=1), 16_000, format="MP3")
    wave = decode_audio(path)
    assert abs(len(wave) - 16_000) <= 1_200 and 0.15 < np.sqrt(np.mean(wave**2)) < 0.25  # codec delay, RMS 0.21

"""Decode WAV, FLAC and OGG (from a path or bytes) to a float32 mono waveform at 16 kHz, within explicit limits.

Limits are checked as early as possible: the byte size before anything is read, the duration from the
header before decoding, and the decoded length again while decoding (a header may lie).
"""

from __future__ import annotations

import io
import math
import os
import stat
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000
DEFAULT_MAX_BYTES = 50 * 1024 * 1024  # 50 MiB
DEFAULT_MAX_SECONDS = 60.0
ACCEPTED_FORMATS = frozenset({"WAV", "WAVEX", "FLAC", "OGG"})  # libsndfile container names
# Sanity bounds on header fields, so that a crafted header cannot make decoding allocate without bound.
MAX_SOURCE_RATE = 384_000
MAX_CHANNELS = 8

AudioSource = str | os.PathLike[str] | bytes | bytearray


class AudioError(ValueError):
    """Base of audio input errors. `code` is machine-readable; `limit`/`actual` are set where a limit applies."""

    code = "audio_error"

    def __init__(
        self, message: str, *, limit: float | None = None, actual: float | None = None, unit: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.limit = limit
        self.actual = actual
        self.unit = unit


class AudioTooLarge(AudioError):
    code = "audio_too_large"


class AudioTooLong(AudioError):
    code = "audio_too_long"


class AudioEmpty(AudioError):
    code = "audio_empty"


class AudioUndecodable(AudioError):
    code = "audio_undecodable"


def decode_audio(
    source: AudioSource,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """Decode `source` (a path or the bytes of a file) to a 1-D float32 mono waveform at `sample_rate`.

    Raises AudioTooLarge (more than `max_bytes`), AudioTooLong (more than `max_seconds`), AudioEmpty (no
    samples) or AudioUndecodable (not a WAV/FLAC/OGG file, corrupt, or implausible header). A missing or
    unreadable path raises the usual OSError.
    """
    if isinstance(source, bytes | bytearray):
        _check_size(len(source), max_bytes)
        return _decode(io.BytesIO(source), max_seconds, sample_rate)
    path = Path(source)
    info = path.stat()  # the size is checked before the file is opened
    if not stat.S_ISREG(info.st_mode):
        raise AudioUndecodable(f"{path.name} is not a regular file")
    _check_size(info.st_size, max_bytes)
    return _decode(path, max_seconds, sample_rate)


def downmix_and_resample(samples: np.ndarray, source_rate: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Average the channels of `samples` ([frames] or [frames, channels]) and resample to `sample_rate`."""
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if source_rate == sample_rate:
        return mono
    return soxr.resample(mono, source_rate, sample_rate, quality="HQ").astype(np.float32, copy=False)


def _check_size(size: int, max_bytes: int) -> None:
    if size == 0:
        raise AudioEmpty("the audio is empty (0 bytes)", limit=None, actual=0, unit="bytes")
    if size > max_bytes:
        raise AudioTooLarge(
            f"the audio is {size} bytes; the limit is {max_bytes} bytes", limit=max_bytes, actual=size, unit="bytes"
        )


def _decode(file: Path | io.BytesIO, max_seconds: float, sample_rate: int) -> np.ndarray:
    try:
        with sf.SoundFile(file) as sound:
            _check_header(sound, max_seconds)
            # Read at most one frame past the limit: a header that understates the length is caught here.
            max_frames = math.floor(max_seconds * sound.samplerate)
            samples = sound.read(frames=max_frames + 1, dtype="float32", always_2d=True)
            rate = sound.samplerate
    except sf.SoundFileError as error:
        raise AudioUndecodable(f"the audio cannot be decoded: {_reason(error)}") from None
    if len(samples) == 0:
        raise AudioEmpty("the audio contains no samples", limit=None, actual=0, unit="seconds")
    if len(samples) > max_frames:
        raise _too_long(len(samples) / rate, max_seconds, at_least=True)
    if not np.isfinite(samples).all():
        raise AudioUndecodable("the audio contains non-finite samples (NaN or infinity)")
    return downmix_and_resample(samples, rate, sample_rate)


def _check_header(sound: sf.SoundFile, max_seconds: float) -> None:
    if sound.format not in ACCEPTED_FORMATS:
        raise AudioUndecodable(f"unsupported audio format {sound.format}; accepted: WAV, FLAC, OGG")
    if not 0 < sound.samplerate <= MAX_SOURCE_RATE:
        raise AudioUndecodable(
            f"implausible sample rate {sound.samplerate} Hz (at most {MAX_SOURCE_RATE})",
            limit=MAX_SOURCE_RATE,
            actual=sound.samplerate,
            unit="hertz",
        )
    if not 0 < sound.channels <= MAX_CHANNELS:
        raise AudioUndecodable(
            f"unsupported channel count {sound.channels} (at most {MAX_CHANNELS})",
            limit=MAX_CHANNELS,
            actual=sound.channels,
            unit="channels",
        )
    if sound.frames == 0:
        raise AudioEmpty("the audio contains no samples", limit=None, actual=0, unit="seconds")
    duration = sound.frames / sound.samplerate
    if duration > max_seconds:
        raise _too_long(duration, max_seconds, at_least=False)


def _too_long(duration: float, max_seconds: float, *, at_least: bool) -> AudioTooLong:
    qualifier = "at least " if at_least else ""
    return AudioTooLong(
        f"the audio lasts {qualifier}{duration:.2f} s; the limit is {max_seconds:g} s",
        limit=max_seconds,
        actual=round(duration, 3),
        unit="seconds",
    )


def _reason(error: sf.SoundFileError) -> str:
    # LibsndfileError messages start with "Error opening <object repr>: "; keep only libsndfile's reason.
    message = getattr(error, "error_string", None) or str(error)
    return message.rstrip(".")

"""Decode WAV, FLAC, OGG and MP3 (from a path or bytes) to float32 waveforms at 16 kHz, within explicit limits.

`decode_channels` keeps a recording's channels apart (one waveform each): in a call recording they are different
speakers, so the service and batch scoring use it. `decode_audio` gives one waveform, averaging the channels; it is
for corpora whose files hold a single voice (training, evaluation), never for call recordings.

Limits are checked as early as possible: the byte size before anything is read, the duration and the channel
count from the header before decoding, and the decoded length again while decoding (a header may lie).
"""

from __future__ import annotations

import io
import math
import os
import stat
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf
import soxr

from core.settings import MAX_AUDIO_CHANNELS

SAMPLE_RATE = 16000
DEFAULT_MAX_BYTES = 50 * 1024 * 1024  # 50 MiB
DEFAULT_MAX_SECONDS = 60.0
ACCEPTED_FORMATS = frozenset({"WAV", "WAVEX", "FLAC", "OGG", "MP3"})  # libsndfile container names
# A sanity bound on the header's rate; with the duration and channel limits, a crafted header cannot make decoding
# allocate without bound.
MAX_SOURCE_RATE = 384_000
SILENCE_FRAME_SECONDS = 0.02  # a channel's level is that of its loudest 20 ms frame

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


class AudioTooManyChannels(AudioError):
    code = "audio_too_many_channels"


def decode_channels(
    source: AudioSource,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    max_channels: int = MAX_AUDIO_CHANNELS,
    sample_rate: int = SAMPLE_RATE,
    source_rates: tuple[int, int] = (1, MAX_SOURCE_RATE),
) -> np.ndarray:
    """Decode `source` (a path or the bytes of a file) to float32 waveforms [channels, samples] at `sample_rate`,
    each channel resampled on its own (a mono file gives one row).

    Raises AudioTooLarge (more than `max_bytes`), AudioTooLong (more than `max_seconds`), AudioTooManyChannels
    (more than `max_channels`), AudioEmpty (no samples) or AudioUndecodable (not a WAV/FLAC/OGG/MP3 file, corrupt, or a
    header rate outside `source_rates`, inclusive). A missing or unreadable path raises the usual OSError.
    """
    limits = _Limits(max_seconds, max_channels, source_rates)
    if isinstance(source, bytes | bytearray):
        _check_size(len(source), max_bytes)
        return _decode(io.BytesIO(source), limits, sample_rate)
    path = Path(source)
    info = path.stat()  # the size is checked before the file is opened
    if not stat.S_ISREG(info.st_mode):
        raise AudioUndecodable(f"{path.name} is not a regular file")
    _check_size(info.st_size, max_bytes)
    return _decode(path, limits, sample_rate)


def check_audio_header(
    source: Path | str,
    *,
    max_bytes: int,
    max_seconds: float,
    max_channels: int,
    source_rates: tuple[int, int] = (1, MAX_SOURCE_RATE),
) -> AudioHeader:
    """What `decode_channels` checks before it decodes (size, format, sample rate, channels, the length the header
    declares), without decoding, so a stored upload can be refused before it is queued; raises the same errors.
    A header that understates the length is still caught when the audio is decoded."""
    path = Path(source)
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise AudioUndecodable(f"{path.name} is not a regular file")
    _check_size(info.st_size, max_bytes)
    try:
        with sf.SoundFile(path) as sound:
            _check_header(sound, _Limits(max_seconds, max_channels, source_rates))
            return AudioHeader(sound.frames / sound.samplerate, sound.channels, sound.samplerate)
    except sf.SoundFileError as error:
        raise AudioUndecodable(f"the audio cannot be decoded: {_reason(error)}") from None


class AudioHeader(NamedTuple):
    seconds: float  # as declared
    channels: int
    sample_rate: int


def decode_audio(
    source: AudioSource,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """One 1-D float32 waveform at `sample_rate`: the mean of the channels of `source`. For single-voice corpora
    only (a call recording's channels are different speakers: `decode_channels`). Raises as `decode_channels`."""
    channels = decode_channels(source, max_bytes=max_bytes, max_seconds=max_seconds, sample_rate=sample_rate)
    return channels[0] if len(channels) == 1 else channels.mean(axis=0, dtype=np.float32)


def resample_channels(samples: np.ndarray, source_rate: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`samples` ([frames] or [frames, channels]) as float32 [channels, samples] at `sample_rate`; each channel is
    resampled on its own, so a channel comes out as it would alone in a mono file."""
    frames = samples[:, None] if samples.ndim == 1 else samples
    channels = np.ascontiguousarray(frames.T, dtype=np.float32)
    if source_rate == sample_rate:
        return channels
    return np.stack([soxr.resample(row, source_rate, sample_rate, quality="HQ") for row in channels]).astype(
        np.float32, copy=False
    )


def encode_flac(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 1-D waveform as the bytes of a 24-bit FLAC file (how one channel of a recording is kept on its own)."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(wave, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_24")
    return buffer.getvalue()


def level_dbfs(wave: np.ndarray, frame_seconds: float = SILENCE_FRAME_SECONDS, sample_rate: int = SAMPLE_RATE) -> float:
    """The RMS level of the loudest `frame_seconds` frame of `wave`, in dB relative to full scale (a sine at full
    scale is -3 dBFS); -inf for digital silence. A short click counts, a long quiet hiss does not."""
    if len(wave) == 0:
        return -math.inf
    frame = min(len(wave), max(1, round(frame_seconds * sample_rate)))
    frames = np.asarray(wave[: len(wave) // frame * frame], dtype=np.float64).reshape(-1, frame)
    loudest = float(np.sqrt(np.mean(frames**2, axis=1)).max())
    return 20 * math.log10(loudest) if loudest > 0 else -math.inf


def _check_size(size: int, max_bytes: int) -> None:
    if size == 0:
        raise AudioEmpty("the audio is empty (0 bytes)", limit=None, actual=0, unit="bytes")
    if size > max_bytes:
        raise AudioTooLarge(
            f"the audio is {size} bytes; the limit is {max_bytes} bytes", limit=max_bytes, actual=size, unit="bytes"
        )


class _Limits(NamedTuple):
    max_seconds: float
    max_channels: int
    source_rates: tuple[int, int]


def _decode(file: Path | io.BytesIO, limits: _Limits, sample_rate: int) -> np.ndarray:
    max_seconds = limits.max_seconds
    try:
        with sf.SoundFile(file) as sound:
            _check_header(sound, limits)
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
    return resample_channels(samples, rate, sample_rate)


def _check_header(sound: sf.SoundFile, limits: _Limits) -> None:
    max_seconds, max_channels, (lowest, highest) = limits
    if sound.format not in ACCEPTED_FORMATS:
        raise AudioUndecodable(f"unsupported audio format {sound.format}; accepted: WAV, FLAC, OGG, MP3")
    if not 0 < sound.samplerate <= MAX_SOURCE_RATE:
        raise AudioUndecodable(
            f"implausible sample rate {sound.samplerate} Hz (at most {MAX_SOURCE_RATE})",
            limit=MAX_SOURCE_RATE,
            actual=sound.samplerate,
            unit="hertz",
        )
    if not lowest <= sound.samplerate <= highest:
        raise AudioUndecodable(
            f"the audio's sample rate is {sound.samplerate} Hz; accepted: {lowest}-{highest} Hz",
            limit=lowest if sound.samplerate < lowest else highest,
            actual=sound.samplerate,
            unit="hertz",
        )
    if sound.channels <= 0:
        raise AudioUndecodable(f"implausible channel count {sound.channels}")
    if sound.channels > max_channels:
        raise AudioTooManyChannels(
            f"the audio has {sound.channels} channels; the limit is {max_channels}",
            limit=max_channels,
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

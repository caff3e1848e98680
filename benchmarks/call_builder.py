"""Test calls with known truth: speech clips placed on alternating channels of a recording with known gaps, so
every turn's channel, start, end, emotion and words are known. Clips are RAVDESS's held-out actors (21-24) or speech
synthesised with espeak-ng."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from model.audio import SAMPLE_RATE, decode_audio
from model.data.speech import Clip, read_clips
from scoring.calls import Turn

HELD_OUT_ACTORS = ("21", "22", "23", "24")  # RAVDESS's speaker-independent test actors (model.data.speech)
# A clip's speech is from its first to its last 10 ms frame that is both within TRIM_BELOW_PEAK_DB of its loudest
# frame and TRIM_ABOVE_FLOOR_DB above its noise floor (its 10th-percentile frame): a quiet clip's peak is close
# to its floor, and a bound below the peak alone would keep its leading noise as speech.
TRIM_BELOW_PEAK_DB = 30.0
TRIM_ABOVE_FLOOR_DB = 20.0
ESPEAK = "espeak-ng"


@dataclass(frozen=True)
class Utterance:
    wave: np.ndarray  # 16 kHz, trimmed to its speech
    text: str
    emotion: str | None = None
    source: str = ""  # the clip's file name, where it came from one


@dataclass(frozen=True)
class TrueTurn:
    channel: int
    start_s: float
    end_s: float
    text: str
    emotion: str | None


@dataclass(frozen=True)
class AssembledCall:
    channels: np.ndarray  # [channels, samples] at 16 kHz
    turns: tuple[TrueTurn, ...]

    def wav(self, rate: int = SAMPLE_RATE) -> bytes:
        """The call as a 16-bit WAV file at `rate`."""
        frames = self.channels.T if rate == SAMPLE_RATE else soxr.resample(self.channels.T, SAMPLE_RATE, rate)
        buffer = io.BytesIO()
        sf.write(buffer, np.clip(frames, -1, 1), rate, format="WAV", subtype="PCM_16")
        return buffer.getvalue()


def trim_to_speech(wave: np.ndarray, frame: int = SAMPLE_RATE // 100) -> np.ndarray:
    """`wave` from its first to its last frame of speech (see TRIM_BELOW_PEAK_DB)."""
    frames = wave[: len(wave) // frame * frame].reshape(-1, frame)
    level = 20 * np.log10(np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1)) + 1e-12)
    bound = max(level.max() - TRIM_BELOW_PEAK_DB, np.percentile(level, 10) + TRIM_ABOVE_FLOOR_DB)
    loud = np.flatnonzero(level >= min(bound, level.max()))
    return wave[loud[0] * frame : (loud[-1] + 1) * frame]


def assemble(
    utterances: Sequence[Utterance],
    *,
    channels: int = 2,
    gaps: tuple[float, float] = (0.5, 2.0),
    seed: int = 0,
    lead_s: float = 0.5,
    overlap_at: int | None = None,
    overlap_s: float = 0.0,
) -> AssembledCall:
    """The utterances in order on alternating channels, a random gap in `gaps` seconds before each but the first.
    The utterance `overlap_at` starts `overlap_s` before the previous one ends instead (talk-over)."""
    rng = np.random.default_rng(seed)
    cursor, turns = lead_s, []
    for index, utterance in enumerate(utterances):
        if index:
            cursor += -overlap_s if index == overlap_at else float(rng.uniform(*gaps))
        end = cursor + len(utterance.wave) / SAMPLE_RATE
        turns.append(TrueTurn(index % channels, cursor, end, utterance.text, utterance.emotion))
        cursor = end
    audio = np.zeros((channels, round((cursor + lead_s) * SAMPLE_RATE)), dtype=np.float32)
    for turn, utterance in zip(turns, utterances, strict=True):
        start = round(turn.start_s * SAMPLE_RATE)
        audio[turn.channel, start : start + len(utterance.wave)] += utterance.wave
    return AssembledCall(audio, tuple(turns))


def ravdess_utterances(data_dir: Path, count: int, seed: int = 0) -> list[Utterance]:
    """`count` clips of the held-out actors, alternating a male and a female actor (so channel 0 is always one of
    21/23 and channel 1 one of 22/24), trimmed to their speech."""
    clips = [clip for clip in read_clips(data_dir, "ravdess") if clip.speaker in HELD_OUT_ACTORS]
    rng = np.random.default_rng(seed)
    male = [clip for clip in clips if int(clip.speaker) % 2]
    female = [clip for clip in clips if not int(clip.speaker) % 2]
    chosen = [_pick(male if index % 2 == 0 else female, rng) for index in range(count)]
    return [Utterance(trim_to_speech(decode_audio(clip.path)), clip.text, clip.emotion) for clip in chosen]


def ravdess_held_out(data_dir: Path, seed: int = 0) -> list[Utterance]:
    """Every clip of the held-out actors once, shuffled, a male actor's and a female actor's clip in turn (the
    surplus of one sex at the end), trimmed to their speech."""
    clips = [clip for clip in read_clips(data_dir, "ravdess") if clip.speaker in HELD_OUT_ACTORS]
    rng = np.random.default_rng(seed)
    male = [clips[i] for i in rng.permutation(len(clips)) if int(clips[i].speaker) % 2]
    female = [clips[i] for i in rng.permutation(len(clips)) if not int(clips[i].speaker) % 2]
    pairs = [clip for pair in zip(male, female, strict=False) for clip in pair]
    chosen = pairs + male[len(female) :] + female[len(male) :]
    return [
        Utterance(trim_to_speech(decode_audio(clip.path)), clip.text, clip.emotion, clip.path.name) for clip in chosen
    ]


def _pick(clips: list[Clip], rng: np.random.Generator) -> Clip:
    return clips[int(rng.integers(len(clips)))]


def espeak_available() -> bool:
    return shutil.which(ESPEAK) is not None


def espeak(text: str, voice: str = "en-us", words_per_minute: int = 150) -> Utterance:
    """`text` spoken by espeak-ng, at 16 kHz, trimmed to its speech."""
    wav = subprocess.run(
        [ESPEAK, "-v", voice, "-s", str(words_per_minute), "--stdout", text], check=True, capture_output=True
    ).stdout
    return Utterance(trim_to_speech(decode_audio(wav)), text)


def tile(call: AssembledCall, seconds: float) -> np.ndarray:
    """The call's audio repeated (whole) until it lasts at least `seconds`, then cut there."""
    repeats = int(np.ceil(seconds * SAMPLE_RATE / call.channels.shape[1]))
    return np.tile(call.channels, (1, repeats))[:, : round(seconds * SAMPLE_RATE)]


def matched_turns(call: AssembledCall, found: Sequence[Turn], tolerance_s: float) -> list[Turn | None]:
    """For each true turn of `call`, the found turn of the same channel starting nearest to it, within
    `tolerance_s` (each found turn used once), or None."""
    free = list(found)
    pairs: list[Turn | None] = []
    for truth in call.turns:
        near = [t for t in free if t.audio.channel == truth.channel and abs(t.start_s - truth.start_s) <= tolerance_s]
        best = min(near, key=lambda t: abs(t.start_s - truth.start_s), default=None)
        if best is not None:
            free.remove(best)
        pairs.append(best)
    return pairs

"""Telephone-channel augmentation on float32 16 kHz waveforms in [-1, 1].

Each function is deterministic given its inputs (randomness comes in as a numpy Generator), so tests can pin it:
8 kHz band-limiting (soxr down and back up), the G.711 codecs (mu-law and A-law, exact: the codes equal CPython's
audioop), GSM 06.10 full rate (libsndfile through soundfile, WAV container), additive noise at a given SNR, speed
perturbation (resampling, so pitch moves with tempo), and `PhoneChain`, which draws one channel per clip.

Noise sources: coloured noise (white, pink or brown, shaped in the frequency domain) and babble (a sum of other
training speakers' clips, passed in by the caller so that no held-out speaker leaks into training).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import soundfile
import soxr

SAMPLE_RATE = 16_000
PHONE_RATE = 8_000
# G.711 mu-law: the 14-bit magnitude, biased by 33 so that every segment starts at a power of two and clipped to the
# top of the last segment, is kept as a 3-bit segment and the 4 bits after its leading one.
MULAW_BIAS, MULAW_TOP = 33, 0x1FFF
# G.711 A-law: 13-bit magnitude; segment s >= 1 covers [16 << s, 32 << s), segment 0 is linear like segment 1.
ALAW_TOP, ALAW_INVERT = 0xFFF, 0x55
NOISE_COLOURS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power falls as 1 / f**exponent
SPEEDS = (0.9, 1.0, 1.1)
SNR_RANGE_DB = (5.0, 20.0)


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(audio, dtype=np.float64) * 32768.0), -32768, 32767).astype(np.int32)


def from_pcm16(pcm: np.ndarray) -> np.ndarray:
    return (np.asarray(pcm) / 32768.0).astype(np.float32)


def mulaw_encode(pcm: np.ndarray) -> np.ndarray:
    """16-bit PCM (int) -> G.711 mu-law bytes."""
    value = np.asarray(pcm, dtype=np.int32) >> 2  # 14 bits, floored
    magnitude = np.minimum(np.abs(value) + MULAW_BIAS, MULAW_TOP)
    segment = np.frexp(magnitude)[1] - 6  # floor(log2) - 5: 0..7
    mantissa = (magnitude >> (segment + 1)) & 0x0F
    sign = np.where(value < 0, 0x80, 0)
    return (~(sign | (segment << 4) | mantissa) & 0xFF).astype(np.uint8)


def mulaw_decode(codes: np.ndarray) -> np.ndarray:
    """G.711 mu-law bytes -> 16-bit PCM (int32), at the middle of each step."""
    bits = ~np.asarray(codes, dtype=np.int32) & 0xFF
    magnitude = (((bits & 0x0F) << 1) + MULAW_BIAS) << ((bits >> 4) & 0x07)
    return 4 * np.where(bits & 0x80, MULAW_BIAS - magnitude, magnitude - MULAW_BIAS)


def alaw_encode(pcm: np.ndarray) -> np.ndarray:
    """16-bit PCM (int) -> G.711 A-law bytes (even bits inverted, sign bit set for non-negative input)."""
    value = np.asarray(pcm, dtype=np.int32) >> 3  # 13 bits, floored
    negative = value < 0
    magnitude = np.minimum(np.where(negative, -value - 1, value), ALAW_TOP)
    segment = np.maximum(np.frexp(magnitude)[1] - 5, 0)  # floor(log2) - 4, segments 0 and 1 share a step
    mantissa = (magnitude >> np.maximum(segment, 1)) & 0x0F
    code = (segment << 4) | mantissa | np.where(negative, 0, 0x80)
    return (code ^ ALAW_INVERT).astype(np.uint8)


def alaw_decode(codes: np.ndarray) -> np.ndarray:
    """G.711 A-law bytes -> 16-bit PCM (int32), at the middle of each step."""
    bits = np.asarray(codes, dtype=np.int32) ^ ALAW_INVERT
    segment = (bits >> 4) & 0x07
    step = ((bits & 0x0F) << 4) + np.where(segment == 0, 8, 0x108)
    magnitude = step << np.maximum(segment - 1, 0)
    return np.where(bits & 0x80, magnitude, -magnitude)


def band_limit(audio: np.ndarray, rate: int = PHONE_RATE) -> np.ndarray:
    """16 kHz -> `rate` -> 16 kHz: removes everything above rate / 2 (soxr HQ)."""
    narrow = soxr.resample(np.asarray(audio, dtype=np.float32), SAMPLE_RATE, rate, quality="HQ")
    return _back_to_16k(narrow, rate, len(audio))


def _back_to_16k(narrow: np.ndarray, rate: int, length: int) -> np.ndarray:
    wide = soxr.resample(np.asarray(narrow, dtype=np.float32), rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return np.pad(wide, (0, max(0, length - len(wide))))[:length]


def _codec_line(encode: Callable[[np.ndarray], np.ndarray], decode: Callable[[np.ndarray], np.ndarray]):
    def line(audio: np.ndarray) -> np.ndarray:
        narrow = soxr.resample(np.asarray(audio, dtype=np.float32), SAMPLE_RATE, PHONE_RATE, quality="HQ")
        return _back_to_16k(from_pcm16(decode(encode(to_pcm16(narrow)))), PHONE_RATE, len(audio))

    return line


mulaw_line = _codec_line(mulaw_encode, mulaw_decode)
mulaw_line.__doc__ = "16 kHz -> 8 kHz -> G.711 mu-law -> 16 kHz."
alaw_line = _codec_line(alaw_encode, alaw_decode)
alaw_line.__doc__ = "16 kHz -> 8 kHz -> G.711 A-law -> 16 kHz."


def gsm_roundtrip(narrow: np.ndarray) -> np.ndarray:
    """8 kHz float32 through GSM 06.10 full rate (13 kbit/s) and back, same length (libsndfile's codec)."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(narrow, -1.0, 1.0), PHONE_RATE, format="WAV", subtype="GSM610")
    buffer.seek(0)
    decoded, _ = soundfile.read(buffer, dtype="float32")
    return np.pad(decoded, (0, max(0, len(narrow) - len(decoded))))[: len(narrow)]


def gsm_line(audio: np.ndarray) -> np.ndarray:
    """16 kHz -> 8 kHz -> GSM 06.10 -> 16 kHz."""
    narrow = soxr.resample(np.asarray(audio, dtype=np.float32), SAMPLE_RATE, PHONE_RATE, quality="HQ")
    return _back_to_16k(gsm_roundtrip(narrow), PHONE_RATE, len(audio))


CHANNELS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "clean": lambda audio: np.asarray(audio, dtype=np.float32),
    "8k": band_limit,
    "mulaw": mulaw_line,
    "alaw": alaw_line,
    "gsm": gsm_line,
}


def coloured_noise(length: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise whose power spectrum falls as 1 / f**exponent (0 white, 1 pink, 2 brown), unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(length))
    frequency = np.fft.rfftfreq(length)
    frequency[0] = frequency[1] if length > 1 else 1.0
    noise = np.fft.irfft(spectrum / frequency ** (exponent / 2), n=length)
    return (noise / max(float(np.sqrt(np.mean(noise**2))), 1e-12)).astype(np.float32)


def babble(length: int, talkers: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The sum of `talkers` (each tiled to `length` from a random start, normalised to unit RMS), unit RMS."""
    mixture = np.zeros(length)
    for clip in talkers:
        tiled = np.resize(np.roll(clip, -int(rng.integers(len(clip)))), length)
        mixture += tiled / max(float(np.sqrt(np.mean(tiled**2))), 1e-12)
    return (mixture / max(float(np.sqrt(np.mean(mixture**2))), 1e-12)).astype(np.float32)


def add_noise(audio: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """audio + noise scaled so that power(audio) / power(noise) is `snr_db` decibels."""
    signal_power = float(np.mean(np.asarray(audio, dtype=np.float64) ** 2))
    noise_power = max(float(np.mean(np.asarray(noise, dtype=np.float64) ** 2)), 1e-20)
    gain = np.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10)))
    return (audio + gain * noise).astype(np.float32)


def speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """Played `factor` times faster (pitch moves with it): resampled from 16 kHz * factor to 16 kHz."""
    if factor == 1.0:
        return np.asarray(audio, dtype=np.float32)
    return soxr.resample(np.asarray(audio, dtype=np.float32), SAMPLE_RATE * factor, SAMPLE_RATE, quality="HQ")


@dataclass(frozen=True)
class PhoneChain:
    """Per clip: speed (uniform over SPEEDS), then noise (coloured or babble, SNR uniform in SNR_RANGE_DB, with
    probability `noise_probability`), then a line drawn uniformly from `lines`, then a peak limit at 1."""

    lines: tuple[str, ...] = ("clean", "8k", "mulaw", "alaw", "gsm")
    noise_probability: float = 0.7
    babble_talkers: int = 3

    def __call__(self, audio: np.ndarray, rng: np.random.Generator, pool: Sequence[np.ndarray] = ()) -> tuple:
        """(augmented waveform, description). `pool`: other speakers' clips for babble (none: coloured only)."""
        factor = float(rng.choice(SPEEDS))
        out, parts = speed(audio, factor), [f"speed {factor:g}"]
        if rng.random() < self.noise_probability:
            snr = float(rng.uniform(*SNR_RANGE_DB))
            kinds = [*NOISE_COLOURS, *(["babble"] if len(pool) >= self.babble_talkers else [])]
            kind = str(rng.choice(kinds))
            if kind == "babble":
                picks = rng.choice(len(pool), self.babble_talkers, replace=False)
                noise = babble(len(out), [pool[i] for i in picks], rng)
            else:
                noise = coloured_noise(len(out), NOISE_COLOURS[kind], rng)
            out = add_noise(out, noise, snr)
            parts.append(f"{kind} {snr:.0f} dB")
        line = str(rng.choice(self.lines))
        out = CHANNELS[line](out)
        peak = float(np.abs(out).max(initial=0.0))
        return (out / peak if peak > 1.0 else out).astype(np.float32), ", ".join([*parts, line])

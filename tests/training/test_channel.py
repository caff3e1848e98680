"""The telephone-channel augmentation: exact G.711 codes, band limits, SNR, speed, and the seeded chain."""

from __future__ import annotations

import numpy as np
import pytest

from training.channel import (
    CHANNELS,
    PHONE_RATE,
    SAMPLE_RATE,
    PhoneChain,
    add_noise,
    alaw_decode,
    alaw_encode,
    babble,
    band_limit,
    coloured_noise,
    gsm_line,
    mulaw_decode,
    mulaw_encode,
    speed,
)

ALL_PCM = np.arange(-32768, 32768)
ALL_CODES = np.arange(256)


def tone(hz: float, seconds: float = 1.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def band_power(audio: np.ndarray, low: float, high: float) -> float:
    spectrum = np.abs(np.fft.rfft(audio)) ** 2
    hz = np.fft.rfftfreq(len(audio), 1 / SAMPLE_RATE)
    return float(spectrum[(hz >= low) & (hz < high)].sum())


@pytest.mark.parametrize(
    ("pcm", "mulaw", "alaw"),
    [(0, 0xFF, 0xD5), (-1, 0x7E, 0x55), (32767, 0x80, 0xAA), (-32768, 0x00, 0x2A), (1000, 0xCE, 0xFA)],
)
def test_g711_known_codes(pcm: int, mulaw: int, alaw: int) -> None:
    assert int(mulaw_encode(np.array([pcm]))[0]) == mulaw
    assert int(alaw_encode(np.array([pcm]))[0]) == alaw


def test_g711_decoded_values() -> None:
    assert mulaw_decode(np.array([0xFF, 0x80, 0x00])).tolist() == [0, 32124, -32124]
    assert alaw_decode(np.array([0xD5, 0x55, 0xAA, 0x2A])).tolist() == [8, -8, 32256, -32256]


def test_g711_round_trip_error_within_half_a_step() -> None:
    """Every 16-bit value decodes to within its quantisation step: 1/16 of the segment's magnitude, roughly."""
    for encode, decode in ((mulaw_encode, mulaw_decode), (alaw_encode, alaw_decode)):
        error = np.abs(decode(encode(ALL_PCM)) - ALL_PCM)
        assert (error <= np.maximum(np.abs(ALL_PCM) / 16, 16) + 4).all()
        assert decode(ALL_CODES).min() >= -32768 and decode(ALL_CODES).max() <= 32767


def test_g711_matches_audioop_bit_for_bit() -> None:
    audioop = pytest.importorskip("audioop")  # removed from the standard library in Python 3.13
    pcm_bytes = ALL_PCM.astype("<i2").tobytes()
    assert (mulaw_encode(ALL_PCM) == np.frombuffer(audioop.lin2ulaw(pcm_bytes, 2), np.uint8)).all()
    assert (alaw_encode(ALL_PCM) == np.frombuffer(audioop.lin2alaw(pcm_bytes, 2), np.uint8)).all()
    codes = ALL_CODES.astype(np.uint8).tobytes()
    assert (mulaw_decode(ALL_CODES) == np.frombuffer(audioop.ulaw2lin(codes, 2), "<i2")).all()
    assert (alaw_decode(ALL_CODES) == np.frombuffer(audioop.alaw2lin(codes, 2), "<i2")).all()


def test_band_limit_removes_the_band_above_4_khz_and_keeps_speech_band() -> None:
    audio = tone(1000) + tone(6000)
    narrow = band_limit(audio)
    assert len(narrow) == len(audio)
    assert band_power(narrow, 5000, 8000) < 1e-4 * band_power(audio, 5000, 8000)
    assert band_power(narrow, 900, 1100) == pytest.approx(band_power(audio, 900, 1100), rel=0.02)


@pytest.mark.parametrize("line", ["8k", "mulaw", "alaw", "gsm"])
def test_phone_lines_keep_length_and_drop_the_high_band(line: str) -> None:
    audio = tone(500) + tone(7000, amplitude=0.1)
    out = CHANNELS[line](audio)
    assert out.dtype == np.float32 and len(out) == len(audio)
    assert band_power(out, 6000, 8000) < 1e-3 * band_power(audio, 6000, 8000)
    assert np.corrcoef(out[800:-800], audio[800:-800] - tone(7000, amplitude=0.1)[800:-800])[0, 1] > 0.9


def test_gsm_is_lossy_but_keeps_the_waveform_shape() -> None:
    audio = tone(300) * np.hanning(SAMPLE_RATE).astype(np.float32)
    out = gsm_line(audio)
    assert not np.allclose(out, band_limit(audio), atol=1e-3)  # a real codec, not a pass-through
    assert np.corrcoef(out, audio)[0, 1] > 0.8


@pytest.mark.parametrize("snr_db", [5.0, 12.5, 20.0])
def test_add_noise_hits_the_snr(snr_db: float) -> None:
    audio = tone(440)
    noise = coloured_noise(len(audio), 1.0, np.random.default_rng(0))
    mixed = add_noise(audio, noise, snr_db)
    measured = 10 * np.log10(np.mean(audio.astype(float) ** 2) / np.mean((mixed - audio).astype(float) ** 2))
    assert measured == pytest.approx(snr_db, abs=1e-3)


def test_coloured_noise_slopes() -> None:
    rng = np.random.default_rng(1)
    ratios = []
    for exponent in (0.0, 1.0, 2.0):
        noise = coloured_noise(SAMPLE_RATE * 4, exponent, rng)
        assert np.sqrt(np.mean(noise**2)) == pytest.approx(1.0, rel=1e-6)
        ratios.append(band_power(noise, 100, 200) / band_power(noise, 3200, 6400))
    # equal-width-ratio octave bands: white puts 32x the power in the wider high band, pink equal, brown less
    assert ratios[0] < 0.1 < ratios[1] < 10 < ratios[2]


def test_babble_is_unit_rms_and_made_of_the_talkers() -> None:
    rng = np.random.default_rng(2)
    talkers = [tone(200 + 100 * k, 0.5) for k in range(3)]
    mixture = babble(SAMPLE_RATE, talkers, rng)
    assert len(mixture) == SAMPLE_RATE and np.sqrt(np.mean(mixture**2)) == pytest.approx(1.0, rel=1e-5)
    assert band_power(mixture, 150, 450) > 0.99 * band_power(mixture, 0, 8000)


@pytest.mark.parametrize("factor", [0.9, 1.0, 1.1])
def test_speed_changes_duration_and_pitch(factor: float) -> None:
    out = speed(tone(1000), factor)
    assert len(out) == pytest.approx(SAMPLE_RATE / factor, abs=2)
    peak_hz = np.fft.rfftfreq(len(out), 1 / SAMPLE_RATE)[np.abs(np.fft.rfft(out)).argmax()]
    assert peak_hz == pytest.approx(1000 * factor, abs=2)


def test_chain_is_seeded_and_varied() -> None:
    audio = tone(300, 1.5)
    chain = PhoneChain()
    pool = [tone(150 + 50 * k, 0.7) for k in range(4)]
    first = chain(audio, np.random.default_rng([0, 5]), pool)
    again = chain(audio, np.random.default_rng([0, 5]), pool)
    assert first[1] == again[1] and np.array_equal(first[0], again[0])
    names = {chain(audio, np.random.default_rng([0, k]), pool)[1].split(", ")[-1] for k in range(60)}
    assert names == set(chain.lines)
    assert all(np.abs(chain(audio * 3, np.random.default_rng(k), pool)[0]).max() <= 1.0 for k in range(5))
    assert PHONE_RATE == SAMPLE_RATE // 2

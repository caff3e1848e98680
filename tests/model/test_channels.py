"""Multi-channel audio: decoding keeps the channels apart, and model.channels turns them into one voice each."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import soundfile as sf

from model.audio import (
    SAMPLE_RATE,
    AudioTooManyChannels,
    decode_audio,
    decode_channels,
    encode_flac,
    level_dbfs,
)
from model.channels import (
    ChannelNamesMismatch,
    UnattributedText,
    channel_speakers,
    parse_channel_names,
    split_channels,
)
from tests.channel_audio import SYNTHETIC_RATE, recording, synthetic_voices

SILENCE_DBFS = -60.0


def test_each_channel_decodes_as_it_would_alone_never_mixed() -> None:
    made = recording(*synthetic_voices(), rate=SYNTHETIC_RATE)
    channels = decode_channels(made.stereo)
    assert channels.dtype == np.float32 and channels.shape == (2, round(1.2 * SAMPLE_RATE))
    for index, mono in enumerate(made.channels):
        alone = decode_channels(mono)
        assert alone.shape == (1, channels.shape[1])
        np.testing.assert_array_equal(channels[index], alone[0])
    assert not np.allclose(channels[0], channels[1], atol=0.01)
    np.testing.assert_allclose(decode_audio(made.stereo), channels.mean(axis=0), atol=1e-7)  # corpora only


def test_the_channel_limit_is_a_keyword_and_names_its_limit() -> None:
    made = recording(*[np.full(1600, 0.1, dtype=np.float32)] * 3, rate=SAMPLE_RATE)
    assert decode_channels(made.stereo, max_channels=3).shape == (3, 1600)
    with pytest.raises(AudioTooManyChannels) as raised:
        decode_channels(made.stereo, max_channels=2)
    error = raised.value
    assert (error.code, error.limit, error.actual, error.unit) == ("audio_too_many_channels", 2, 3, "channels")
    assert "3 channels" in error.message and "limit is 2" in error.message


def test_level_is_that_of_the_loudest_20_ms() -> None:
    assert level_dbfs(np.zeros(16000, dtype=np.float32)) == -math.inf
    sine = np.sin(2 * np.pi * 400 * np.arange(16000) / SAMPLE_RATE).astype(np.float32)  # 8 periods per frame
    assert level_dbfs(sine) == pytest.approx(-3.01, abs=0.05)
    quiet_with_a_word = np.full(32000, 1e-5, dtype=np.float32)
    quiet_with_a_word[16000:16640] = 0.1  # 40 ms at -20 dBFS in 2 s of -100 dBFS
    assert level_dbfs(quiet_with_a_word) == pytest.approx(-20, abs=0.01)
    assert level_dbfs(np.array([0.5], dtype=np.float32)) == pytest.approx(20 * math.log10(0.5))


def test_a_channel_kept_alone_as_flac_decodes_back_to_itself() -> None:
    wave = synthetic_voices(rate=SAMPLE_RATE)[0]
    np.testing.assert_allclose(decode_audio(encode_flac(wave)), wave, atol=2**-22)
    assert sf.info(io.BytesIO(encode_flac(wave))).channels == 1


def test_names_are_parsed_from_commas_or_a_list() -> None:
    assert parse_channel_names(" agent , customer") == ("agent", "customer")
    assert parse_channel_names(["agent", "customer"]) == ("agent", "customer")
    for bad in ("agent,,customer", "", "agent,agent", ["x" * 257], [{}], ["agent", 1]):
        with pytest.raises(ValueError):
            parse_channel_names(bad)
    assert channel_speakers(3, None) == ("channel-0", "channel-1", "channel-2")
    with pytest.raises(ChannelNamesMismatch) as raised:
        channel_speakers(3, ("agent", "customer"))
    assert raised.value.limit == 3 and "3 channels but 2 channel names" in raised.value.message


def test_one_channel_is_the_turn_as_sent() -> None:
    wave = np.zeros((1, 800), dtype=np.float32)  # silent, but one voice is scored as sent
    (turn,) = split_channels("hello", wave, "agent", ("a", "b"), SILENCE_DBFS)
    assert (turn.channel, turn.speaker, turn.text, turn.silent) == (None, "agent", "hello", False)
    np.testing.assert_array_equal(turn.audio, wave[0])
    (text_only,) = split_channels("hi", None, None, None, SILENCE_DBFS)
    assert (text_only.channel, text_only.audio, text_only.text) == (None, None, "hi")


def test_channels_become_named_voices_and_a_silent_one_is_not_a_voice() -> None:
    voice = np.asarray(synthetic_voices(rate=SAMPLE_RATE)[0])
    hiss = np.random.default_rng(0).normal(0, 10 ** (-75 / 20), len(voice)).astype(np.float32)
    audio = np.stack([voice, np.zeros_like(voice), hiss])
    turns = split_channels(None, audio, None, ("agent", "customer", "supervisor"), SILENCE_DBFS)
    assert [(t.channel, t.speaker, t.silent) for t in turns] == [
        (0, "agent", False),
        (1, "customer", True),
        (2, "supervisor", True),
    ]
    np.testing.assert_array_equal(turns[0].audio, audio[0])
    assert turns[1].audio is None
    assert turns[0].level_dbfs is not None and turns[0].level_dbfs > -20
    assert turns[1].level_dbfs == -math.inf
    assert turns[2].level_dbfs is not None and -75 < turns[2].level_dbfs < SILENCE_DBFS


def test_text_belongs_to_the_channel_its_speaker_names() -> None:
    audio = np.stack([np.full(800, 0.1, dtype=np.float32), np.zeros(800, dtype=np.float32)])
    turns = split_channels("I want a refund", audio, "channel-1", None, SILENCE_DBFS)
    assert [(t.speaker, t.text, t.audio is None, t.silent) for t in turns] == [
        ("channel-0", None, False, False),
        ("channel-1", "I want a refund", True, False),  # silent, but its words are scored
    ]
    for speaker in (None, "customer"):
        with pytest.raises(UnattributedText) as raised:
            split_channels("I want a refund", audio, speaker, None, SILENCE_DBFS)
        assert raised.value.limit == "channel-0,channel-1"
        assert "set `speaker` to the channel" in raised.value.message

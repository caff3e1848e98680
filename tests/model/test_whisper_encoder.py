"""Whisper tiny.en's encoder rebuilt in PyTorch: pinned weights, Whisper's log-mel, equality with CTranslate2's
own encoder on real speech, masking of ragged batches, and ONNX Runtime parity at lengths it was not traced at."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from model.audio import decode_audio
from model.data.speech import read_clips
from model.export import PARITY_TOLERANCE, ort_session
from model.whisper_encoder import (
    INPUTS,
    MIN_SAMPLES,
    OUTPUTS,
    WINDOW_SAMPLES,
    WhisperEncoder,
    WhisperWeightsError,
    clip_frames,
    export_whisper_encoder,
    load_whisper_encoder,
    onnx_difference,
    pad_to_window,
    verify_weights,
    weights_path,
    whisper_filterbank,
)
from tests.conftest import one_torch_thread

# CTranslate2 computes in float32 on CPU from the same float16 weights, upcast exactly as here, so the float16
# rounding cancels out; what is left is float32 summation order over 4 layers: 2e-5 measured on outputs up to 12.
CTRANSLATE2_TOLERANCE = 1e-4
FRONT_END_TOLERANCE = 5e-5  # vs transformers' numpy (float64) implementation; 6e-6 measured on a 0.5-scale feature


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def encoder() -> WhisperEncoder:
    return load_whisper_encoder()


@pytest.fixture(scope="module")
def speech(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Two RAVDESS clips of actor 1: the shortest (3.2 s) and the longest (5.0 s)."""
    clips = sorted((c for c in read_clips(data_dir, "ravdess") if c.speaker == "01"), key=lambda c: c.path.name)
    durations = [len(decode_audio(c.path)) for c in clips[:12]]
    short, long = clips[int(np.argmin(durations))], clips[int(np.argmax(durations))]
    return decode_audio(short.path), decode_audio(long.path)


def _batch(*clips: np.ndarray) -> dict[str, torch.Tensor]:
    audio = torch.zeros(len(clips), max(len(c) for c in clips))
    for row, clip in enumerate(clips):
        audio[row, : len(clip)] = torch.from_numpy(clip)
    return dict(audio=audio, audio_lengths=torch.tensor([len(c) for c in clips]))


def test_the_pinned_file_passes_and_a_changed_or_missing_one_fails(tmp_path: Path) -> None:
    assert weights_path().name == "model.bin"
    changed = shutil.copyfile(weights_path(), tmp_path / "model.bin")
    with changed.open("r+b") as handle:
        handle.seek(10_000_000)
        byte = handle.read(1)
        handle.seek(10_000_000)
        handle.write(bytes([byte[0] ^ 1]))
    with pytest.raises(WhisperWeightsError, match="SHA-256 .* pins 1a5afae0"):
        verify_weights(changed)
    with pytest.raises(WhisperWeightsError, match="missing"):
        load_whisper_encoder(tmp_path / "absent.bin")


def test_filterbank_is_whispers_slaney_filterbank() -> None:
    reference = mel_filter_bank(201, 80, 0.0, 8000.0, 16000, norm="slaney", mel_scale="slaney")  # [freqs, mels]
    np.testing.assert_allclose(whisper_filterbank(80).numpy().T, reference, rtol=1e-5, atol=1e-9)


def test_loaded_shapes(encoder: WhisperEncoder) -> None:
    assert len(encoder.blocks) == 4 and encoder.blocks[0].heads == 6
    assert encoder.positions.shape == (1500, 384) and encoder.conv1.weight.shape == (384, 80, 3)
    assert sum(p.numel() for p in encoder.parameters()) == 7_633_920


@pytest.mark.data
def test_front_end_matches_whisper_on_30_s_of_real_speech(encoder: WhisperEncoder, speech: tuple) -> None:
    clip = speech[0]
    reference = WhisperFeatureExtractor()(clip, sampling_rate=16000, return_tensors="np").input_features
    audio = torch.from_numpy(pad_to_window(clip))[None]
    with torch.no_grad():
        features, frames = encoder.front_end(audio, torch.tensor([WINDOW_SAMPLES]))
    assert features.shape == reference.shape == (1, 80, 3000) and frames.tolist() == [3000]
    assert np.abs(features.numpy() - reference).max() <= FRONT_END_TOLERANCE


@pytest.mark.data
@pytest.mark.slow
def test_encoder_equals_ctranslate2_on_30_s_of_real_speech(encoder: WhisperEncoder, speech: tuple) -> None:
    import ctranslate2

    audio = torch.from_numpy(pad_to_window(speech[1]))[None]
    with torch.no_grad():
        features, frames = encoder.front_end(audio, torch.tensor([WINDOW_SAMPLES]))
        ours = encoder.encode_features(features, frames).last_hidden_state.numpy()
    whisper = ctranslate2.models.Whisper(str(weights_path().parent), device="cpu", compute_type="float32")
    theirs = np.array(whisper.encode(ctranslate2.StorageView.from_array(features.numpy()), to_cpu=True))
    assert ours.shape == theirs.shape == (1, 1500, 384)
    assert np.abs(theirs).max() > 1.0  # a real comparison, not of two near-zero tensors
    assert np.abs(ours - theirs).max() <= CTRANSLATE2_TOLERANCE


@pytest.mark.data
def test_rows_do_not_depend_on_the_batch_padding(encoder: WhisperEncoder, speech: tuple) -> None:
    short, long = speech
    with torch.no_grad():
        alone = encoder(**_batch(short))
        batched = encoder(**_batch(short, long))
    frames = clip_frames(len(short))
    assert alone.frame_mask.shape == (1, frames) and alone.frame_mask.all()
    assert batched.frame_mask[0].sum() == frames and batched.frame_mask[1].all()
    assert batched.hidden_states.shape == (2, 5, batched.frame_mask.shape[1], 384)
    assert torch.allclose(batched.last_hidden_state[0, :frames], alone.last_hidden_state[0], atol=1e-4)
    assert (batched.last_hidden_state[0, frames:] == 0).all() and (batched.hidden_states[0, :, frames:] == 0).all()


def test_frames_and_window() -> None:
    assert [clip_frames(n) for n in (WINDOW_SAMPLES, 16_000, 16_160, 100)] == [1500, 50, 51, 1]  # 20 ms a frame
    assert pad_to_window(np.ones(3, dtype=np.float32)).shape == (WINDOW_SAMPLES,)
    with pytest.raises(ValueError, match="480000"):
        pad_to_window(np.zeros(WINDOW_SAMPLES + 1, dtype=np.float32))


def test_too_short_audio_is_refused(encoder: WhisperEncoder) -> None:
    with pytest.raises(ValueError, match=f"needs {MIN_SAMPLES}"):
        encoder(torch.zeros(1, MIN_SAMPLES - 1), torch.tensor([MIN_SAMPLES - 1]))
    with torch.no_grad():
        assert encoder(torch.zeros(1, MIN_SAMPLES), torch.tensor([MIN_SAMPLES])).frame_mask.shape == (1, 1)


@pytest.mark.data
@pytest.mark.slow
def test_onnx_export_matches_pytorch_on_real_speech_of_two_lengths(
    encoder: WhisperEncoder, speech: tuple, tmp_path: Path
) -> None:
    session = ort_session(export_whisper_encoder(encoder, tmp_path / "whisper.onnx"))
    assert tuple(i.name for i in session.get_inputs()) == INPUTS
    assert tuple(o.name for o in session.get_outputs()) == OUTPUTS
    short, long = speech
    assert onnx_difference(encoder, session, _batch(short, long)) <= PARITY_TOLERANCE
    assert onnx_difference(encoder, session, _batch(long)) <= PARITY_TOLERANCE

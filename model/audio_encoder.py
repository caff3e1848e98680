"""Audio encoder trained from the raw 16 kHz waveform; log-mel features are computed inside the graph.

Every step masks by the valid length, so a row's output does not depend on how much padding its batch adds.
The STFT is a strided conv1d with a fixed windowed-DFT basis (exports to a plain ONNX Conv).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MASK_VALUE = -3e4  # finite (no NaN like -inf) and within float16 for mixed precision; exp() of it is exactly 0


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float, f_max: float) -> torch.Tensor:
    """HTK-scale triangular filters, [n_freqs, n_mels] (as torchaudio.functional.melscale_fbanks, norm=None)."""
    freqs = np.linspace(0.0, sample_rate / 2, n_freqs)
    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(f_min)), hz_to_mel(np.array(f_max)), n_mels + 2))
    return torch.from_numpy(triangular_filters(freqs, edges)).float()


def triangular_filters(freqs: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """[n_freqs, len(edges) - 2] triangles, filter i rising from edges[i] to 1 at edges[i + 1], 0 at edges[i + 2]."""
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs[:, None] - lower) / (centre - lower)
    falling = (upper - freqs[:, None]) / (upper - centre)
    return np.clip(np.minimum(rising, falling), 0.0, None)


def dft_basis(n_fft: int) -> torch.Tensor:
    """Hann-windowed real and imaginary DFT rows as conv1d weights, [2 * (n_fft // 2 + 1), 1, n_fft]."""
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None]
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    angle = 2 * math.pi * k * n / n_fft
    return torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window]).unsqueeze(1).float()


def length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """[B] valid lengths -> [B, size] bool, True where the position is valid."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def key_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, S] valid positions -> [B, S, S] attention permissions: valid keys, plus self so no row is empty."""
    eye = torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)
    return valid[:, None, :] | eye


class LogMel(nn.Module):
    """Waveform [B, N] + lengths [B] -> normalised log-mel [B, F, n_mels] and valid-frame mask [B, F]."""

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int, f_min: float = 20.0) -> None:
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("basis", dft_basis(n_fft), persistent=False)
        fbank = mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate, f_min, sample_rate / 2)
        self.register_buffer("fbank", fbank, persistent=False)

    def num_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        return lengths // self.hop_length + 1

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        audio = torch.where(length_mask(lengths, audio.shape[1]), audio, 0.0)  # where: even NaN padding is dropped
        # Zero "centre" padding: frame i is centred on sample i * hop, frames = N // hop + 1.
        padded = F.pad(audio.unsqueeze(1), (self.n_fft // 2, self.n_fft // 2))
        spectrum = F.conv1d(padded, self.basis, stride=self.hop_length)
        real, imag = spectrum.chunk(2, dim=1)
        power = (real.square() + imag.square()).transpose(1, 2)
        logmel = torch.log(power @ self.fbank + 1e-6)
        valid = length_mask(self.num_frames(lengths), logmel.shape[1])
        return normalise(logmel, valid), valid


def normalise(features: torch.Tensor, valid: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-utterance mean / variance over valid frames and all bins (keeps the spectral shape); padding -> 0."""
    weight = valid.to(features.dtype).unsqueeze(-1)
    count = weight.sum(dim=(1, 2), keepdim=True) * features.shape[-1]
    mean = (features * weight).sum(dim=(1, 2), keepdim=True) / count
    var = ((features - mean).square() * weight).sum(dim=(1, 2), keepdim=True) / count
    return (features - mean) * torch.rsqrt(var + eps) * weight


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + feed-forward over [B, S, D] with a [B, S, S] bool permission mask."""

    def __init__(self, dim: int, heads: int, ff_mult: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_mult * dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def attend(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        batch, size, dim = x.shape
        q, k, v = self.qkv(x).view(batch, size, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * (dim // self.heads) ** -0.5
        weights = torch.softmax(scores.masked_fill(~allowed[:, None], MASK_VALUE), dim=-1)
        weights = F.dropout(weights, self.dropout, self.training)
        return self.out((weights @ v).transpose(1, 2).reshape(batch, size, dim))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attend(self.norm1(x), allowed))
        return x + self.drop(self.ff(self.norm2(x)))


class AttentionPool(nn.Module):
    """Softmax-weighted mean over valid positions: [B, S, D] + [B, S] -> [B, D]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        scores = self.score(x).squeeze(-1).masked_fill(~valid, MASK_VALUE)
        return (torch.softmax(scores, dim=-1).unsqueeze(-1) * x).sum(dim=1)


class ConvDownsample(nn.Module):
    """Conv1d over time (kernel 5, stride 2) + GELU; re-masks so padded frames stay exactly 0."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel_size=5, stride=2, padding=2)

    def forward(self, x: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        frames = (frames - 1) // 2 + 1
        valid = length_mask(frames, x.shape[1])
        return x * valid.unsqueeze(-1).to(x.dtype), frames


class AudioEncoder(nn.Module):
    """(audio [B, N] float32, audio_lengths [B] int64) -> [B, dim]."""

    def __init__(
        self,
        *,
        sample_rate: int = 16000,
        n_fft: int = 400,
        hop_length: int = 160,
        n_mels: int = 64,
        dim: int = 128,
        layers: int = 2,
        heads: int = 4,
        ff_mult: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.features = LogMel(sample_rate, n_fft, hop_length, n_mels)
        self.downsample = nn.ModuleList([ConvDownsample(n_mels, dim), ConvDownsample(dim, dim)])
        self.blocks = nn.ModuleList([TransformerBlock(dim, heads, ff_mult, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.pool = AttentionPool(dim)

    def forward(self, audio: torch.Tensor, audio_lengths: torch.Tensor) -> torch.Tensor:
        x, _ = self.features(audio, audio_lengths)
        frames = self.features.num_frames(audio_lengths)
        for layer in self.downsample:
            x, frames = layer(x, frames)
        valid = length_mask(frames, x.shape[1])
        allowed = key_mask(valid)
        for block in self.blocks:
            x = block(x, allowed)
        return self.pool(self.norm(x), valid)

"""Frozen Whisper tiny.en features of the acted-speech corpora, per channel variant, cached as one .npz.

A clip's feature is the concatenation of masked means over its encoder frames of the hidden states of
`layers` (model/whisper_encoder.py: index 0 is the conv stem, k is layer k). Clips go one at a time through the
exported ONNX graph (sliced positions; on 2 CPUs batch 1 is faster than padded batches). Variants: "clean", the
phone lines of training/channel.py ("mulaw", "alaw", "gsm") and `augmented` draws of `PhoneChain` per clip
("aug0", "aug1", ...), seeded by (seed, clip number, draw). Babble comes from RAVDESS training actors' clips,
never the clip's own speaker.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from model.audio import decode_audio
from model.data.speech import CORPORA, Clip, read_clips, split_by_speaker
from model.whisper_encoder import clip_frames, export_whisper_encoder, load_whisper_encoder, masked_mean
from training.channel import CHANNELS, PhoneChain

PHONE_VARIANTS = ("mulaw", "alaw", "gsm")
BABBLE_POOL = 60  # RAVDESS training-actor clips the babble talkers are drawn from
MAX_SECONDS = 30.0


@dataclass(frozen=True)
class SpeechFeatures:
    clips: tuple[Clip, ...]
    features: dict[str, np.ndarray]  # variant -> [clips, len(layers) * 384] float32
    layers: tuple[int, ...]
    parity: float  # largest |ONNX - PyTorch| of the pooled features on the first clips


def all_clips(data_dir: Path) -> list[Clip]:
    return [clip for corpus in CORPORA for clip in read_clips(data_dir, corpus)]


def pooled(session: ort.InferenceSession, audio: np.ndarray, layers: Sequence[int]) -> np.ndarray:
    _, hidden, _ = session.run(None, {"audio": audio[None], "audio_lengths": np.array([len(audio)])})
    frames = clip_frames(len(audio))
    return hidden[0, list(layers), :frames].mean(axis=1).reshape(-1)


def torch_pooled(encoder: torch.nn.Module, audio: np.ndarray, layers: Sequence[int]) -> np.ndarray:
    with torch.inference_mode():
        out = encoder(torch.from_numpy(audio[None]), torch.tensor([len(audio)]))
        return masked_mean(out.hidden_states, out.frame_mask)[0, list(layers)].reshape(-1).numpy()


def cache_key(clips: Sequence[Clip], layers: Sequence[int], augmented: int, seed: int) -> str:
    stamp = [f"{c.path}|{c.path.stat().st_size}" for c in clips]
    text = json.dumps([stamp, list(layers), augmented, seed, PHONE_VARIANTS, repr(PhoneChain())])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def babble_pool(clips: Sequence[Clip], seed: int) -> list[int]:
    """Indices of BABBLE_POOL clips of RAVDESS training actors."""
    train = set(split_by_speaker([c for c in clips if c.corpus == "ravdess"]).train)
    candidates = [i for i, c in enumerate(clips) if c in train]
    return sorted(np.random.default_rng([seed, 1]).choice(candidates, BABBLE_POOL, replace=False).tolist())


def load_features(
    data_dir: Path, cache_dir: Path, layers: Sequence[int], augmented: int, seed: int, threads: int = 2
) -> SpeechFeatures:
    """Every clip of the three corpora in every variant, from `cache_dir` when it was computed before."""
    clips = all_clips(data_dir)
    path = Path(cache_dir) / f"whisper_{cache_key(clips, layers, augmented, seed)}.npz"
    if path.is_file():
        with np.load(path) as stored:
            found = dict(stored)
        parity = float(found.pop("parity"))
        return SpeechFeatures(tuple(clips), found, tuple(layers), parity)
    features, parity = _compute(clips, layers, augmented, seed, threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path.with_suffix(".tmp.npz"), parity=parity, **features)
    path.with_suffix(".tmp.npz").replace(path)
    return SpeechFeatures(tuple(clips), features, tuple(layers), parity)


def _compute(
    clips: list[Clip], layers: Sequence[int], augmented: int, seed: int, threads: int
) -> tuple[dict[str, np.ndarray], float]:
    encoder = load_whisper_encoder()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    limit = int(MAX_SECONDS * 16_000)
    waves = [decode_audio(c.path)[:limit] for c in tqdm(clips, desc="decode", mininterval=10)]
    pool = babble_pool(clips, seed)
    chain = PhoneChain()
    variants = ["clean", *PHONE_VARIANTS, *(f"aug{k}" for k in range(augmented))]
    with tempfile.TemporaryDirectory() as tmp:
        graph = export_whisper_encoder(encoder, Path(tmp) / "whisper.onnx")
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        parity = max(
            float(np.abs(pooled(session, w, layers) - torch_pooled(encoder, w, layers)).max()) for w in waves[:8]
        )
        out = {v: np.zeros((len(clips), len(layers) * encoder.norm.normalized_shape[0]), np.float32) for v in variants}
        needed = _needed(clips, variants)
        for variant in variants:
            out[variant][~needed[variant]] = np.nan
        progress = tqdm(total=sum(int(m.sum()) for m in needed.values()), desc="encode", mininterval=10)
        for i, (clip, audio) in enumerate(zip(clips, waves, strict=True)):
            talkers = [waves[j] for j in pool if clips[j].speaker != clip.speaker or clips[j].corpus != clip.corpus]
            for variant in (v for v in variants if needed[v][i]):
                if variant.startswith("aug"):
                    rng = np.random.default_rng([seed, i, int(variant[3:])])
                    signal = chain(audio, rng, talkers)[0]
                else:
                    signal = CHANNELS[variant](audio)
                out[variant][i] = pooled(session, signal, layers)
                progress.update()
        progress.close()
    return out, parity


def _needed(clips: Sequence[Clip], variants: Sequence[str]) -> dict[str, np.ndarray]:
    """Which clips each variant is computed for: augmented draws for clips some evaluation trains on, phone lines
    for clips it scores (RAVDESS and EmoDB by their speaker split; every TESS clip is both, as TESS is also split
    in reverse and by word); clean for all. The others are NaN."""
    train = set(split_by_speaker(clips).train)
    tess = np.array([clip.corpus == "tess" for clip in clips])
    trains = tess | np.array([clip in train for clip in clips])
    scored = tess | ~trains
    return {
        v: trains if v.startswith("aug") else scored if v in PHONE_VARIANTS else np.ones(len(clips), bool)
        for v in variants
    }

"""ONNX Runtime inference over a verified model artifact: what the API micro-batcher and batch scoring call.

`classify` encodes every turn once (length-bucketed batches of at most `max_batch_size` utterances), then runs
the context head over the dialogues (bucketed by turn count); `classify_in_waves` gives the same answers dialogue by
dialogue as the encoder calls that hold their turns finish (the service answers a batch's short utterances first).
Padding never changes a result: both graphs mask padded tokens, samples and turns, so a dialogue scores the same
alone or beside others (fp32: to ~1e-6, float rounding of differently shaped matrix products). The int8 encoder
quantises activations per batch (dynamic quantisation), so its embeddings move slightly with the batch's contents
(probabilities by ~1e-2); use fp32 where batch independence must hold to 1e-5.

Near-tie re-scoring (int8 only): a turn whose two likeliest emotions are closer than `rescore_margin` is
re-encoded by the fp32 encoder and its dialogue scored again. int8 error moves probabilities by a few thousandths,
so it changes labels almost only where fp32 itself hesitates; those few turns get the fp32 answer and the rest
keep the int8 speed (docs/BENCHMARKS.md, "Near-tie re-scoring").
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from model.artifact import ModelArtifact, Precision, load_artifact
from model.labels import LabelSet
from model.preprocess import (
    LATE_FLAGS,
    EncoderBatch,
    PackedTextBatch,
    PreparedUtterance,
    PreprocessError,
    Preprocessor,
    collate,
    context_batch,
    in_original_order,
    length_buckets,
    pack,
)
from model.text_path import NoTextPath, text_path_graph

log = logging.getLogger(__name__)
Device = Literal["auto", "cpu", "cuda"]
CUDA_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "CPUExecutionProvider"
DEFAULT_MAX_BATCH_SIZE = 32
# The encoder's cost model for cutting a length-sorted batch into calls (model.preprocess.length_buckets), in the
# time of one text token of one row: a call's fixed part, and a sample of audio. Measured on 2 CPU cores through
# the text path and the Whisper branch (docs/BENCHMARKS.md "Encoder calls"): 1-2.5 ms a call, 0.21-0.25 ms a
# token, 12 ms a second of audio.
ENCODER_CALL_COST = 8.0
AUDIO_SAMPLE_COST = 50 / 16_000
# A call of the packed text path (encoder.packed.onnx) pays ENCODER_CALL_COST and, per row, this much per squared
# token for attention over padded rows; its tokens cost the same however a pool is cut, so only these two price a
# cut (measured on 2 cores, docs/BENCHMARKS.md "The packed text path").
PACKED_ATTENTION_COST = 0.002
TEXT_PATH_PROBE = ("Oh my God, you scared me!", "Fine.")
TEXT_PATH_TOLERANCE = 1e-5  # the text path's embedding against the full graph's on a probe (the same nodes: ~0)
# The packed text path adds in another order, so its rounding grows with the activations (6.2e-6 from the padded
# embeddings over 600 MELD test turns with the shipped weights): it is held to the exporter's parity bar, which a
# graph of other weights misses by orders of magnitude.
PACKED_TEXT_PATH_TOLERANCE = 1e-4


class DeviceUnavailable(RuntimeError):
    """The requested device cannot be used by this ONNX Runtime build or machine."""


@dataclass(frozen=True)
class UtteranceInput:
    """One turn: text, decoded 16 kHz mono float32 audio, or both; `speaker` identifies it within its dialogue."""

    text: str | None
    audio: np.ndarray | None
    speaker: str | None = None


@dataclass(frozen=True)
class TurnPrediction:
    emotion: str
    emotion_index: int  # position of `emotion` in the model's emotion labels (the argmax of `emotion_probs`)
    emotion_probs: np.ndarray  # float32 [C_emotion], softmax(logits / T)
    sentiment: str
    sentiment_probs: np.ndarray  # float32 [C_sentiment]
    embedding: np.ndarray  # float32 [D], the utterance encoder's output (what head retraining consumes)
    rescored: bool = False  # an int8 near tie re-encoded in fp32: `embedding` is then the fp32 one

    def logged_fields(self) -> dict[str, Any]:
        """The answer as every prediction log stores it (the predictions and shadow-predictions rows): label, its
        index and probability, the probabilities as floats, and the sentiment."""
        probabilities = [float(p) for p in self.emotion_probs]
        return {
            "label": self.emotion,
            "label_index": self.emotion_index,
            "confidence": probabilities[self.emotion_index],
            "probabilities": probabilities,
            "sentiment": self.sentiment,
        }

    def embedding_bytes(self) -> bytes:
        """The embedding as stored: float32, little-endian."""
        return np.asarray(self.embedding, dtype="<f4").tobytes()


EmbeddedDialogue = tuple[np.ndarray, Sequence[str | None]]  # embeddings [T, D] and the T speakers


def select_providers(device: Device) -> list[str]:
    """Execution providers for `device`: CUDA (with CPU fallback for unsupported nodes) or CPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")
    available = ort.get_available_providers()
    if device != "cpu" and CUDA_PROVIDER in available:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    if device == "cuda":
        raise DeviceUnavailable(
            f"device 'cuda' requested but this ONNX Runtime ({ort.__version__}) has no {CUDA_PROVIDER} "
            f"(available: {', '.join(available)}); install onnxruntime-gpu on a CUDA host, "
            "or use device 'auto' or 'cpu'"
        )
    return [CPU_PROVIDER]


def session_options(intra_op_threads: int = 0, *, spinning: bool = True) -> ort.SessionOptions:
    """`spinning` False makes idle pool threads sleep at once instead of spinning for the next parallel section:
    a pool shared with other busy threads (a second model thread, the event loop) then leaves them the cores."""
    if intra_op_threads < 0:
        raise ValueError(f"intra_op_threads must be >= 0 (0: ONNX Runtime decides), not {intra_op_threads}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def speech_session_options(audio_intra_op_threads: int | None, intra_op_threads: int) -> ort.SessionOptions:
    """Options of the graph that runs the speech branch: `audio_intra_op_threads` of them without spinning (the
    branch is long enough to split over cores and short enough to share them), or, when None, the text's."""
    if audio_intra_op_threads is None or audio_intra_op_threads == intra_op_threads:
        return session_options(intra_op_threads)
    return session_options(audio_intra_op_threads, spinning=False)


def open_session(
    source: Path | bytes, device: Device, options: ort.SessionOptions, name: str | None = None
) -> ort.InferenceSession:
    """A session on a graph file, or on a serialised graph (`name` then says what it is in messages)."""
    providers = select_providers(device)
    name = name or (source.name if isinstance(source, Path) else "graph")
    model = str(source) if isinstance(source, Path) else source
    session = ort.InferenceSession(model, sess_options=options, providers=providers)
    # ONNX Runtime falls back to CPU when the CUDA libraries cannot be loaded: fine for "auto", not for "cuda".
    if device == "cuda" and CUDA_PROVIDER not in session.get_providers():
        raise DeviceUnavailable(f"{name}: {CUDA_PROVIDER} failed to initialise (are CUDA and cuDNN installed?)")
    if CUDA_PROVIDER in providers and CUDA_PROVIDER not in session.get_providers():
        log.warning("%s: %s failed to initialise; running on CPU", name, CUDA_PROVIDER)
    return session


@dataclass(frozen=True)
class EncoderSessions:
    """One encoder graph's session; for late fusion, its text path's (model/text_path.py), which scores the calls
    in which no utterance has audio without running the speech branch; and, where the artifact has it, the
    packed text path (encoder.packed.onnx), which scores such calls on their tokens unpadded."""

    full: ort.InferenceSession
    text_only: ort.InferenceSession | None = None
    packed: ort.InferenceSession | None = None

    @classmethod
    def open(
        cls,
        artifact: ModelArtifact,
        path: Path,
        device: Device,
        options: ort.SessionOptions,
        speech_options: ort.SessionOptions | None = None,
        packed: Path | None = None,
    ) -> EncoderSessions:
        """`speech_options`, where given, open the whole graph when a text path serves the calls without audio;
        a graph that serves every call opens with `options`. `packed`: the packed text path of this graph."""
        packed_session = None if packed is None else open_session(packed, device, options)
        if not artifact.late_fusion:
            return cls(open_session(path, device, options), packed=packed_session)
        try:
            graph = text_path_graph(path, len(artifact.emotions))
        except NoTextPath as error:
            log.warning("%s: %s; every call runs the whole graph", path.name, error)
            return cls(open_session(path, device, options), packed=packed_session)
        full = open_session(path, device, speech_options or options)
        return cls(full, open_session(graph, device, options, name=f"{path.name} (text path)"), packed_session)

    def embed(self, batch: EncoderBatch) -> np.ndarray:
        session = self.full if self.text_only is None or batch.has_audio.any() else self.text_only
        return session.run(["embedding"], batch.feeds())[0]

    def embed_packed(self, batch: PackedTextBatch) -> np.ndarray:
        if self.packed is None:
            raise RuntimeError("this encoder has no packed text path")
        return self.packed.run(["embedding"], batch.feeds())[0]

    def checked(self, probe: Sequence[PreparedUtterance]) -> EncoderSessions:
        """These sessions less any text path that does not give the whole graph's embedding of `probe` (turns
        without audio)."""
        padded = collate(probe)
        full = self.full.run(["embedding"], padded.feeds())[0]
        kept = self
        if self.text_only is not None and not _agrees(self.text_only, padded, full, "text path", TEXT_PATH_TOLERANCE):
            kept = replace(kept, text_only=None)
        packed = self.packed
        if packed is not None and not _agrees(
            packed, pack(probe), full, "packed text path", PACKED_TEXT_PATH_TOLERANCE
        ):
            kept = replace(kept, packed=None)
        return kept


def _agrees(
    session: ort.InferenceSession,
    batch: EncoderBatch | PackedTextBatch,
    full: np.ndarray,
    name: str,
    tolerance: float,
) -> bool:
    worst = float(np.abs(session.run(["embedding"], batch.feeds())[0] - full).max())
    if worst > tolerance:
        log.warning("the encoder's %s is %.2e from the whole graph, which serves its calls instead", name, worst)
    return worst <= tolerance


def softmax(logits: np.ndarray, temperature: float | np.ndarray = 1.0) -> np.ndarray:
    """softmax(logits / temperature) over the last axis (a temperature array broadcasts against the logits),
    computed in float64, returned as float32."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    weights = np.exp(scaled)
    return (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)


def top_two_margin(probabilities: np.ndarray) -> np.ndarray:
    """Gap between the two largest probabilities along the last axis (a near tie is a small gap)."""
    top_two = np.partition(np.asarray(probabilities), -2, axis=-1)[..., -2:]
    return top_two[..., 1] - top_two[..., 0]


def _pasts(
    dialogues: Sequence[Sequence[UtteranceInput]], history: Sequence[EmbeddedDialogue | None] | None
) -> list[EmbeddedDialogue | None]:
    pasts = list(history) if history is not None else [None] * len(dialogues)
    if len(pasts) != len(dialogues):
        raise PreprocessError(f"{len(dialogues)} dialogues but {len(pasts)} histories")
    return pasts


def _sessions(encoder: ort.InferenceSession | EncoderSessions) -> EncoderSessions:
    return encoder if isinstance(encoder, EncoderSessions) else EncoderSessions(encoder)


def _check_margin(rescore_margin: float) -> None:
    if not 0 <= rescore_margin < 1:
        raise ValueError(f"rescore_margin must be in [0, 1), not {rescore_margin}")


class InferenceRuntime:
    """The two ONNX Runtime sessions of one artifact, with its pre-processing and calibration."""

    def __init__(
        self,
        artifact: ModelArtifact,
        encoder: ort.InferenceSession | EncoderSessions,
        context: ort.InferenceSession,
        *,
        precision: Precision = "fp32",
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        fp32_encoder: ort.InferenceSession | EncoderSessions | None = None,
        rescore_margin: float = 0.0,
        call_cost: float = ENCODER_CALL_COST,
    ) -> None:
        """`fp32_encoder` and `rescore_margin` (> 0) turn on near-tie re-scoring of an int8 `encoder`. `call_cost`
        is what an encoder call costs beside its rows (model.preprocess.length_buckets); 0 scores length-sorted
        calls of `max_batch_size` whatever the padding."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
        if call_cost < 0:
            raise ValueError(f"call_cost must be >= 0, not {call_cost}")
        _check_margin(rescore_margin)
        if rescore_margin > 0 and (precision != "int8" or fp32_encoder is None):
            raise ValueError("near-tie re-scoring needs an int8 encoder and the fp32 encoder beside it")
        self.artifact = artifact
        self.version: str = artifact.version
        self.emotions: LabelSet = artifact.emotions
        self.sentiments: LabelSet = artifact.sentiments
        self._encoder = _sessions(encoder)
        self.providers: Sequence[str] = tuple(self._encoder.full.get_providers())
        self.precision: Precision = precision
        self.max_batch_size = max_batch_size
        self.call_cost = call_cost
        self.preprocessor = Preprocessor.from_file(artifact.tokenizer_path, artifact.preprocessing)
        self._context = context
        self._fp32_encoder = _sessions(fp32_encoder) if fp32_encoder is not None else None
        self.rescore_margin = rescore_margin
        probe = self.preprocessor.prepare(list(TEXT_PATH_PROBE), [None] * len(TEXT_PATH_PROBE))
        self._encoder = self._encoder.checked(probe)
        self._fp32_encoder = self._fp32_encoder.checked(probe) if self._fp32_encoder is not None else None

    @classmethod
    def load(
        cls,
        artifact_dir: Path | str | ModelArtifact,
        device: Device = "auto",
        intra_op_threads: int = 0,
        precision: Precision = "fp32",
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        rescore_margin: float = 0.0,
        audio_intra_op_threads: int | None = None,
        packed_text_path: bool = True,
    ) -> InferenceRuntime:
        """Open an artifact (a directory, verified here, or an already verified ModelArtifact). With int8,
        `rescore_margin` > 0 also opens the fp32 encoder for near-tie re-scoring; fp32 ignores it.
        `audio_intra_op_threads` (None: `intra_op_threads`) run the calls that carry audio where a text path
        serves the others (`speech_session_options`). `packed_text_path`: fp32 calls without audio run on the
        artifact's encoder.packed.onnx where it has one."""
        _check_margin(rescore_margin)
        artifact = artifact_dir if isinstance(artifact_dir, ModelArtifact) else load_artifact(artifact_dir)
        encoder_path = artifact.encoder_file(precision)
        options = session_options(intra_op_threads)
        speech = speech_session_options(audio_intra_op_threads, intra_op_threads)
        rescoring = precision == "int8" and rescore_margin > 0
        packed = artifact.packed_text_path if packed_text_path else None  # of the fp32 graph: int8 runs padded
        main_packed = packed if precision == "fp32" else None
        return cls(
            artifact,
            EncoderSessions.open(artifact, encoder_path, device, options, speech, main_packed),
            open_session(artifact.context_path, device, options),
            precision=precision,
            max_batch_size=max_batch_size,
            fp32_encoder=(
                EncoderSessions.open(artifact, artifact.encoder_path, device, options, speech, packed)
                if rescoring
                else None
            ),
            rescore_margin=rescore_margin if rescoring else 0.0,
        )

    @property
    def hears_audio(self) -> bool:
        """False when audio never trained the model (model/preprocess.py): audio alone is refused."""
        return self.artifact.preprocessing.hears_audio

    @property
    def embed_dim(self) -> int:
        return self.artifact.embed_dim

    def encode(self, utterances: Sequence[UtteranceInput]) -> np.ndarray:
        """Utterance embeddings [N, D] in input order (this runtime's encoder, never re-scored)."""
        return self._encode_prepared(self._prepare(utterances), self._encoder)

    def _prepare(self, utterances: Sequence[UtteranceInput]) -> list[PreparedUtterance]:
        return self.preprocessor.prepare([u.text for u in utterances], [u.audio for u in utterances])

    def _encode_prepared(self, prepared: Sequence[PreparedUtterance], encoder: EncoderSessions) -> np.ndarray:
        embeddings = np.zeros((len(prepared), self.embed_dim), dtype=np.float32)
        for indices, vectors in self._encoder_calls(prepared, encoder):
            embeddings[indices] = vectors
        return embeddings

    def _encoder_calls(
        self, prepared: Sequence[PreparedUtterance], encoder: EncoderSessions
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Each encoder call as it runs: (indices into `prepared`, their embeddings), shortest turns first."""
        if encoder.packed is not None and not any(p.has_audio for p in prepared):
            # A packed call pays for its rows' padding only in attention: a row's cost grows with its length squared.
            squares = [len(p.token_ids) ** 2 for p in prepared]
            for bucket in length_buckets(squares, self.max_batch_size, self.call_cost, (PACKED_ATTENTION_COST,)):
                yield bucket, encoder.embed_packed(pack([prepared[i] for i in bucket]))
            return
        keys = [p.bucket_key for p in prepared]  # (audio samples, tokens)
        for bucket in length_buckets(keys, self.max_batch_size, self.call_cost, (AUDIO_SAMPLE_COST, 1.0)):
            yield bucket, encoder.embed(collate([prepared[i] for i in bucket]))

    def encode_batch(self, batch: EncoderBatch) -> np.ndarray:
        """One call of this runtime's encoder on an already padded batch (benchmarks, callers that collate)."""
        return self._encoder.embed(batch)

    def classify_embeddings(self, dialogues: Sequence[EmbeddedDialogue], causal: bool) -> list[list[TurnPrediction]]:
        """Context head over dialogues of utterance embeddings; an empty dialogue gives an empty list."""
        checked = [self._checked_dialogue(embeddings, speakers) for embeddings, speakers in dialogues]
        live = [i for i, (embeddings, _) in enumerate(checked) if len(embeddings)]
        buckets = length_buckets([len(checked[i][0]) for i in live], self.max_batch_size)
        scored = in_original_order(
            buckets, (self._run_context([checked[live[j]] for j in bucket], causal) for bucket in buckets)
        )
        results: list[list[TurnPrediction]] = [[] for _ in checked]
        for i, turns in zip(live, scored, strict=True):
            results[i] = turns
        return results

    def classify(
        self,
        dialogues: Sequence[Sequence[UtteranceInput]],
        causal: bool,
        history: Sequence[EmbeddedDialogue | None] | None = None,
    ) -> list[list[TurnPrediction]]:
        """Predictions per turn of each dialogue (a single utterance is a dialogue of one turn).

        `history[i]`, when given, holds the turns before dialogue i, encoded earlier (a live stream keeps them): the
        context head reads them ahead of the dialogue's own turns, but only the dialogue's turns are encoded and
        answered. In causal mode that is exactly the answer for those turns of the whole dialogue."""
        pasts = _pasts(dialogues, history)
        prepared = self._prepare([turn for dialogue in dialogues for turn in dialogue])
        embeddings = self._encode_prepared(prepared, self._encoder)
        return self._score(prepared, embeddings, dialogues, causal, pasts)

    def classify_in_waves(
        self,
        dialogues: Sequence[Sequence[UtteranceInput]],
        causal: bool,
        history: Sequence[EmbeddedDialogue | None] | None = None,
    ) -> Iterator[tuple[list[int], list[list[TurnPrediction]]]]:
        """`classify`, answered as the encoder calls finish: after each call, the dialogues whose turns are all
        encoded by then, as (their indices, their predictions). The calls run shortest turns first, so a server can
        answer the short utterances of a batch while the long ones still encode. Every dialogue comes exactly once,
        with `classify`'s predictions; the context head runs once per wave instead of once in all."""
        pasts = _pasts(dialogues, history)
        prepared = self._prepare([turn for dialogue in dialogues for turn in dialogue])
        owners = np.repeat(np.arange(len(dialogues)), [len(dialogue) for dialogue in dialogues])
        unencoded = np.bincount(owners, minlength=len(dialogues))
        embeddings = np.zeros((len(prepared), self.embed_dim), dtype=np.float32)
        ready = np.flatnonzero(unencoded == 0).tolist()  # dialogues without turns come with the first wave
        for indices, vectors in self._encoder_calls(prepared, self._encoder):
            embeddings[indices] = vectors
            np.subtract.at(unencoded, owners[indices], 1)
            ready += sorted(d for d in set(owners[indices].tolist()) if not unencoded[d])
            if ready:
                yield ready, self._score(prepared, embeddings, dialogues, causal, pasts, only=ready)
                ready = []
        if ready:
            yield ready, self._score(prepared, embeddings, dialogues, causal, pasts, only=ready)

    def _score(
        self,
        prepared: Sequence[PreparedUtterance],
        embeddings: np.ndarray,
        dialogues: Sequence[Sequence[UtteranceInput]],
        causal: bool,
        pasts: Sequence[EmbeddedDialogue | None],
        only: list[int] | None = None,
    ) -> list[list[TurnPrediction]]:
        """The context head over encoded turns, with int8 near ties re-scored in fp32; with `only`, over those
        dialogues alone (their turns cut out of the flat `prepared` and `embeddings`)."""
        if only is not None:
            starts = np.concatenate([[0], np.cumsum([len(dialogue) for dialogue in dialogues])])
            turns = np.concatenate([np.arange(starts[d], starts[d + 1]) for d in only])
            prepared, embeddings = [prepared[i] for i in turns], embeddings[turns]
            dialogues, pasts = [dialogues[d] for d in only], [pasts[d] for d in only]
        scored = self._classify_flat(embeddings, dialogues, causal, pasts)
        if self._fp32_encoder is None:
            return scored
        return self._rescore_near_ties(prepared, embeddings, dialogues, scored, causal, pasts)

    def _classify_flat(
        self,
        embeddings: np.ndarray,
        dialogues: Sequence[Sequence[UtteranceInput]],
        causal: bool,
        history: Sequence[EmbeddedDialogue | None],
    ) -> list[list[TurnPrediction]]:
        """The context head over `embeddings`, the turns of `dialogues` one after the other, each dialogue read after
        its history; the predictions of the dialogues' own turns."""
        bounds = np.cumsum([len(dialogue) for dialogue in dialogues])[:-1]
        per_dialogue = np.split(embeddings, bounds) if len(dialogues) else []
        joined = [
            self._after(past, vectors, [turn.speaker for turn in dialogue])
            for past, vectors, dialogue in zip(history, per_dialogue, dialogues, strict=True)
        ]
        scored = self.classify_embeddings(joined, causal)
        return [turns[len(past[1]) if past is not None else 0 :] for turns, past in zip(scored, history, strict=True)]

    def _after(
        self, past: EmbeddedDialogue | None, vectors: np.ndarray, speakers: list[str | None]
    ) -> EmbeddedDialogue:
        """A dialogue's turns behind the turns encoded before them."""
        if past is None:
            return vectors, speakers
        kept = np.asarray(past[0], dtype=np.float32)
        if kept.ndim != 2 or kept.shape[1] != self.embed_dim:
            raise PreprocessError(f"history embeddings must have shape [P, {self.embed_dim}], got {kept.shape}")
        return np.concatenate([kept, vectors]), [*past[1], *speakers]

    def _rescore_near_ties(
        self,
        prepared: Sequence[PreparedUtterance],
        embeddings: np.ndarray,
        dialogues: Sequence[Sequence[UtteranceInput]],
        scored: list[list[TurnPrediction]],
        causal: bool,
        history: Sequence[EmbeddedDialogue | None],
    ) -> list[list[TurnPrediction]]:
        """Re-encode in fp32 the turns whose int8 answer is a near tie, and score their dialogues again."""
        probabilities = [turn.emotion_probs for turns in scored for turn in turns]
        near = np.flatnonzero(top_two_margin(np.asarray(probabilities)) < self.rescore_margin) if probabilities else []
        if not len(near):
            return scored
        mixed = embeddings.copy()
        mixed[near] = self._encode_prepared([prepared[i] for i in near], self._fp32_encoder)
        starts = np.concatenate([[0], np.cumsum([len(dialogue) for dialogue in dialogues])])
        owners = sorted({int(np.searchsorted(starts, i, side="right")) - 1 for i in near})
        again = self._classify_flat(
            np.concatenate([mixed[starts[d] : starts[d + 1]] for d in owners]),
            [dialogues[d] for d in owners],
            causal,
            [history[d] for d in owners],
        )
        reencoded = set(near.tolist())
        for d, turns in zip(owners, again, strict=True):
            scored[d] = [
                dataclasses.replace(turn, rescored=True) if starts[d] + t in reencoded else turn
                for t, turn in enumerate(turns)
            ]
        return scored

    def _checked_dialogue(
        self, embeddings: np.ndarray, speakers: Sequence[str | None]
    ) -> tuple[np.ndarray, np.ndarray]:
        vectors = np.asarray(embeddings, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.embed_dim:
            raise PreprocessError(f"dialogue embeddings must have shape [T, {self.embed_dim}], got {vectors.shape}")
        if len(speakers) != len(vectors):
            raise PreprocessError(f"{len(vectors)} turn embeddings but {len(speakers)} speakers")
        if not np.isfinite(vectors).all():
            raise PreprocessError("dialogue embeddings contain non-finite values")
        return vectors, self.preprocessor.speaker_indices(speakers)

    def _run_context(self, dialogues: list[tuple[np.ndarray, np.ndarray]], causal: bool) -> list[list[TurnPrediction]]:
        emotion_logits, sentiment_logits = self._context.run(
            ["emotion_logits", "sentiment_logits"], context_batch(dialogues, causal).feeds()
        )
        calibration, tempered = self.artifact.calibration, self._tempered_turns(dialogues, emotion_logits.shape[1])
        emotion = softmax(emotion_logits, np.where(tempered, calibration.temperature, 1.0))
        sentiment = softmax(sentiment_logits, np.where(tempered, calibration.sentiment_temperature, 1.0))
        return [
            [self._prediction(emotion[row, t], sentiment[row, t], vectors[t]) for t in range(len(vectors))]
            for row, (vectors, _) in enumerate(dialogues)
        ]

    def _tempered_turns(self, dialogues: list[tuple[np.ndarray, np.ndarray]], width: int) -> np.ndarray:
        """[B, T, 1]: the turns the serving temperatures apply to. They were fitted on text; late fusion serves an
        audio-only turn as its audio evidence, already calibrated in the graph (T_a), so it is not tempered again."""
        tempered = np.ones((len(dialogues), width, 1), dtype=bool)
        if self.artifact.late_fusion:
            for row, (vectors, _) in enumerate(dialogues):
                has_text, has_audio = (vectors[:, -LATE_FLAGS:] > 0.5).T
                tempered[row, : len(vectors), 0] = has_text | ~has_audio
        return tempered

    def _prediction(self, emotion: np.ndarray, sentiment: np.ndarray, embedding: np.ndarray) -> TurnPrediction:
        # Copies: views would keep the whole batch's arrays alive as long as any one prediction is.
        emotion_index = int(emotion.argmax())
        return TurnPrediction(
            emotion=self.emotions.name(emotion_index),
            emotion_index=emotion_index,
            emotion_probs=emotion.copy(),
            sentiment=self.sentiments.name(int(sentiment.argmax())),
            sentiment_probs=sentiment.copy(),
            embedding=embedding.copy(),
        )

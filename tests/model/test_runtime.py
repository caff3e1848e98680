"""ONNX Runtime inference on the tiny artifact with real MELD text and real speech: probabilities, modality
placeholders, batch-composition invariance, bucketing, causality, int8, device selection, pre-processing."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from model.artifact import ArtifactError, Calibration, derive_artifact, load_artifact
from model.audio import decode_audio
from model.data.meld import group_dialogues, read_utterances
from model.data.speech import read_clips
from model.labels import EMOTIONS, SENTIMENTS
from model.preprocess import (
    PreprocessError,
    Preprocessor,
    collate,
    in_original_order,
    length_buckets,
    speaker_indices,
)
from model.runtime import CUDA_PROVIDER, DeviceUnavailable, InferenceRuntime, TurnPrediction, UtteranceInput

INVARIANCE_TOLERANCE = 1e-5
INT8_TOLERANCE = 0.02  # probability gap; int8 is an approximation by design
Dialogue = list[UtteranceInput]


@pytest.fixture(scope="module")
def runtime(tiny_artifact: Path) -> InferenceRuntime:
    return InferenceRuntime.load(tiny_artifact, device="cpu", intra_op_threads=1)


@pytest.fixture(scope="module")
def speech(data_dir: Path) -> list[np.ndarray]:
    """Real clips of different lengths: RAVDESS (OGG) and EmoDB (FLAC)."""
    clips = read_clips(data_dir, "ravdess")[::240] + read_clips(data_dir, "emodb")[::180]
    return [decode_audio(clip.path) for clip in clips]


@pytest.fixture(scope="module")
def dialogues(data_dir: Path, speech: list[np.ndarray]) -> list[Dialogue]:
    """Eight MELD dev dialogues of different lengths; turns cycle through text only, text + audio, audio only."""
    meld = group_dialogues(read_utterances(data_dir, "dev"))
    chosen = sorted(meld, key=lambda d: len(d.utterances))[:: len(meld) // 8][:8]
    clips = itertools.cycle(speech)
    result = []
    for dialogue in chosen:
        turns = []
        for index, utterance in enumerate(dialogue.utterances):
            text = utterance.text if index % 3 != 2 else None
            audio = next(clips) if index % 3 != 0 else None
            turns.append(UtteranceInput(text=text, audio=audio, speaker=utterance.speaker))
        result.append(turns)
    return result


def probabilities(scored: list[list[TurnPrediction]]) -> np.ndarray:
    return np.array([np.concatenate([t.emotion_probs, t.sentiment_probs]) for d in scored for t in d])


def test_loads_the_artifact_and_gives_distributions_over_its_labels(
    runtime: InferenceRuntime, dialogues: list[Dialogue]
) -> None:
    assert runtime.version == "tiny-0.1" and runtime.providers == ("CPUExecutionProvider",)
    assert runtime.emotions.names == EMOTIONS and runtime.sentiments.names == SENTIMENTS
    scored = runtime.classify(dialogues, causal=False)
    assert [len(turns) for turns in scored] == [len(d) for d in dialogues]
    for turn in itertools.chain.from_iterable(scored):
        assert turn.emotion_probs.shape == (len(EMOTIONS),) and turn.sentiment_probs.shape == (len(SENTIMENTS),)
        assert turn.emotion_probs.sum() == pytest.approx(1, abs=1e-6)
        assert turn.sentiment_probs.sum() == pytest.approx(1, abs=1e-6)
        assert (turn.emotion_probs >= 0).all() and np.isfinite(turn.embedding).all()
        assert turn.emotion == EMOTIONS[int(turn.emotion_probs.argmax())]
        assert turn.sentiment == SENTIMENTS[int(turn.sentiment_probs.argmax())]
        assert turn.embedding.shape == (runtime.embed_dim,)


@pytest.mark.parametrize("causal", [False, True])
def test_results_do_not_depend_on_batch_composition(
    tiny_artifact: Path, runtime: InferenceRuntime, dialogues: list[Dialogue], causal: bool
) -> None:
    together = probabilities(runtime.classify(dialogues, causal))
    alone = probabilities([runtime.classify([d], causal)[0] for d in dialogues])
    small_batches = InferenceRuntime.load(tiny_artifact, device="cpu", max_batch_size=3)
    reordered = probabilities(small_batches.classify(dialogues[::-1], causal)[::-1])
    np.testing.assert_allclose(together, alone, atol=INVARIANCE_TOLERANCE, rtol=0)
    np.testing.assert_allclose(together, reordered, atol=INVARIANCE_TOLERANCE, rtol=0)


def test_encode_restores_the_input_order(runtime: InferenceRuntime, dialogues: list[Dialogue]) -> None:
    turns = list(itertools.chain.from_iterable(dialogues))
    permutation = np.random.default_rng(0).permutation(len(turns))
    embeddings = runtime.encode(turns)
    shuffled = runtime.encode([turns[i] for i in permutation])
    singly = np.concatenate([runtime.encode([turn]) for turn in turns[:6]])
    np.testing.assert_allclose(shuffled, embeddings[permutation], atol=INVARIANCE_TOLERANCE, rtol=0)
    np.testing.assert_allclose(singly, embeddings[:6], atol=INVARIANCE_TOLERANCE, rtol=0)


def test_text_only_audio_only_and_both(runtime: InferenceRuntime, data_dir: Path, speech: list[np.ndarray]) -> None:
    text = read_utterances(data_dir, "dev")[0].text
    clip = speech[0]
    rows = [
        UtteranceInput(text, None),
        UtteranceInput(text, np.zeros(0, np.float32)),  # empty audio = no audio
        UtteranceInput(None, clip),
        UtteranceInput("   ", clip),  # blank text = no text
        UtteranceInput(text, clip),
    ]
    text_only, text_empty_audio, audio_only, audio_blank_text, both = runtime.encode(rows)
    np.testing.assert_allclose(text_only, text_empty_audio, atol=INVARIANCE_TOLERANCE)
    np.testing.assert_allclose(audio_only, audio_blank_text, atol=INVARIANCE_TOLERANCE)
    for a, b in itertools.combinations([text_only, audio_only, both], 2):
        assert np.abs(a - b).max() > 1e-3
    batch = collate(runtime.preprocessor.prepare([text, None, text], [None, clip, clip]))
    assert batch.has_text.tolist() == [True, False, True] and batch.has_audio.tolist() == [False, True, True]
    assert batch.audio_lengths.tolist() == [1, len(clip), len(clip)]
    assert batch.input_ids[1, :2].tolist() == [101, 102] and batch.attention_mask[1].sum() == 2


def test_causal_and_bidirectional_differ_only_with_context(
    runtime: InferenceRuntime, dialogues: list[Dialogue]
) -> None:
    dialogue = max(dialogues, key=len)
    bidirectional = probabilities(runtime.classify([dialogue], causal=False))
    causal = probabilities(runtime.classify([dialogue], causal=True))
    assert np.abs(bidirectional[0] - causal[0]).max() > 1e-4  # the first turn sees the future only when bidirectional
    np.testing.assert_allclose(bidirectional[-1], causal[-1], atol=INVARIANCE_TOLERANCE)  # the last sees all either way
    single = [dialogue[:1]]
    np.testing.assert_allclose(
        probabilities(runtime.classify(single, causal=False)),
        probabilities(runtime.classify(single, causal=True)),
        atol=INVARIANCE_TOLERANCE,
    )


def test_classify_is_encode_then_classify_embeddings(runtime: InferenceRuntime, dialogues: list[Dialogue]) -> None:
    pairs = [(runtime.encode(d), [t.speaker for t in d]) for d in dialogues[:3]]
    direct = probabilities(runtime.classify(dialogues[:3], causal=True))
    np.testing.assert_allclose(probabilities(runtime.classify_embeddings(pairs, causal=True)), direct, atol=1e-6)
    assert runtime.classify([], causal=False) == []
    assert runtime.classify([[], dialogues[0][:1]], causal=False)[0] == []
    assert runtime.encode([]).shape == (0, runtime.embed_dim)
    with pytest.raises(PreprocessError, match="speakers"):
        runtime.classify_embeddings([(runtime.encode(dialogues[-1]), ["a"])], causal=False)
    with pytest.raises(PreprocessError, match="shape"):
        runtime.classify_embeddings([(np.zeros((2, 3), np.float32), ["a", "b"])], causal=False)


def _by_wave(waves: list[tuple[list[int], list[list[TurnPrediction]]]], count: int) -> list[list[TurnPrediction]]:
    answered = [i for indices, _ in waves for i in indices]
    assert sorted(answered) == list(range(count))  # every dialogue exactly once
    placed = {i: turns for indices, scored in waves for i, turns in zip(indices, scored, strict=True)}
    return [placed[i] for i in range(count)]


@pytest.mark.parametrize("causal", [False, True])
def test_waves_answer_every_dialogue_once_with_the_predictions_of_classify(
    tiny_artifact: Path, dialogues: list[Dialogue], causal: bool
) -> None:
    several_calls = InferenceRuntime.load(tiny_artifact, device="cpu", max_batch_size=3)
    asked = [*dialogues, [], *[[turn] for turn in dialogues[-1]]]  # whole dialogues, an empty one, single turns
    waves = list(several_calls.classify_in_waves(asked, causal))
    assert len(waves) > 1
    scored = _by_wave(waves, len(asked))
    assert scored[len(dialogues)] == []
    expected = several_calls.classify(asked, causal)
    np.testing.assert_allclose(probabilities(scored), probabilities(expected), atol=INVARIANCE_TOLERANCE, rtol=0)


def test_the_first_waves_answer_the_shortest_utterances(tiny_artifact: Path) -> None:
    pairs = InferenceRuntime.load(tiny_artifact, device="cpu", max_batch_size=2)  # calls of at most two
    long = "I told you already, I am not going to the party with him, not tonight and not ever again."
    texts = [long, "Yes.", long + " Never.", "No!"]
    waves = list(pairs.classify_in_waves([[UtteranceInput(text, None)] for text in texts], causal=False))
    assert [sorted(indices) for indices, _ in waves] == [[1, 3], [0, 2]]


def test_waves_re_score_near_ties_as_classify_does(tiny_artifact: Path, dialogues: list[Dialogue]) -> None:
    everything = InferenceRuntime.load(
        tiny_artifact, device="cpu", precision="int8", rescore_margin=0.999999, max_batch_size=3
    )
    scored = _by_wave(list(everything.classify_in_waves(dialogues, causal=False)), len(dialogues))
    assert all(turn.rescored for turn in _flat(scored))
    expected = everything.classify(dialogues, causal=False)
    np.testing.assert_allclose(probabilities(scored), probabilities(expected), atol=INVARIANCE_TOLERANCE, rtol=0)


def test_calibration_temperature_scales_the_logits(
    tiny_artifact: Path, runtime: InferenceRuntime, dialogues: list[Dialogue], tmp_path: Path
) -> None:
    hot = derive_artifact(
        load_artifact(tiny_artifact), tmp_path / "hot", version="tiny-hot", calibration=Calibration(2.0, 0.5)
    )
    base = runtime.classify(dialogues[:2], causal=False)
    scaled = InferenceRuntime.load(hot.path, device="cpu").classify(dialogues[:2], causal=False)
    for plain, calibrated in zip(itertools.chain(*base), itertools.chain(*scaled), strict=True):
        # log p = logits + constant, so softmax(log p / T) = softmax(logits / T)
        for probs, expected_of, t in (
            (calibrated.emotion_probs, plain.emotion_probs, 2.0),
            (calibrated.sentiment_probs, plain.sentiment_probs, 0.5),
        ):
            expected = np.exp(np.log(expected_of.astype(np.float64)) / t)
            np.testing.assert_allclose(probs, expected / expected.sum(), atol=1e-5)


def int8_gaps(fp32: InferenceRuntime, int8: InferenceRuntime, dialogues: list[Dialogue]) -> tuple[float, float]:
    """Largest probability gap int8 vs fp32, and int8 scored alone vs together (dynamic quantisation scales
    activations per batch, so int8 is only approximately batch-independent)."""
    together = probabilities(int8.classify(dialogues, causal=False))
    alone = probabilities([int8.classify([d], causal=False)[0] for d in dialogues])
    reference = probabilities(fp32.classify(dialogues, causal=False))
    return float(np.abs(together - reference).max()), float(np.abs(together - alone).max())


@pytest.fixture(scope="module")
def int8(tiny_artifact: Path) -> InferenceRuntime:
    return InferenceRuntime.load(tiny_artifact, device="cpu", precision="int8")


def test_int8_precision_loads_and_stays_close_on_text(
    runtime: InferenceRuntime, int8: InferenceRuntime, dialogues: list[Dialogue]
) -> None:
    assert int8.precision == "int8" and int8.version == runtime.version
    text_only = [[UtteranceInput(t.text, None, t.speaker) for t in d if t.text] for d in dialogues]
    scored = probabilities(int8.classify(text_only, causal=False))
    np.testing.assert_allclose(scored.sum(axis=1), 2.0, atol=1e-5)
    to_fp32, batch_dependence = int8_gaps(runtime, int8, text_only)
    assert to_fp32 < INT8_TOLERANCE and batch_dependence < INT8_TOLERANCE


def test_int8_stays_close_with_audio(
    runtime: InferenceRuntime, int8: InferenceRuntime, dialogues: list[Dialogue]
) -> None:
    to_fp32, batch_dependence = int8_gaps(runtime, int8, dialogues)
    assert to_fp32 < INT8_TOLERANCE and batch_dependence < INT8_TOLERANCE


def _flat(scored: list[list[TurnPrediction]]) -> list[TurnPrediction]:
    return [turn for dialogue in scored for turn in dialogue]


def test_rescoring_every_turn_gives_the_fp32_answers(
    tiny_artifact: Path, runtime: InferenceRuntime, dialogues: list[Dialogue]
) -> None:
    """A margin no answer reaches re-encodes every turn in fp32: embeddings and probabilities are fp32's."""
    everything = InferenceRuntime.load(tiny_artifact, device="cpu", precision="int8", rescore_margin=0.999999)
    scored, reference = everything.classify(dialogues, causal=False), runtime.classify(dialogues, causal=False)
    assert all(turn.rescored for turn in _flat(scored))
    np.testing.assert_allclose(probabilities(scored), probabilities(reference), atol=INVARIANCE_TOLERANCE)
    embeddings = [np.stack([t.embedding for t in _flat(s)]) for s in (scored, reference)]
    np.testing.assert_allclose(*embeddings, atol=INVARIANCE_TOLERANCE)


def test_rescoring_touches_only_near_ties_and_their_dialogues(
    tiny_artifact: Path, runtime: InferenceRuntime, int8: InferenceRuntime, dialogues: list[Dialogue]
) -> None:
    plain = int8.classify(dialogues, causal=False)
    margins = np.array([np.diff(np.sort(t.emotion_probs)[-2:])[0] for t in _flat(plain)])
    margin = float(np.median(margins))  # about half the turns are near ties at this margin
    rescoring = InferenceRuntime.load(tiny_artifact, device="cpu", precision="int8", rescore_margin=margin)
    assert rescoring.encode(dialogues[0]).tolist() == int8.encode(dialogues[0]).tolist()  # encode stays int8
    scored = rescoring.classify(dialogues, causal=False)
    assert [t.rescored for t in _flat(scored)] == (margins < margin).tolist()
    fp32_embeddings = runtime.encode([turn for dialogue in dialogues for turn in dialogue])
    for turn, before, fp32_embedding in zip(_flat(scored), _flat(plain), fp32_embeddings, strict=True):
        expected = fp32_embedding if turn.rescored else before.embedding
        np.testing.assert_allclose(turn.embedding, expected, atol=INVARIANCE_TOLERANCE)
    for before, after in zip(plain, scored, strict=True):
        if not any(turn.rescored for turn in after):  # a dialogue without near ties keeps its int8 answers
            np.testing.assert_array_equal(probabilities([before]), probabilities([after]))


def test_rescoring_off_and_its_bounds(tiny_artifact: Path, int8: InferenceRuntime, dialogues: list[Dialogue]) -> None:
    off = InferenceRuntime.load(tiny_artifact, device="cpu", precision="int8", rescore_margin=0.0)
    assert not any(turn.rescored for turn in _flat(off.classify(dialogues, causal=False)))
    fp32 = InferenceRuntime.load(tiny_artifact, device="cpu", rescore_margin=0.5)  # fp32 has nothing to re-score
    assert fp32.rescore_margin == 0.0 and fp32.classify([[]], causal=False) == [[]]
    for margin in (-0.1, 1.0):
        with pytest.raises(ValueError, match="rescore_margin"):
            InferenceRuntime.load(tiny_artifact, device="cpu", precision="int8", rescore_margin=margin)


def test_int8_needs_the_int8_graph(tiny_artifact: Path, tmp_path: Path) -> None:
    fp32_only = derive_artifact(
        load_artifact(tiny_artifact), tmp_path / "fp32", version="fp32-only", graphs={"encoder.int8.onnx": None}
    )
    with pytest.raises(ArtifactError, match="encoder.int8.onnx"):
        InferenceRuntime.load(fp32_only.path, precision="int8")


@pytest.mark.skipif(CUDA_PROVIDER in ort.get_available_providers(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error(tiny_artifact: Path) -> None:
    with pytest.raises(DeviceUnavailable, match="device 'cuda' requested but .* has no CUDAExecutionProvider"):
        InferenceRuntime.load(tiny_artifact, device="cuda")
    assert InferenceRuntime.load(tiny_artifact, device="auto").providers == ("CPUExecutionProvider",)


def test_cuda_that_fails_to_initialise_is_an_error_not_a_silent_cpu_fallback(
    tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build that lists CUDA but cannot start it (no driver, no cuDNN) falls back to CPU inside ONNX Runtime."""
    if CUDA_PROVIDER in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_PROVIDER, "CPUExecutionProvider"])
    with pytest.raises(DeviceUnavailable, match="failed to initialise"):
        InferenceRuntime.load(tiny_artifact, device="cuda")
    assert InferenceRuntime.load(tiny_artifact, device="auto").providers == ("CPUExecutionProvider",)


def test_bad_arguments(tiny_artifact: Path) -> None:
    with pytest.raises(ValueError, match="device"):
        InferenceRuntime.load(tiny_artifact, device="tpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision"):
        InferenceRuntime.load(tiny_artifact, precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="intra_op_threads"):
        InferenceRuntime.load(tiny_artifact, intra_op_threads=-1)


# ------------------------------------------------------------------------------------------- pre-processing


def test_length_buckets_are_sorted_bounded_and_restorable() -> None:
    keys = [(5, 3), (1, 9), (5, 1), (2, 2), (9, 9), (1, 1), (3, 7)]
    buckets = length_buckets(keys, max_batch_size=3)
    assert [len(b) for b in buckets] == [3, 3, 1]
    assert sorted(np.concatenate(buckets).tolist()) == list(range(len(keys)))
    flat = [keys[i] for i in np.concatenate(buckets)]
    assert flat == sorted(keys)
    results = [[f"item{i}" for i in bucket] for bucket in buckets]
    assert in_original_order(buckets, results) == [f"item{i}" for i in range(len(keys))]
    assert length_buckets([], 4) == []
    with pytest.raises(ValueError):
        length_buckets(keys, 0)


def _batches_cost(
    keys: list[tuple[int, int]], batches: list[list[int]], call: float, weights: tuple[float, ...]
) -> float:
    return sum(call + len(b) * sum(w * max(keys[i][c] for i in b) for c, w in enumerate(weights)) for b in batches)


def test_batches_cut_by_cost_are_the_cheapest_contiguous_cut_of_the_sorted_order() -> None:
    """Against every way of cutting the sorted order into batches of at most the limit (2^(n-1) cuts)."""
    rng = np.random.default_rng(0)
    weights = (0.25, 1.0)
    for _ in range(40):
        n, limit, call = int(rng.integers(1, 9)), int(rng.integers(1, 5)), float(rng.choice([0.5, 4.0, 30.0]))
        keys = [(int(a), int(t)) for a, t in zip(rng.choice([1, 1, 1, 40], n), rng.integers(1, 60, n), strict=True)]
        buckets = length_buckets(keys, limit, call, weights)
        assert all(1 <= len(b) <= limit for b in buckets)
        flat = np.concatenate(buckets).tolist()
        assert sorted(flat) == list(range(n)) and [keys[i] for i in flat] == sorted(keys)
        order = sorted(range(n), key=lambda i: keys[i])
        cheapest = math.inf
        for cuts in itertools.product([False, True], repeat=n - 1):
            bounds = [0, *(i + 1 for i, cut in enumerate(cuts) if cut), n]
            batches = [order[a:b] for a, b in itertools.pairwise(bounds)]
            if all(len(b) <= limit for b in batches):
                cheapest = min(cheapest, _batches_cost(keys, batches, call, weights))
        got = _batches_cost(keys, [b.tolist() for b in buckets], call, weights)
        assert got == pytest.approx(cheapest)


def test_cut_by_cost_keeps_similar_lengths_together_and_pays_a_call_only_when_padding_costs_more() -> None:
    short, long = [(1, 5)] * 6, [(1, 60)] * 2
    assert [len(b) for b in length_buckets(short + long, 32, call_cost=8.0)] == [6, 2]  # 6 x 55 padded > 8
    assert [len(b) for b in length_buckets(short + long, 32, call_cost=1000.0)] == [8]  # one call is cheaper
    assert [len(b) for b in length_buckets([(1, 5)] * 10, 4, call_cost=8.0)] == [2, 4, 4]  # equal: the limit
    audio = [(16_000, 5), (1, 5), (1, 6)]  # audio sorts last and is priced per sample
    assert [sorted(b.tolist()) for b in length_buckets(audio, 8, 8.0, (50 / 16_000, 1.0))] == [[1, 2], [0]]
    assert [len(b) for b in length_buckets(short + long, 3)] == [3, 3, 2]  # no call cost: every `limit` items
    with pytest.raises(ValueError, match="call_cost"):
        length_buckets(short, 4, call_cost=-1.0)
    with pytest.raises(ValueError, match="weights"):
        length_buckets(short, 4, call_cost=1.0, weights=(1.0,))


def test_speaker_indices_follow_first_appearance_and_clip_to_the_cap() -> None:
    speakers = ["Ross", "Rachel", "Ross", None, "Joey", "Monica", "Chandler", None]
    assert speaker_indices(speakers, max_speakers=4).tolist() == [0, 1, 0, 2, 3, 3, 3, 2]
    assert speaker_indices([], 4).tolist() == []


def test_text_is_truncated_and_audio_is_cut_and_checked(runtime: InferenceRuntime, data_dir: Path) -> None:
    preprocessor: Preprocessor = runtime.preprocessor
    config = preprocessor.config
    longest = " ".join(u.text for u in read_utterances(data_dir, "dev")[:40])
    (ids, has_text), (empty, has_empty) = preprocessor.tokenize([longest, None])
    assert len(ids) == config.max_tokens and ids[0] == 101 and ids[-1] == 102 and has_text
    assert empty.tolist() == [101, 102] and not has_empty
    long_audio = np.full(config.max_samples + 500, 0.1, np.float32)
    wave, has_audio = preprocessor.waveform(long_audio)
    assert len(wave) == config.max_samples and has_audio
    with pytest.raises(PreprocessError, match="non-finite"):
        preprocessor.waveform(np.array([0.0, np.nan], np.float32))
    with pytest.raises(PreprocessError, match="1-D"):
        preprocessor.waveform(np.zeros((2, 100), np.float32))
    with pytest.raises(PreprocessError, match="2 texts but 1 audio"):
        preprocessor.prepare(["a", "b"], [None])

"""ONNX export: graph contract, PyTorch vs ONNX Runtime parity on real MELD text and real speech, int8.

The graphs are exported once at one shape (batch 2, 7 tokens, 4000 samples, 3 turns) and evaluated at others.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from tokenizers import Tokenizer

from model.audio import decode_audio
from model.data.meld import Dialogue, group_dialogues, read_utterances
from model.data.speech import read_clips
from model.export import (
    CONTEXT_FILE,
    ENCODER_FILE,
    PARITY_TOLERANCE,
    DialogueFeeds,
    export_context_head,
    export_encoder,
    export_model,
    label_agreement,
    max_abs_diff,
    ort_session,
    to_feeds,
)
from model.network import EmotionModel, ModelConfig
from model.quantize import (
    RANGES_FILE,
    load_ranges,
    measure_activation_ranges,
    module_path,
    quantize_encoder_int8,
    save_ranges,
    smooth,
)
from model.text_encoder import load_tokenizer

pytestmark = pytest.mark.data

Batch = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_model() -> EmotionModel:
    torch.manual_seed(0)
    return EmotionModel(ModelConfig.tiny()).eval()


@pytest.fixture(scope="module")
def graphs(tiny_model: EmotionModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return export_model(tiny_model, tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module")
def dialogues(data_dir: Path) -> list[Dialogue]:
    return group_dialogues(read_utterances(data_dir, "dev"))


@pytest.fixture(scope="module")
def speech(data_dir: Path) -> list[np.ndarray]:
    """Real clips of varied lengths: RAVDESS (OGG, 16 kHz) and EmoDB (FLAC, resampled from 22.05 kHz)."""
    clips = read_clips(data_dir, "ravdess")[::120] + read_clips(data_dir, "emodb")[::60]
    return [decode_audio(clip.path) for clip in clips]


def encoder_batch(tokenizer: Tokenizer, texts: Sequence[str | None], clips: Sequence[np.ndarray | None]) -> Batch:
    """Encoder inputs per the contract: a missing text is [CLS][SEP], a missing clip one zero sample."""
    encodings = tokenizer.encode_batch([text or "" for text in texts])
    waves = [np.zeros(1, np.float32) if clip is None else clip for clip in clips]
    audio = np.zeros((len(waves), max(len(w) for w in waves)), np.float32)
    for row, wave in enumerate(waves):
        audio[row, : len(wave)] = wave
    return dict(
        input_ids=torch.tensor([e.ids for e in encodings]),
        attention_mask=torch.tensor([e.attention_mask for e in encodings]),
        audio=torch.from_numpy(audio),
        audio_lengths=torch.tensor([len(w) for w in waves]),
        has_text=torch.tensor([text is not None for text in texts]),
        has_audio=torch.tensor([clip is not None for clip in clips]),
    )


def modality_batch(tokenizer: Tokenizer, texts: list[str], clips: list[np.ndarray], modality: str) -> Batch:
    count = min(len(texts), len(clips))
    keep_text, keep_audio = modality in ("text", "both"), modality in ("audio", "both")
    return encoder_batch(
        tokenizer, [t if keep_text else None for t in texts[:count]], [c if keep_audio else None for c in clips[:count]]
    )


def speaker_indices(names: Sequence[str], max_speakers: int) -> np.ndarray:
    """Order of first appearance within the dialogue, clipped to the model's maximum."""
    first: dict[str, int] = {}
    return np.array([min(first.setdefault(n, len(first)), max_speakers - 1) for n in names], dtype=np.int64)


def dialogue_batch(tokenizer: Tokenizer, dialogues: Sequence[Dialogue], clips: list[np.ndarray], max_speakers: int):
    """Utterances of several dialogues (every third turn also gets a clip) plus the [B, T] turn layout."""
    turns = [u for d in dialogues for u in d.utterances]
    audio = [clips[i % len(clips)] if i % 3 == 0 else None for i in range(len(turns))]
    utterances = encoder_batch(tokenizer, [u.text for u in turns], audio)
    width = max(len(d.utterances) for d in dialogues)
    index, speakers = np.zeros((len(dialogues), width), np.int64), np.zeros((len(dialogues), width), np.int64)
    mask, start = np.zeros((len(dialogues), width), bool), 0
    for row, dialogue in enumerate(dialogues):
        size = len(dialogue.utterances)
        index[row, :size] = np.arange(start, start + size)
        speakers[row, :size] = speaker_indices([u.speaker for u in dialogue.utterances], max_speakers)
        mask[row, :size], start = True, start + size
    return utterances, torch.from_numpy(index), torch.from_numpy(speakers), torch.from_numpy(mask)


def signature(path: Path) -> list[tuple[str, str, list[str | int]]]:
    graph = onnx.load(path).graph
    return [
        (
            v.name,
            onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
            [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        )
        for v in [*graph.input, *graph.output]
    ]


def test_graphs_follow_the_contract(tiny_model: EmotionModel, graphs: dict[str, Path]) -> None:
    dim, emotions, sentiments = tiny_model.config.embed_dim, 7, 3
    assert signature(graphs[ENCODER_FILE]) == [
        ("input_ids", "int64", ["batch", "tokens"]),
        ("attention_mask", "int64", ["batch", "tokens"]),
        ("audio", "float32", ["batch", "samples"]),
        ("audio_lengths", "int64", ["batch"]),
        ("has_text", "bool", ["batch"]),
        ("has_audio", "bool", ["batch"]),
        ("embedding", "float32", ["batch", dim]),
    ]
    assert signature(graphs[CONTEXT_FILE]) == [
        ("embeddings", "float32", ["batch", "turns", dim]),
        ("speakers", "int64", ["batch", "turns"]),
        ("turn_mask", "bool", ["batch", "turns"]),
        ("causal", "bool", []),
        ("emotion_logits", "float32", ["batch", "turns", emotions]),
        ("sentiment_logits", "float32", ["batch", "turns", sentiments]),
    ]
    for path in graphs.values():
        assert all(o.version >= 17 for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("modality", ["text", "audio", "both"])
def test_encoder_parity_on_real_inputs(
    tiny_model: EmotionModel,
    graphs: dict[str, Path],
    tokenizer: Tokenizer,
    dialogues: list[Dialogue],
    speech: list[np.ndarray],
    modality: str,
) -> None:
    session = ort_session(graphs[ENCODER_FILE])
    texts = [u.text for d in dialogues[:4] for u in d.utterances]
    for rows in (slice(0, 1), slice(1, 7), slice(9, 12)):  # batch 1, 6 and 3: other shapes than the export's
        batch = modality_batch(tokenizer, texts[rows], speech[rows], modality)
        assert max_abs_diff(tiny_model.encoder, session, batch) <= PARITY_TOLERANCE


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", ["utterances", "dialogues"])
def test_end_to_end_parity_on_meld_dialogues(
    tiny_model: EmotionModel,
    graphs: dict[str, Path],
    tokenizer: Tokenizer,
    dialogues: list[Dialogue],
    speech: list[np.ndarray],
    causal: bool,
    layout: str,
) -> None:
    """Torch encoder + head vs ONNX encoder -> ONNX head; utterances are dialogues of length 1 (T=1)."""
    chosen = dialogues[1:4] if layout == "dialogues" else [Dialogue("dev", 0, (u,)) for u in dialogues[0].utterances]
    utterances, index, speakers, mask = dialogue_batch(tokenizer, chosen, speech, tiny_model.config.max_speakers)
    with torch.no_grad():
        expected = tiny_model(**utterances, turn_index=index, speakers=speakers, turn_mask=mask, causal=causal)
    embedding = ort_session(graphs[ENCODER_FILE]).run(None, to_feeds(utterances))[0]
    actual = ort_session(graphs[CONTEXT_FILE]).run(
        None,
        {
            "embeddings": embedding[index.numpy()],
            "speakers": speakers.numpy(),
            "turn_mask": mask.numpy(),
            "causal": np.array(causal),
        },
    )
    for torch_logits, ort_logits in zip(expected[:2], actual, strict=True):
        assert np.abs(torch_logits.numpy() - ort_logits).max() <= PARITY_TOLERANCE


def meld_dialogue_feeds(tokenizer: Tokenizer, dialogues: Sequence[Dialogue], max_speakers: int) -> list[DialogueFeeds]:
    return [
        (
            to_feeds(encoder_batch(tokenizer, [u.text for u in d.utterances], [None] * len(d.utterances))),
            speaker_indices([u.speaker for u in d.utterances], max_speakers),
        )
        for d in dialogues
    ]


def test_int8_encoder_label_agreement_runs(
    tiny_model: EmotionModel,
    graphs: dict[str, Path],
    tokenizer: Tokenizer,
    dialogues: list[Dialogue],
    tmp_path: Path,
) -> None:
    int8 = quantize_encoder_int8(graphs[ENCODER_FILE], tmp_path / "encoder.int8.onnx")
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in onnx.load(int8).graph.node)
    feeds = meld_dialogue_feeds(tokenizer, dialogues[:5], tiny_model.config.max_speakers)
    agreement = label_agreement(graphs[ENCODER_FILE], int8, graphs[CONTEXT_FILE], feeds)
    assert 0.0 <= agreement <= 1.0


def test_int8_keeps_the_listed_linears_in_fp32(graphs: dict[str, Path], tmp_path: Path) -> None:
    prefixes = ("text_proj", "text.bert.encoder.layer.0.")
    fp32 = onnx.load(graphs[ENCODER_FILE])
    weights = {i.name for i in fp32.graph.initializer}
    kept = [
        n
        for n in fp32.graph.node
        if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights and (module_path(n) or "").startswith(prefixes)
    ]
    assert {n.op_type for n in kept} == {"MatMul", "Gemm"}  # text_proj is a Gemm, which the quantizer renames

    def integer_matmuls(path: Path) -> int:
        return sum(n.op_type == "MatMulInteger" for n in onnx.load(path).graph.node)

    every = quantize_encoder_int8(graphs[ENCODER_FILE], tmp_path / "every.onnx")
    mixed = quantize_encoder_int8(graphs[ENCODER_FILE], tmp_path / "mixed.onnx", keep_fp32=prefixes)
    assert integer_matmuls(every) - integer_matmuls(mixed) == len(kept)


def test_smoothing_measures_every_linear_and_keeps_the_fp32_function(
    tiny_model: EmotionModel,
    graphs: dict[str, Path],
    tokenizer: Tokenizer,
    dialogues: list[Dialogue],
    speech: list[np.ndarray],
    tmp_path: Path,
) -> None:
    texts = [u.text for d in dialogues[:6] for u in d.utterances]
    calibration = [
        to_feeds(encoder_batch(tokenizer, texts[:16], [None] * 16)),
        to_feeds(encoder_batch(tokenizer, texts[16:20], speech[:4])),
    ]
    ranges = measure_activation_ranges(graphs[ENCODER_FILE], calibration)
    linears = {name: m for name, m in tiny_model.encoder.named_modules() if isinstance(m, torch.nn.Linear)}
    text_layers = [f"text.bert.encoder.layer.{i}" for i in range(len(tiny_model.encoder.text.bert.encoder.layer))]
    for layer in text_layers:  # every text Linear whose weight is a MatMul, keyed by its module path
        for part in ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense"):
            assert f"{layer}.{part}" in ranges
    assert any(name.startswith("audio.") for name in ranges)
    for name, amax in ranges.items():
        assert amax.shape == (linears[name].in_features,) and (amax >= 0).all() and amax.max() > 0
    assert load_ranges(save_ranges(ranges, tmp_path / RANGES_FILE)).keys() == ranges.keys()

    model = onnx.load(str(graphs[ENCODER_FILE]))
    assert smooth(model, ranges) > 0
    onnx.save(model, tmp_path / "smoothed.onnx")
    plain, smoothed = ort_session(graphs[ENCODER_FILE]), ort_session(tmp_path / "smoothed.onnx")
    for feeds in calibration:
        assert np.abs(plain.run(None, feeds)[0] - smoothed.run(None, feeds)[0]).max() <= PARITY_TOLERANCE

    int8 = onnx.load(quantize_encoder_int8(graphs[ENCODER_FILE], tmp_path / "int8.onnx", ranges))
    assert any(n.name.endswith("_smooth") for n in int8.graph.node)
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in int8.graph.node)
    wrong = {name: np.ones(3, np.float32) for name in ranges}
    with pytest.raises(ValueError, match="activation ranges"):
        smooth(onnx.load(str(graphs[ENCODER_FILE])), wrong)


@pytest.mark.slow
def test_pretrained_minilm_encoder_parity_and_int8_agreement(
    tokenizer: Tokenizer, dialogues: list[Dialogue], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = EmotionModel(ModelConfig()).eval()
    encoder = export_encoder(model.encoder, tmp_path / ENCODER_FILE)
    context = export_context_head(model.head, tmp_path / CONTEXT_FILE)
    texts = [u.text for d in dialogues for u in d.utterances][:32]
    session = ort_session(encoder)
    diffs = [
        max_abs_diff(model.encoder, session, encoder_batch(tokenizer, texts[i : i + 8], [None] * 8))
        for i in range(0, 32, 8)
    ]
    print(f"\nMiniLM encoder parity, 32 MELD dev utterances: max |torch - ort| = {max(diffs):.3g}")
    assert max(diffs) <= PARITY_TOLERANCE
    int8 = quantize_encoder_int8(encoder, tmp_path / "encoder.int8.onnx")
    feeds = meld_dialogue_feeds(tokenizer, dialogues[:20], model.config.max_speakers)
    agreement = label_agreement(encoder, int8, context, feeds)
    # An untrained head: only a smoke figure; the >= 99% bar applies to a trained model.
    print(f"int8 vs fp32 encoder emotion-label agreement, 20 MELD dev dialogues (untrained head): {agreement:.3f}")
    assert 0.0 <= agreement <= 1.0

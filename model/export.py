"""ONNX export of the two graphs of docs/ARCHITECTURE.md, and parity / agreement checks (int8: model/quantize.py).

Export uses the torch.export-based exporter (dynamo=True) with `dynamic_shapes`: it traces BERT of
transformers 5 and the in-graph log-mel without custom symbolics, and names the dynamic axes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.export import Dim

from model.preprocess import PreparedUtterance, pack

if TYPE_CHECKING:
    import onnx_ir as ir  # the exporter's IR (a dependency of onnxscript)

    from model.network import ContextHead, EmotionModel, UtteranceEncoder

OPSET = 18
PARITY_TOLERANCE = 1e-4
ENCODER_FILE, ENCODER_INT8_FILE, CONTEXT_FILE = "encoder.onnx", "encoder.int8.onnx", "context.onnx"
PACKED_TEXT_FILE = "encoder.packed.onnx"
ENCODER_INPUTS = ("input_ids", "attention_mask", "audio", "audio_lengths", "has_text", "has_audio")
PACKED_TEXT_INPUTS = ("token_ids", "positions", "row_tokens", "row_mask", "token_slots", "has_text")
ENCODER_OUTPUTS = ("embedding",)
CONTEXT_INPUTS = ("embeddings", "speakers", "turn_mask", "causal")
CONTEXT_OUTPUTS = ("emotion_logits", "sentiment_logits")
TEXT_EMOTION_OUTPUT = "text_emotion_logits"  # late fusion's context graph: the text head's logits before fusion
WHISPER_MAX_SAMPLES = 30 * 16000  # Whisper's positional table covers 30 s

Feeds = dict[str, np.ndarray]
DialogueFeeds = tuple[Feeds, np.ndarray]  # encoder feeds of the T turns of one dialogue, speakers [T]


class ExportParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance."""


def _dims() -> dict[str, Dim]:
    names = ("batch", "tokens", "samples", "turns")
    return {name: Dim(name, min=1) for name in names}


def encoder_dynamic_shapes(max_samples: int | None = None) -> dict[str, dict[int, Dim]]:
    d = _dims()
    batch, tokens = {0: d["batch"]}, {0: d["batch"], 1: d["tokens"]}
    samples = d["samples"] if max_samples is None else Dim("samples", min=1, max=max_samples)
    audio = {0: d["batch"], 1: samples}
    return dict(
        input_ids=tokens, attention_mask=tokens, audio=audio, audio_lengths=batch, has_text=batch, has_audio=batch
    )


def packed_text_dynamic_shapes() -> dict[str, dict[int, Dim]]:
    tokens, rows, width = Dim("packed_tokens", min=2), Dim("batch", min=1), Dim("tokens", min=2)
    packed, padded = {0: tokens}, {0: rows, 1: width}
    return dict(
        token_ids=packed, positions=packed, row_tokens=padded, row_mask=padded, token_slots=packed, has_text={0: rows}
    )


def context_dynamic_shapes() -> dict[str, dict[int, Dim]]:
    d = _dims()
    turns = {0: d["batch"], 1: d["turns"]}
    return dict(embeddings=turns, speakers=turns, turn_mask=turns, causal={})


def example_encoder_inputs(
    batch: int = 2, tokens: int = 7, samples: int = 4000, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Plausible random encoder inputs: ragged lengths, and each modality missing in some row."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (batch, tokens), generator=generator)
    text_len = torch.randint(min(2, tokens), tokens + 1, (batch,), generator=generator)
    text_len[0] = tokens
    position = torch.arange(tokens)[None]
    mask = (position < text_len[:, None]).long()
    ids = torch.where(position == 0, 101, torch.where(position == text_len[:, None] - 1, 102, ids)) * mask
    audio_len = torch.randint(1, samples + 1, (batch,), generator=generator)
    audio_len[0] = samples
    audio = 0.1 * torch.randn(batch, samples, generator=generator) * (torch.arange(samples)[None] < audio_len[:, None])
    rows = torch.arange(batch)
    return dict(
        input_ids=ids,
        attention_mask=mask,
        audio=audio,
        audio_lengths=audio_len,
        has_text=rows % 3 != 1,
        has_audio=rows % 3 != 2,
    )


def example_packed_text_inputs(batch: int = 3, tokens: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """`example_encoder_inputs` without audio, packed (model.preprocess.pack): the packed text path's inputs."""
    padded = example_encoder_inputs(batch, tokens, samples=1, seed=seed)
    lengths = padded["attention_mask"].sum(-1)
    no_audio = np.zeros(1, dtype=np.float32)
    utterances = [
        PreparedUtterance(ids[:length].numpy(), bool(has_text), no_audio, False)
        for ids, length, has_text in zip(padded["input_ids"], lengths, padded["has_text"], strict=True)
    ]
    return {name: torch.from_numpy(array) for name, array in pack(utterances).feeds().items()}


def example_context_inputs(dim: int, batch: int = 2, turns: int = 3, causal: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch * 1000 + turns)
    lengths = torch.randint(1, turns + 1, (batch,), generator=generator)
    lengths[0] = turns
    return dict(
        embeddings=torch.randn(batch, turns, dim, generator=generator),
        speakers=torch.randint(0, 3, (batch, turns), generator=generator),
        turn_mask=torch.arange(turns)[None] < lengths[:, None],
        causal=torch.tensor(causal),
    )


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def to_feeds(inputs: Mapping[str, torch.Tensor]) -> Feeds:
    return {name: tensor.detach().cpu().numpy() for name, tensor in inputs.items()}


def ort_session(path: Path | str, providers: list[str] | None = None) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])


def max_abs_diff(module: nn.Module, session: ort.InferenceSession, inputs: Mapping[str, torch.Tensor]) -> float:
    """Largest |PyTorch - ONNX Runtime| over every output."""
    with eval_mode(module), torch.no_grad():
        expected = module(**inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    actual = session.run(None, to_feeds(inputs))
    return max(float(np.abs(e.numpy() - a).max()) for e, a in zip(expected, actual, strict=True))


def check_parity(module: nn.Module, path: Path, inputs: Mapping[str, torch.Tensor]) -> float:
    diff = max_abs_diff(module, ort_session(path), inputs)
    if not diff <= PARITY_TOLERANCE:
        raise ExportParityError(f"{path.name}: max |torch - onnxruntime| = {diff:.3g} > {PARITY_TOLERANCE}")
    return diff


def _rename_outputs(graph: ir.Graph, names: tuple[str, ...]) -> None:
    """Name the graph outputs. (Passing output_names to the exporter breaks SSA when an internal value already
    has that name, e.g. aten.embedding's output is called "embedding".)"""
    outputs = set(graph.outputs)
    for node in graph:
        for value in node.outputs:
            if value.name in names and value not in outputs:
                value.name = f"{value.name}_internal"
    for value, name in zip(graph.outputs, names, strict=True):
        value.name = name


def _export(
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    output_names: tuple[str, ...],
    dynamic_shapes: dict[str, dict[int, Dim]],
    path: Path,
    opset: int,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with eval_mode(module), torch.no_grad():
        program = torch.onnx.export(
            module,
            (),
            kwargs=inputs,
            dynamo=True,
            opset_version=opset,
            input_names=list(inputs),
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    _rename_outputs(program.model.graph, output_names)
    program.save(str(path), external_data=False)  # one self-contained file (< 2 GB) for the manifest
    onnx.checker.check_model(str(path), full_check=True)
    return path


def export_encoder(encoder: UtteranceEncoder, path: Path, opset: int = OPSET, check: bool = True) -> Path:
    """encoder.onnx; with check, ONNX Runtime must match PyTorch at a shape other than the traced one."""
    whisper = encoder.speech_encoder == "whisper-tiny.en"
    shapes = encoder_dynamic_shapes(WHISPER_MAX_SAMPLES if whisper else None)
    _export(encoder, example_encoder_inputs(), ENCODER_OUTPUTS, shapes, path, opset)
    if check:
        check_parity(encoder, path, example_encoder_inputs(batch=3, tokens=5, samples=2321, seed=1))
    return path


class PackedTextPath(nn.Module):
    """encoder.packed.onnx: the encoder's embedding of utterances without audio from their packed tokens, the
    graph the runtime scores such calls with (model/runtime.py). Padding costs a call only inside attention."""

    def __init__(self, encoder: UtteranceEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        row_tokens: torch.Tensor,
        row_mask: torch.Tensor,
        token_slots: torch.Tensor,
        has_text: torch.Tensor,
    ) -> torch.Tensor:
        text = self.encoder.text.forward_packed(token_ids, positions, row_tokens, row_mask, token_slots)
        return self.encoder.without_audio(text, has_text)


def export_packed_text_path(encoder: UtteranceEncoder, path: Path, opset: int = OPSET, check: bool = True) -> Path:
    """encoder.packed.onnx; with check, ONNX Runtime must give the encoder's own embedding of the same
    utterances, padded and without audio, at shapes other than the traced one."""
    inputs, shapes = example_packed_text_inputs(), packed_text_dynamic_shapes()
    # In the encoder's own mode: exporting puts a module back in the mode it found it in, submodules included.
    _export(PackedTextPath(encoder).train(encoder.training), inputs, ENCODER_OUTPUTS, shapes, path, opset)
    if check:
        session = ort_session(path)
        for batch, tokens, seed in ((4, 9, 1), (1, 3, 2)):
            padded = example_encoder_inputs(batch, tokens, samples=1, seed=seed)
            padded["has_audio"] = torch.zeros_like(padded["has_audio"])
            with eval_mode(encoder), torch.no_grad():
                expected = encoder(**padded).numpy()
            actual = session.run(None, to_feeds(example_packed_text_inputs(batch, tokens, seed)))[0]
            if not (diff := float(np.abs(expected - actual).max())) <= PARITY_TOLERANCE:
                raise ExportParityError(f"{path.name}: max |torch padded - onnxruntime packed| = {diff:.3g}")
    return path


def export_context_head(head: ContextHead, path: Path, opset: int = OPSET, check: bool = True) -> Path:
    dim, outputs = head.input_size, head_outputs(head)
    _export(head, example_context_inputs(dim), outputs, context_dynamic_shapes(), path, opset)
    if check:
        check_parity(head, path, example_context_inputs(dim, batch=3, turns=5, causal=False))
    return path


def head_outputs(head: ContextHead) -> tuple[str, ...]:
    return CONTEXT_OUTPUTS + ((TEXT_EMOTION_OUTPUT,) if head.late else ())


def export_model(model: EmotionModel, out_dir: Path, check: bool = True) -> dict[str, Path]:
    """encoder.onnx, its packed text path encoder.packed.onnx and context.onnx under out_dir."""
    return {
        ENCODER_FILE: export_encoder(model.encoder, out_dir / ENCODER_FILE, check=check),
        PACKED_TEXT_FILE: export_packed_text_path(model.encoder, out_dir / PACKED_TEXT_FILE, check=check),
        CONTEXT_FILE: export_context_head(model.head, out_dir / CONTEXT_FILE, check=check),
    }


def predict_emotions(
    encoder: ort.InferenceSession, context: ort.InferenceSession, dialogues: Iterable[DialogueFeeds], causal: bool
) -> np.ndarray:
    """Argmax emotion of every turn of every dialogue, concatenated in order."""
    labels = []
    for feeds, speakers in dialogues:
        embedding = encoder.run(None, feeds)[0]
        logits = context.run(
            None,
            {
                "embeddings": embedding[None],
                "speakers": speakers[None].astype(np.int64),
                "turn_mask": np.ones((1, len(speakers)), dtype=bool),
                "causal": np.array(causal),
            },
        )[0]
        labels.append(logits[0].argmax(-1))
    return np.concatenate(labels)


def label_agreement(
    reference_encoder: Path,
    candidate_encoder: Path,
    context: Path,
    dialogues: Iterable[DialogueFeeds],
    causal: bool = False,
) -> float:
    """Share of turns whose emotion label is the same through either encoder (e.g. fp32 vs int8) + one head."""
    dialogues = list(dialogues)
    head = ort_session(context)
    reference = predict_emotions(ort_session(reference_encoder), head, dialogues, causal)
    candidate = predict_emotions(ort_session(candidate_encoder), head, dialogues, causal)
    return float((reference == candidate).mean())

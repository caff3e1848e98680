"""The latency benchmark's baseline: the same trained model, in PyTorch, behind a plain Hugging Face pipeline.

    python -m benchmarks.pipeline_baseline --artifact /tmp/eqstate/default-model/equipoise-default-1.0.1 --port 8100

A small FastAPI app (uvicorn, one process) with the utterance endpoint's JSON (`{"text": ...}`) that answers the
emotion label and its probabilities. The model is rebuilt in PyTorch from the delta the artifact was assembled
from (model/default/ for the shipped default: the pinned pretrained encoder plus the trained tensors, exactly as
`equipoise default assemble` exports it), wrapped in a `transformers.Pipeline` subclass (preprocess: tokenizer ->
tensors; _forward: the network; postprocess: calibrated softmax -> label) and called for one request at a time on
one worker thread: no batching, no ONNX Runtime. At start-up the pipeline's probabilities on a few MELD texts
must match the service's ONNX runtime within `PARITY_TOLERANCE`, or the server refuses to start, so the two sides
of the benchmark always run the same model. Used by benchmarks/latency.py.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import Pipeline, PreTrainedTokenizerFast

from model.artifact import ModelArtifact, load_artifact
from model.default_model import SHIPPED_DIR, read_release
from model.network import EmotionModel

PARITY_TOLERANCE = 1e-4
PARITY_TEXTS = 4  # MELD test texts checked at start-up
UTTERANCE_PATH = "/v1/predict/utterance"


class BaselineError(RuntimeError):
    """The baseline cannot serve the artifact's model (another version, or probabilities that differ)."""


class TextEmotionModule(nn.Module):
    """The whole EmotionModel on one text-only utterance: token tensors [1, L] -> emotion logits [1, C]. A text-only
    request is a one-turn dialogue (bidirectional context, speaker index 0) with the missing-audio placeholder,
    as the service scores it (model/preprocess.py)."""

    def __init__(self, network: EmotionModel) -> None:
        super().__init__()
        self.network = network.eval()

    @property
    def device(self) -> torch.device:  # what transformers.Pipeline asks of its model
        return next(self.parameters()).device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows = input_ids.shape[0]
        output = self.network(
            input_ids=input_ids,
            attention_mask=attention_mask,
            audio=torch.zeros(rows, 1),
            audio_lengths=torch.ones(rows, dtype=torch.long),
            has_text=torch.ones(rows, dtype=torch.bool),
            has_audio=torch.zeros(rows, dtype=torch.bool),
            turn_index=torch.arange(rows)[:, None],
            speakers=torch.zeros(rows, 1, dtype=torch.long),
            turn_mask=torch.ones(rows, 1, dtype=torch.bool),
            causal=False,
        )
        return output.emotion_logits[:, 0]


class EmotionPipeline(Pipeline):
    """text -> {"emotion", "confidence", "probabilities"}: tokenizer, PyTorch forward, softmax(logits / T)."""

    def __init__(
        self, model: TextEmotionModule, tokenizer: PreTrainedTokenizerFast, artifact: ModelArtifact, **kwargs: Any
    ) -> None:
        self.version = artifact.version
        self.labels = artifact.emotions.names
        self.temperature = artifact.calibration.temperature
        self.max_tokens = artifact.preprocessing.max_tokens
        super().__init__(model=model, tokenizer=tokenizer, device=torch.device("cpu"), **kwargs)

    def _sanitize_parameters(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        return {}, {}, {}

    def preprocess(self, text: str) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            text, truncation=True, max_length=self.max_tokens, return_token_type_ids=False, return_tensors="pt"
        )

    def _forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": self.model(inputs["input_ids"], inputs["attention_mask"])}

    def postprocess(self, outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        probabilities = torch.softmax(outputs["logits"][0].double() / self.temperature, dim=-1).float().tolist()
        best = int(np.argmax(probabilities))
        return {
            "emotion": self.labels[best],
            "confidence": probabilities[best],
            "probabilities": dict(zip(self.labels, probabilities, strict=True)),
        }


def load_pipeline(artifact_dir: Path, delta_dir: Path = SHIPPED_DIR) -> EmotionPipeline:
    """The PyTorch pipeline of the artifact assembled from `delta_dir` (the artifact's tokenizer and calibration)."""
    from model.delta import load_delta

    artifact = load_artifact(artifact_dir)
    released = read_release(delta_dir)["version"]
    if released != artifact.version:
        raise BaselineError(f"{delta_dir} holds {released}, the artifact is {artifact.version}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(artifact.tokenizer_path))
    return EmotionPipeline(TextEmotionModule(load_delta(delta_dir)), tokenizer, artifact)


def onnx_probabilities(artifact_dir: Path, texts: Sequence[str]) -> np.ndarray:
    """[N, C] emotion probabilities of each text alone, by the service's ONNX runtime."""
    from model.runtime import InferenceRuntime, UtteranceInput

    runtime = InferenceRuntime.load(artifact_dir, device="cpu", intra_op_threads=1)
    scored = runtime.classify([[UtteranceInput(text, None)] for text in texts], causal=False)
    return np.stack([turns[0].emotion_probs for turns in scored])


def parity(pipeline: EmotionPipeline, artifact_dir: Path, texts: Sequence[str]) -> float:
    """The largest |PyTorch pipeline - ONNX runtime| emotion probability over `texts`."""
    torch_probs = np.array([list(pipeline(text)["probabilities"].values()) for text in texts])
    return float(np.abs(torch_probs - onnx_probabilities(artifact_dir, texts)).max())


def check_parity(pipeline: EmotionPipeline, artifact_dir: Path, texts: Sequence[str]) -> float:
    worst = parity(pipeline, artifact_dir, texts)
    if not worst <= PARITY_TOLERANCE:
        raise BaselineError(f"PyTorch and ONNX probabilities differ by {worst:.2e} (> {PARITY_TOLERANCE})")
    return worst


def meld_texts(data_dir: Path, count: int, split: str = "test") -> list[str]:
    """The first `count` non-blank MELD texts of `split`."""
    from model.data import meld

    return meld.texts(data_dir, (split,))[:count]


# ------------------------------------------------------------------------------------------------ the server


class UtteranceBody(BaseModel):
    """The text-only subset of POST /v1/predict/utterance's JSON; audio is refused (extra="forbid")."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=2000, pattern=r"\S")
    speaker: str | None = Field(default=None, max_length=128)


def create_app(pipeline: EmotionPipeline) -> FastAPI:
    app = FastAPI(title="Equipoise latency baseline (PyTorch, transformers pipeline, unbatched)")
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baseline-model")  # one request at a time

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(UTTERANCE_PATH)
    async def predict(body: UtteranceBody) -> dict[str, Any]:
        started = time.perf_counter()
        answer = await asyncio.get_running_loop().run_in_executor(worker, pipeline, body.text)
        latency_ms = 1000 * (time.perf_counter() - started)
        return {
            "prediction_id": str(uuid.uuid4()),
            **answer,
            "model_version": pipeline.version,
            "latency_ms": latency_ms,
        }

    return app


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", type=Path, required=True, help="the artifact the service serves")
    parser.add_argument("--delta", type=Path, default=SHIPPED_DIR, help="the delta it was assembled from")
    parser.add_argument("--data-dir", type=Path, required=True, help="corpora (MELD texts of the parity check)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--log-level", default="info", help="uvicorn log level (info keeps the access log)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipeline = load_pipeline(args.artifact, args.delta)
    worst = check_parity(pipeline, args.artifact, meld_texts(args.data_dir, PARITY_TEXTS))
    print(f"baseline: PyTorch {torch.__version__}, {torch.get_num_threads()} threads; parity {worst:.1e}", flush=True)
    uvicorn.run(create_app(pipeline), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())

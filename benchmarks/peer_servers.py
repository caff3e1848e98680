"""The serving peers of benchmarks/peers.py: one artifact's ONNX graphs, through equipoise's own runtime code, served
by Triton's dynamic batcher (PyTriton) or by Ray Serve's `@serve.batch`. Each runs as a process of its own:

    python -m benchmarks.peer_servers triton --artifact DIR --port 8101 \\
        --max-batch-size 32 --wait-ms 0.5 --threads 1 --instances 1
    python -m benchmarks.peer_servers ray --artifact DIR --port 8102 \\
        --max-batch-size 32 --wait-ms 0.5 --threads 1 --instances 1

Both score a batch exactly as the service's micro-batcher does (`score_texts`: the artifact's tokenizer, the
utterance encoder graph, the context graph over one-turn dialogues with bidirectional context, the calibrated
softmax; `InferenceRuntime.classify`, length-sorted and cut by cost into calls of at most `--bucket` utterances,
the service's EQUIPOISE_BATCH_BUCKET_SIZE) and answer the emotion label and the emotion probabilities:

- Triton (`nvidia-pytriton`): model `equipoise` on the Open Inference Protocol, input `text` (BYTES [1]), outputs
  `emotion` (BYTES [1]) and `probabilities` (FP32 [C]); the bound Python function gets the batches that Triton's
  dynamic batcher formed (`max_batch_size`, `preferred_batch_size` = the maximum, `max_queue_delay_microseconds`);
  `--instances` model instances, each with its own ONNX Runtime sessions.
- Ray Serve: POST / with `{"text": ...}` answers `{"emotion", "probabilities"}`; a deployment of `--instances`
  replicas whose `@serve.batch` method (`max_batch_size`, `batch_wait_timeout_s`) scores on a worker thread;
  `max_ongoing_requests` is twice the batch so that a replica can hold a full batch while it scores one.

PyTriton 0.7.0's Python backend stub is built with pybind11 for NumPy 1 (with NumPy 2 its tensors arrive
garbled), while the project pins NumPy 2: the stub therefore runs on the small environment `make peers` builds
beside the virtualenv (`TRITON_STUB_ENV`: NumPy 1.26 and pyzmq only). The user-side process, which runs the model,
keeps the project's NumPy. SIGTERM stops either server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import signal
import sys
import sysconfig
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.settings import Settings
from model.runtime import InferenceRuntime, TurnPrediction, UtteranceInput

TRITON_MODEL = "equipoise"
TRITON_INFER_PATH = f"/v2/models/{TRITON_MODEL}/infer"
TRITON_HEALTH_PATH = f"/v2/models/{TRITON_MODEL}/ready"
RAY_PATH = "/"
RAY_HEALTH_PATH = "/-/healthz"
TRITON_STUB_ENV = Path(sys.prefix) / "triton-stub"  # built by `make peers`
SERVICE_BUCKET = Settings.model_fields["batch_bucket_size"].default  # utterances per ONNX Runtime call


@dataclass(frozen=True)
class PeerConfig:
    """One peer setting: the batch the batcher may form, how long it waits for it, ONNX Runtime threads per
    model instance, the number of instances (Triton model instances, Ray replicas), and the most utterances a call
    the runtime cuts a batch into (the service's default, so that only the serving layers differ)."""

    max_batch_size: int = 32
    wait_ms: float = 0.5
    threads: int = 1
    instances: int = 1
    bucket: int = SERVICE_BUCKET

    def args(self) -> list[str]:
        return [
            "--max-batch-size",
            str(self.max_batch_size),
            "--wait-ms",
            f"{self.wait_ms:g}",
            "--threads",
            str(self.threads),
            "--instances",
            str(self.instances),
            "--bucket",
            str(self.bucket),
        ]


def load_runtime(artifact: Path, threads: int, bucket: int) -> InferenceRuntime:
    return InferenceRuntime.load(artifact, device="cpu", intra_op_threads=threads, max_batch_size=bucket)


def score_texts(runtime: InferenceRuntime, texts: Sequence[str]) -> list[TurnPrediction]:
    """Each text as a one-turn dialogue with bidirectional context: what the service's batcher runs for text-only
    POST /v1/predict/utterance requests."""
    return [turns[0] for turns in runtime.classify([[UtteranceInput(text, None)] for text in texts], causal=False)]


# ------------------------------------------------------------------------------------------------ Triton


def triton_infer(runtime: InferenceRuntime) -> Callable[..., dict[str, np.ndarray]]:
    """The function bound to one Triton model instance: a batch of texts [B, 1] -> emotion [B, 1], probabilities
    [B, C]."""
    from pytriton.decorators import batch

    @batch
    def infer(text: np.ndarray) -> dict[str, np.ndarray]:
        turns = score_texts(runtime, [row[0].decode("utf-8") for row in text])
        return {
            "emotion": np.array([[turn.emotion.encode("utf-8")] for turn in turns], dtype=object),
            "probabilities": np.stack([turn.emotion_probs for turn in turns]),
        }

    return infer


def _use_stub_env() -> None:
    """Point PyTriton's Python backend stub at TRITON_STUB_ENV and at this interpreter's libpython (the stub links
    libpython3.X by name, and the loader would otherwise find the distribution's, another patch release)."""
    import pytriton.server.triton_server as triton_server

    if not (TRITON_STUB_ENV / "bin" / "python3").exists():
        raise SystemExit(f"{TRITON_STUB_ENV} is missing: run `make peers` (the Triton stub's NumPy 1 environment)")
    triton_server.get_triton_python_backend_python_env = lambda: pathlib.Path(TRITON_STUB_ENV)
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = ":".join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))


def serve_triton(artifact: Path, port: int, config: PeerConfig, ports: tuple[int, int]) -> None:
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    _use_stub_env()
    runtimes = [load_runtime(artifact, config.threads, config.bucket) for _ in range(config.instances)]
    classes = len(runtimes[0].emotions.names)
    triton_config = TritonConfig(
        http_address="127.0.0.1",
        http_port=port,
        grpc_address="127.0.0.1",
        grpc_port=ports[0],
        metrics_port=ports[1],
        allow_metrics=False,
        log_verbose=0,
        exit_timeout_secs=10,
    )
    batcher = DynamicBatcher(
        max_queue_delay_microseconds=round(config.wait_ms * 1000), preferred_batch_size=[config.max_batch_size]
    )
    with Triton(config=triton_config) as triton:
        triton.bind(
            model_name=TRITON_MODEL,
            infer_func=[triton_infer(runtime) for runtime in runtimes],
            inputs=[Tensor(name="text", dtype=bytes, shape=(1,))],
            outputs=[
                Tensor(name="emotion", dtype=bytes, shape=(1,)),
                Tensor(name="probabilities", dtype=np.float32, shape=(classes,)),
            ],
            config=ModelConfig(max_batch_size=config.max_batch_size, batcher=batcher),
            strict=False,
        )
        triton.run()
        print(f"triton: serving on 127.0.0.1:{port}", flush=True)
        _wait_for_sigterm()


def triton_body(text: str) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]}


def triton_answer(body: dict[str, Any], labels: Sequence[str]) -> tuple[str, list[float]]:
    outputs = {output["name"]: output["data"] for output in body["outputs"]}
    return outputs["emotion"][0], [float(p) for p in outputs["probabilities"]]


# ------------------------------------------------------------------------------------------------ Ray Serve


def _ray_deployment(artifact: Path, config: PeerConfig) -> Any:
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(
        num_replicas=config.instances,
        max_ongoing_requests=2 * config.max_batch_size,
        ray_actor_options={"num_cpus": 0},
    )
    class EmotionReplica:
        def __init__(self) -> None:
            self.runtime = load_runtime(artifact, config.threads, config.bucket)
            self.labels = self.runtime.emotions.names
            self.score.set_max_batch_size(config.max_batch_size)
            self.score.set_batch_wait_timeout_s(config.wait_ms / 1000)

        async def __call__(self, request: Request) -> dict[str, Any]:
            return await self.score((await request.json())["text"])

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0005)  # replaced by the setting in __init__
        async def score(self, texts: list[str]) -> list[dict[str, Any]]:
            turns = await asyncio.to_thread(score_texts, self.runtime, texts)
            return [
                {
                    "emotion": turn.emotion,
                    "probabilities": dict(zip(self.labels, map(float, turn.emotion_probs), strict=True)),
                }
                for turn in turns
            ]

    return EmotionReplica.bind()


def serve_ray(artifact: Path, port: int, config: PeerConfig, cpus: int) -> None:
    import ray
    from ray import serve

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": port},
            logging_config={"enable_access_log": False, "log_level": "WARNING"},
        )
        serve.run(_ray_deployment(artifact.resolve(), config), name=TRITON_MODEL, route_prefix=RAY_PATH)
        print(f"ray: serving on 127.0.0.1:{port}", flush=True)
        _wait_for_sigterm()
        serve.shutdown()
    finally:
        ray.shutdown()


def ray_answer(body: dict[str, Any], labels: Sequence[str]) -> tuple[str, list[float]]:
    return body["emotion"], [float(body["probabilities"][label]) for label in labels]


# ------------------------------------------------------------------------------------------------ command line


def _wait_for_sigterm() -> None:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("peer", choices=["triton", "ray"])
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True, help="HTTP port on 127.0.0.1")
    parser.add_argument("--max-batch-size", type=int, default=PeerConfig.max_batch_size)
    parser.add_argument("--wait-ms", type=float, default=PeerConfig.wait_ms, help="batch wait after the first")
    parser.add_argument("--threads", type=int, default=PeerConfig.threads, help="ONNX Runtime threads per instance")
    parser.add_argument("--instances", type=int, default=PeerConfig.instances, help="model instances / replicas")
    parser.add_argument("--bucket", type=int, default=SERVICE_BUCKET, help="most utterances per ONNX Runtime call")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="Ray: CPUs of the local cluster")
    parser.add_argument("--side-ports", type=int, nargs=2, default=(0, 0), help="Triton: gRPC and metrics ports")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = PeerConfig(args.max_batch_size, args.wait_ms, args.threads, args.instances, args.bucket)
    if args.peer == "triton":
        serve_triton(args.artifact, args.port, config, tuple(args.side_ports))
    else:
        serve_ray(args.artifact, args.port, config, args.cpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())

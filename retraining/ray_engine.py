"""`--engine ray`: the training of a retraining job on a Ray cluster.

Tier 2's classifier training runs as one Ray task; tier 3's fine-tuning runs on Ray Train (TorchTrainer, one
data-parallel worker per GPU: each takes its shard of every epoch, gradients are averaged by DDP). The job itself,
its steps and its gate stay with the worker that claimed it. The cluster is the one named by
params["ray_address"] (or RAY_ADDRESS); without one, a local Ray instance is started.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

R = TypeVar("R")
CHECKPOINT_FILE = "model.pt"
ModelFactory = Callable[[], torch.nn.Module]
# fit(model, rank, world_size, device): trains the (DDP-wrapped) model in place on this worker's shard.
FitFunction = Callable[[torch.nn.Module, int, int, torch.device], None]


def connect(params: Mapping[str, Any] | None = None, num_cpus: int | None = None) -> None:
    """Join the configured cluster, or start a local one, unless this process is already connected."""
    import ray

    if ray.is_initialized():
        return
    address = (params or {}).get("ray_address") or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False, log_to_driver=False)


def run_task(
    function: Callable[..., R],
    args: tuple[Any, ...],
    *,
    params: Mapping[str, Any] | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
) -> R:
    """`function(*args)` as a Ray task, waiting for its result."""
    import ray

    connect(params)
    return ray.get(ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(function).remote(*args))


def _train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model = ray.train.torch.prepare_model(config["build"](), parallel_strategy_kwargs={"find_unused_parameters": True})
    config["fit"](model, rank, world, ray.train.torch.get_device())
    if rank != 0:
        ray.train.report({"rank": rank})
        return
    unwrapped = model.module if hasattr(model, "module") else model
    with tempfile.TemporaryDirectory() as directory:
        torch.save({k: v.cpu() for k, v in unwrapped.state_dict().items()}, Path(directory) / CHECKPOINT_FILE)
        ray.train.report({"rank": rank}, checkpoint=ray.train.Checkpoint.from_directory(directory))


def fit_torch(
    build: ModelFactory,
    fit: FitFunction,
    *,
    num_workers: int,
    use_gpu: bool,
    storage: Path,
    name: str,
    params: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Data-parallel training on Ray Train; returns rank 0's final state dict."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    connect(params)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"build": build, "fit": fit},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name=name, storage_path=str(storage.resolve())),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, weights_only=True)

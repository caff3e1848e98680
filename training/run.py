"""Run directories: everything one training run writes, and the checkpoint it resumes from.

    RUN_DIR/config.json            resolved recipe (+ its sha256); a run directory belongs to one recipe
    RUN_DIR/metrics.jsonl          one record per finished epoch
    RUN_DIR/checkpoints/last.pt    model + optimizer + scheduler + scaler + loop state, written every epoch
    RUN_DIR/checkpoints/best.pt    model weights of the best dev epoch
    RUN_DIR/model.pt               final weights (best epoch + decoupled stage + post-hoc bias)
    RUN_DIR/final.json             temperature, post-hoc offsets, reference distribution, timings, summaries
    RUN_DIR/reports/{split}.json   metrics per corpus group and context mode (training/metrics.py reports)
    RUN_DIR/plots/*.png            per-class bars and confusion matrices (training/plots.py)

Every file is written to a temporary name and renamed, so a kill never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.network import EmotionModel
from training.recipe import Recipe

TEXT_PREFIX = "encoder.text."


class RunError(RuntimeError):
    """The run directory cannot be used for this request (another recipe, nothing to resume...)."""


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def for_recipe(cls, runs_dir: Path, recipe: Recipe) -> RunDir:
        """The default location: one directory per (recipe, seed), so re-running a command resumes it."""
        return cls(Path(runs_dir) / f"{recipe.name}-seed{recipe.train.seed}")

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def last_checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    @property
    def best_model(self) -> Path:
        return self.path / "checkpoints" / "best.pt"

    @property
    def final_model(self) -> Path:
        return self.path / "model.pt"

    @property
    def final(self) -> Path:
        return self.path / "final.json"

    @property
    def reports(self) -> Path:
        return self.path / "reports"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def has_checkpoint(self) -> bool:
        return self.last_checkpoint.is_file()

    def is_finished(self) -> bool:
        return self.final.is_file() and self.final_model.is_file()

    def prepare(self, recipe: Recipe) -> None:
        """Create the directory and write config.json, or check that an existing one holds the same recipe."""
        if self.config.is_file():
            stored = self.read_json(self.config)
            if stored.get("sha256") != recipe.digest():
                raise RunError(
                    f"{self.path} holds a run of another recipe (or seed): {stored.get('recipe', {}).get('name')!r}; "
                    "use another --out directory or delete it"
                )
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_json(
            self.config,
            {
                "recipe": recipe.to_dict(),
                "sha256": recipe.digest(),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "versions": {"python": platform.python_version(), "torch": torch.__version__},
            },
        )

    def adopt_training(self, other: RunDir) -> None:
        """Start from the finished epochs of `other`, a run whose recipe trains identically (it may differ in
        its decoupled / post-hoc stage): its checkpoints and epoch metrics are copied here."""
        if other.recipe().training_digest() != self.recipe().training_digest():
            raise RunError(f"{other.path} trains differently from {self.path}; cannot share its checkpoints")
        for source, target in ((other.last_checkpoint, self.last_checkpoint), (other.best_model, self.best_model),
                               (other.metrics, self.metrics)):  # fmt: skip
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)

    def recipe(self) -> Recipe:
        return Recipe.from_dict(self.read_json(self.config)["recipe"], where=str(self.config))

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics.open("a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text(encoding="utf-8").splitlines() if line]

    def truncate_metrics(self, epochs: int) -> None:
        """Keep the records of the first `epochs` epochs (a kill after logging but before the checkpoint
        leaves one more, which the resumed run writes again)."""
        kept = [r for r in self.read_metrics() if r["epoch"] < epochs]
        _atomic_write(self.metrics, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def save(self, obj: Any, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _temporary(path) as tmp:
            torch.save(obj, tmp)

    def load(self, path: Path) -> Any:
        return torch.load(path, map_location="cpu", weights_only=False)

    def write_json(self, path: Path, data: Any) -> None:
        _atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())

    @staticmethod
    def read_json(path: Path) -> Any:
        return json.loads(path.read_text(encoding="utf-8"))


def frozen_pretrained_text(model: EmotionModel) -> bool:
    """The pinned pretrained text encoder, not trained: its weights are the package's, checked by hash at load,
    so checkpoints leave them out (90 MB each otherwise)."""
    trainable = any(p.requires_grad for p in model.encoder.text.parameters())
    return model.config.text_encoder == "minilm" and not trainable


def model_state(model: EmotionModel) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if frozen_pretrained_text(model):
        state = {k: v for k, v in state.items() if not k.startswith(TEXT_PREFIX)}
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a `model_state`; only the pretrained text encoder may be absent from it."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if not includes_text(state):
        missing = [k for k in missing if not k.startswith(TEXT_PREFIX)]
    if missing or unexpected:
        raise RunError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def includes_text(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(TEXT_PREFIX) for k in state)


def servable_model(run: RunDir) -> tuple[Recipe, EmotionModel]:
    """`load_trained_model` for export: refused for a run whose text input the serving runtime cannot build."""
    recipe, model = load_trained_model(run)
    if recipe.context_input.tokens:
        raise RunError(
            f"{run.path} encodes earlier turns in the text input ([context_input]); serving builds single-turn "
            "inputs, so it cannot be exported"
        )
    return recipe, model


def load_trained_model(run: RunDir) -> tuple[Recipe, EmotionModel]:
    """The final model of a finished run (the pretrained text encoder comes from its pinned package)."""
    if not run.is_finished():
        raise RunError(f"{run.path} is not a finished run (no model.pt / final.json)")
    recipe = run.recipe()
    state = run.load(run.final_model)
    model = EmotionModel(recipe.model, pretrained_text=not includes_text(state))
    load_model_state(model, state)
    return recipe, model.eval()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _temporary(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it on success and removed on failure."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def iter_runs(runs_dir: Path) -> Iterator[RunDir]:
    """The finished runs under `runs_dir`."""
    for config in sorted(Path(runs_dir).glob("*/config.json")):
        run = RunDir(config.parent)
        if run.is_finished():
            yield run

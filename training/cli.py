"""What `equipoise train` and `equipoise export` call."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.data.speech import MAPPING_NOTES
from training.recipe import Recipe, load_recipe
from training.run import RunDir, RunError, servable_model

if TYPE_CHECKING:
    from model.artifact import Calibration


def train_command(
    recipe_path: str,
    runs_dir: Path,
    data_dir: Path,
    cache_dir: Path,
    seed: int | None = None,
    resume: Path | bool = False,
    device: str = "auto",
    progress: bool = True,
) -> RunDir:
    """Train a recipe into RUNS_DIR/<recipe>-seed<N> (continuing it when it holds a checkpoint). `resume` True
    requires that checkpoint; a path resumes that run directory instead."""
    from training.loop import train

    recipe = load_recipe(recipe_path)
    if seed is not None:
        recipe = recipe.with_seed(seed)
    run = RunDir(Path(resume)) if isinstance(resume, Path) else RunDir.for_recipe(runs_dir, recipe)
    if resume and not (run.has_checkpoint() or run.is_finished()):
        raise RunError(f"nothing to resume in {run.path}: no checkpoint")
    state = "resuming" if run.has_checkpoint() else "starting"
    print(f"{state} {recipe.name} (seed {recipe.train.seed}) in {run.path}")
    start = time.perf_counter()
    final = train(recipe, run, data_dir, cache_dir, device=device, progress=progress)
    print(_final_lines(final, time.perf_counter() - start))
    return run


def _final_lines(final: dict[str, Any], seconds: float) -> str:
    lines = [f"best epoch {final['best_epoch'] + 1} of {final['epochs_run']}, {seconds:.0f} s"]
    for group, m in final["test"].items():
        f1 = ", ".join(f"{name} {v:.3f}" for name, v in m["f1"].items())
        lines.append(
            f"test {group}: accuracy {m['accuracy']:.4f}, weighted F1 {m['weighted_f1']:.4f}, "
            f"macro F1 {m['macro_f1']:.4f}; F1 {f1}"
        )
    return "\n".join(lines)


def recorded_calibration(final: dict[str, Any], emotions: Sequence[str]) -> Calibration | None:
    """The calibration record of a finished run (its final.json), None for runs finished before it existed."""
    from model.artifact import Calibration

    return Calibration.from_dict(final["calibration"], emotions) if "calibration" in final else None


def export_command(run_dir: Path, out_dir: Path, version: str | None = None) -> Path:
    """Export a finished run to a model artifact (model/artifact.py) with its calibration temperature, the
    reference predicted-class distribution on dev, and its test metrics."""
    from model.artifact import export_artifact

    run = RunDir(Path(run_dir))
    recipe, model = servable_model(run)
    final = RunDir.read_json(run.final)
    test = RunDir.read_json(run.reports / "test.json")
    version = version or f"{recipe.name}-seed{recipe.train.seed}-{run.path.stat().st_mtime_ns // 10**9}"
    export_artifact(
        model,
        Path(out_dir),
        version=version,
        calibration_temperature=final["temperature"],
        estimation_weights=final.get("estimation_weights"),  # runs finished before the calibration record
        calibration=recorded_calibration(final, recipe.model.emotions),
        reference_distribution=final["reference_distribution"],
        metrics=test,
        card_text=model_card(recipe, final),
        recipe=recipe.to_dict(),
    )
    print(f"exported {run.path} as {version} to {out_dir}")
    return Path(out_dir)


def model_card(recipe: Recipe, final: dict[str, Any]) -> str:
    """The training part of the model card: recipe, data, label mapping, results."""
    data = recipe.data
    corpora = (["MELD (text, dialogues)"] if data.meld else []) + [f"{c} (audio + text)" for c in data.speech]
    mapping = [f"- {c}: {label} -> {note}" for c in data.speech for label, note in MAPPING_NOTES[c].items()]
    lines = [
        f"## Training\n\nRecipe `{recipe.name}` (seed {recipe.train.seed}): {recipe.description}",
        f"Data: {', '.join(corpora)}; speech corpora split by speaker.",
        f"Text encoder trainable layers: {recipe.model.text_trainable_layers}; sampler {recipe.sampler.name}, "
        f"loss {recipe.loss.name}, augmentation {recipe.augment.method}, decoupled {recipe.decoupled.method}; "
        f"best epoch {final['best_epoch'] + 1}; calibration temperature {final['temperature']:.3f}.",
    ]
    if mapping:
        lines.append("Label mapping of the speech corpora:\n" + "\n".join(mapping))
    table = ["| group | accuracy | weighted F1 | macro F1 | per-class F1 |", "|---|---|---|---|---|"]
    for group, m in final["test"].items():
        f1 = ", ".join(f"{name} {v:.3f}" for name, v in m["f1"].items())
        table.append(f"| {group} | {m['accuracy']:.4f} | {m['weighted_f1']:.4f} | {m['macro_f1']:.4f} | {f1} |")
    lines.append("## Test results (bidirectional context)\n\n" + "\n".join(table))
    return "\n\n".join(lines) + "\n"

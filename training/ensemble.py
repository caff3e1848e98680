"""Ensembles of finished runs: their averaged (softened) emotion probabilities on a split, as the teachers of
knowledge distillation (Hinton et al. 2015; recipe section `[distill]`) and as the ensemble row of the MELD
benchmark. A member must train on the same data with the same model shape as the session that scores it, so the
session's cached encoder inputs serve it too."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from training.forward import MODES, predict
from training.recipe import Recipe, RecipeError
from training.run import RunDir, load_trained_model
from training.session import Session


def member_runs(s: Session, names: Sequence[str]) -> list[RunDir]:
    """Finished runs by name: absolute run directories, or names beside the session's own run."""
    runs = [RunDir(Path(name) if Path(name).is_absolute() else s.run.path.parent / name) for name in names]
    missing = [str(run.path) for run in runs if not run.is_finished()]
    if missing:
        raise RecipeError(f"not finished runs: {', '.join(missing)}")
    return runs


def check_member(member: Recipe, session: Recipe, where: Path) -> None:
    same = {"model": member.model == session.model, "data": member.data == session.data,
            "context_input": member.context_input == session.context_input}  # fmt: skip
    different = [name for name, ok in same.items() if not ok]
    if different:
        raise RecipeError(f"{where} differs from the run it serves in {', '.join(different)}")


@torch.no_grad()
def ensemble_probabilities(
    s: Session, runs: Sequence[RunDir], split: str, modes: Sequence[bool], temperature: float = 1.0
) -> dict[bool, Tensor]:
    """{causal: [turns of the split, C]} the members' mean of softmax(logits / temperature), CPU float32."""
    total = {causal: torch.zeros(len(s.tables[split]), s.num_emotions) for causal in modes}
    for run in runs:
        recipe, model = load_trained_model(run)
        check_member(recipe, s.recipe, run.path)
        member = dataclasses.replace(s, model=model.to(s.device))
        for causal in total:
            total[causal] += torch.softmax(predict(member, split, causal).emotion / temperature, dim=1)
    return {causal: summed / len(runs) for causal, summed in total.items()}


def teacher_probabilities(s: Session) -> dict[bool, Tensor]:
    """{causal: [training turns, C]} the distilling recipe's teachers, softened at its temperature."""
    config = s.recipe.distill
    runs = member_runs(s, config.teachers)
    probs = ensemble_probabilities(s, runs, "train", tuple(MODES.values()), config.temperature)
    return {causal: p.to(s.device) for causal, p in probs.items()}

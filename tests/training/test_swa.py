"""Stochastic weight averaging (Izmailov et al. 2018, recipe [swa]): the running equal-weight average, the schedule
that decays to a constant averaging rate, and a run whose dev selection scores and ships the average."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import training.loop as loop
from tests.training.test_loop import tiny_recipe, train_tiny
from training.recipe import OptimConfig, RecipeError, SwaConfig
from training.run import RunDir, model_state
from training.session import Session, warmup_cosine


def test_the_running_average_is_the_mean_of_every_folded_state() -> None:
    states = [{"w": torch.randn(3, 2), "steps": torch.tensor(k)} for k in range(5)]
    average = None
    for count, state in enumerate(states):
        average = loop.fold_average(average, state, count)
    assert average is not None
    assert torch.allclose(average["w"], torch.stack([s["w"] for s in states]).mean(0), atol=1e-6)
    assert int(average["steps"]) == 4  # integer buffers keep the newest value
    assert average["w"] is not states[0]["w"]  # never an alias of a live tensor


def test_the_schedule_decays_to_the_averaging_rate_then_holds_it() -> None:
    optim, steps = OptimConfig(epochs=8, warmup_epochs=1.0, lr=1.0), 10
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(optimizer, optim, steps, SwaConfig(from_epoch=5, lr_factor=0.25))
    rates = []
    for _ in range(optim.epochs * steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[steps] == pytest.approx(1.0)  # warm-up done
    assert all(a >= b for a, b in zip(rates[steps : 5 * steps], rates[steps + 1 : 5 * steps + 1], strict=True))
    assert rates[5 * steps :] == pytest.approx([0.25] * 3 * steps)  # constant while averaging
    assert rates[5 * steps - 1] > 0.25


@pytest.mark.parametrize(
    ("swa", "optim", "message"),
    [
        ({"from_epoch": 3}, {"epochs": 3}, "before optim.epochs"),
        ({"from_epoch": 1}, {"lr_drop_epoch": 2}, "lr_drop_epoch"),
        ({"from_epoch": 1}, {"warmup_epochs": 2.0}, "warm-up"),
        ({"from_epoch": 2, "lr_factor": 0.0}, {}, "lr_factor"),
    ],
)
def test_a_recipe_that_cannot_average_is_refused(swa: dict, optim: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        tiny_recipe(swa=swa, optim={"epochs": 4, **optim})


def test_dev_selection_scores_the_average_and_the_run_keeps_training_its_own_weights(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tiny_recipe(swa={"from_epoch": 2, "lr_factor": 0.5}, optim={"epochs": 4})
    ends: list[dict[str, torch.Tensor]] = []  # each epoch's own final weights
    scored: list[dict[str, torch.Tensor]] = []  # the weights dev selection saw
    real_epoch, real_selection = loop.train_epoch, loop.dev_selection

    def train_epoch(session: Session, epoch: int) -> dict[str, float]:
        stats = real_epoch(session, epoch)
        ends.append(model_state(session.model))
        return stats

    def dev_selection(session: Session):  # type: ignore[no-untyped-def]
        scored.append(model_state(session.model))
        return real_selection(session)

    monkeypatch.setattr(loop, "train_epoch", train_epoch)
    monkeypatch.setattr(loop, "dev_selection", dev_selection)
    final = train_tiny(recipe, tmp_path / "run", data_dir, tmp_path / "cache")

    run = RunDir(tmp_path / "run")
    assert [r["averaged"] for r in run.read_metrics()] == [0, 0, 1, 2]
    mean = {k: (ends[2][k] + ends[3][k]) / 2 for k in ends[3]}
    for epoch, expected in enumerate([ends[0], ends[1], ends[2], mean]):
        assert all(torch.allclose(scored[epoch][k], v, atol=1e-6) for k, v in expected.items()), epoch
    saved = torch.load(run.last_checkpoint, weights_only=False)
    assert all(torch.equal(saved["model"][k], v) for k, v in ends[3].items())  # training goes on from its own
    assert all(torch.allclose(saved["average"][k], v, atol=1e-6) for k, v in mean.items())
    best = torch.load(run.best_model)
    assert all(torch.allclose(best[k], v, atol=1e-6) for k, v in scored[final["best_epoch"]].items())

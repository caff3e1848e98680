"""The representation levers of the text model: the supervised contrastive term (Khosla et al. 2020), knowledge
distillation from finished runs (Hinton et al. 2015), and the recipe sections that turn them on."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.training.test_loop import tiny_recipe, train_tiny
from training.cli import export_command
from training.ensemble import teacher_probabilities
from training.losses import distillation_term, supervised_contrastive
from training.metrics import MetricsReport, compute_metrics
from training.recipe import Recipe, RecipeError
from training.run import RunDir, RunError
from training.session import build_session


def supcon_by_hand(features: torch.Tensor, labels: list[int], tau: float) -> float:
    """Khosla et al. (2020) eq. 2, term by term."""
    z = F.normalize(features.double(), dim=1)
    n, anchors, total = len(z), 0, 0.0
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(n) if a != i)
        total += -sum(math.log(math.exp(float(z[i] @ z[p]) / tau) / denominator) for p in positives) / len(positives)
        anchors += 1
    return total / anchors


def test_supcon_is_the_papers_l_out_with_lone_classes_only_as_negatives() -> None:
    torch.manual_seed(0)
    features = torch.randn(9, 5)
    labels = [0, 0, 1, 2, 1, 1, 0, 3, 2]  # class 3 has one row: never an anchor, still a negative of the others
    got = supervised_contrastive(features, torch.tensor(labels), temperature=0.1)
    assert got.item() == pytest.approx(supcon_by_hand(features, labels, 0.1), rel=1e-5)


def test_supcon_is_zero_without_anchors_and_lower_when_classes_cluster() -> None:
    assert supervised_contrastive(torch.randn(3, 4), torch.tensor([0, 1, 2]), 0.1).item() == 0.0
    labels = torch.tensor([0, 0, 1, 1])
    clustered = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    crossed = clustered[[0, 2, 1, 3]]
    assert supervised_contrastive(clustered, labels, 0.1) < supervised_contrastive(crossed, labels, 0.1)


def test_distillation_term_is_t_squared_kl_and_its_gradient_is_t_times_q_minus_p() -> None:
    torch.manual_seed(0)
    student = torch.randn(4, 7, requires_grad=True)
    temperature = 3.0
    teacher = torch.softmax(torch.randn(4, 7) / temperature, dim=1)
    loss = distillation_term(student, teacher, temperature)
    log_q = F.log_softmax(student / temperature, dim=1)
    expected = temperature**2 * F.kl_div(log_q, teacher, reduction="batchmean")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    # Hinton et al.: dC/dz_i = (1/T)(q_i − p_i) per row; T² x that, averaged over the 4 rows
    q = torch.softmax(student.detach() / temperature, dim=1)
    torch.testing.assert_close(student.grad, temperature * (q - teacher) / 4)
    assert distillation_term(teacher.log() * temperature, teacher, temperature).item() == pytest.approx(0, abs=1e-6)


def test_optional_sections_are_left_out_of_the_digest_while_off() -> None:
    plain = tiny_recipe()
    assert not {"contrastive", "distill", "context_input"} & set(plain.to_dict())
    on = tiny_recipe(contrastive={"weight": 0.1})
    assert on.to_dict()["contrastive"] == {"weight": 0.1, "temperature": 0.1}
    assert on.digest() != plain.digest() and Recipe.from_dict(on.to_dict()) == on


def test_distillation_refuses_mixed_targets_and_unfinished_teachers(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="augment.method"):
        tiny_recipe(distill={"teachers": ["t"]}, augment={"method": "mixup"})
    student = tiny_recipe(distill={"teachers": ["absent-seed0"]})
    with pytest.raises(RecipeError, match="not finished"):
        train_tiny(student, tmp_path / "student", data_dir, tmp_path / "cache")


def test_a_student_learns_from_its_teachers_averaged_probabilities(data_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for seed in (0, 1):
        train_tiny(tiny_recipe(train={"seed": seed, "patience": 0}), tmp_path / f"teacher{seed}", data_dir, cache)
    recipe = tiny_recipe(distill={"teachers": ["teacher0", str(tmp_path / "teacher1")], "temperature": 2.0})
    run = RunDir(tmp_path / "student")
    run.prepare(recipe)
    session = build_session(recipe, run, data_dir, cache, device="cpu", progress=False)
    probs = teacher_probabilities(session)
    rows = len(session.tables["train"])
    assert set(probs) == {False, True} and probs[True].shape == (rows, session.num_emotions)
    torch.testing.assert_close(probs[False].sum(dim=1), torch.ones(rows))
    assert not torch.allclose(probs[False], probs[True])  # the context mode changes what the teachers say
    final = train_tiny(recipe, run.path, data_dir, cache)
    assert 0 <= final["test"]["meld"]["macro_f1"] <= 1


def test_a_student_with_no_epochs_left_does_not_read_its_teachers(data_dir: Path, tmp_path: Path) -> None:
    """A run whose epochs are done (adopted, or resumed after its last epoch) only finishes: its teachers' outputs
    would be unused, so they are not computed and a teacher removed since then does not matter."""
    import shutil

    cache = tmp_path / "cache"
    train_tiny(tiny_recipe(train={"patience": 0}), tmp_path / "teacher", data_dir, cache)
    recipe = tiny_recipe(distill={"teachers": [str(tmp_path / "teacher")]})
    train_tiny(recipe, tmp_path / "student", data_dir, cache)
    RunDir(tmp_path / "student").final.unlink()
    shutil.rmtree(tmp_path / "teacher")
    final = train_tiny(recipe, tmp_path / "student", data_dir, cache)
    assert 0 <= final["test"]["meld"]["macro_f1"] <= 1
    with pytest.raises(RecipeError, match="not finished"):  # with epochs to run, the missing teacher is refused
        train_tiny(recipe, tmp_path / "another", data_dir, cache)


def test_the_contrastive_term_trains_through_the_recipe(data_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    plain = train_tiny(tiny_recipe(), tmp_path / "plain", data_dir, cache)
    with_term = train_tiny(tiny_recipe(contrastive={"weight": 0.5}), tmp_path / "supcon", data_dir, cache)
    first = [RunDir(tmp_path / name).read_metrics()[0]["train_loss"] for name in ("plain", "supcon")]
    assert first[1] > first[0]  # same seed and data: the term adds to the loss
    assert np.isfinite(with_term["test"]["meld"]["macro_f1"]) and plain["best_epoch"] >= 0


@pytest.mark.parametrize("layers", [1, 2], ids=["cached-bottom-states", "all-layers-from-tokens"])
def test_earlier_turns_in_the_text_input_train_and_are_refused_at_export(
    data_dir: Path, tmp_path: Path, layers: int
) -> None:
    recipe = tiny_recipe(model={"text_trainable_layers": layers}, context_input={"tokens": 48})
    run = RunDir(tmp_path / "run")
    run.prepare(recipe)
    session = build_session(recipe, run, data_dir, tmp_path / "cache", device="cpu", progress=False)
    batch = session.collators["train"](np.arange(2))
    assert batch.pool_mask is not None and (batch.pool_mask <= batch.attention_mask).all()
    assert (batch.pool_mask.sum(dim=1) < batch.attention_mask.sum(dim=1)).any()  # some turns pool a part only
    final = train_tiny(recipe, run.path, data_dir, tmp_path / "cache")
    assert 0 <= final["test"]["meld"]["macro_f1"] <= 1
    with pytest.raises(RunError, match="context_input"):
        export_command(run.path, tmp_path / "artifact")


def _stored_report() -> MetricsReport:
    """A two-class report as the benchmark's results file stores it."""
    return MetricsReport.from_dict(
        compute_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), ("neutral", "joy")).to_dict()
    )


def test_the_benchmark_adds_rows_measured_on_the_same_seeds_and_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import benchmarks.meld_imbalance as bench

    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results.json")
    report = _stored_report()
    first = bench.MethodResult("plain", "meld_ce", [report], [1.0])
    second = bench.MethodResult("lever", "meld_supcon", [report], [2.0])
    bench.record("levers_meld_ft2", [first], [0], 1.0, 1, dev_macro_f1={"meld_ce": [0.5]})
    merged = bench.record("levers_meld_ft2", [second], [0], 1.0, 1, dev_macro_f1={"meld_supcon": [0.4]})
    assert list(merged["levers_meld_ft2"]["methods"]) == ["meld_ce", "meld_supcon"]
    assert merged["levers_meld_ft2"]["dev_macro_f1"] == {"meld_ce": [0.5], "meld_supcon": [0.4]}
    replaced = bench.record("levers_meld_ft2", [second], [0, 1], 1.0, 1)  # other seeds: a new table
    assert list(replaced["levers_meld_ft2"]["methods"]) == ["meld_supcon"]


def test_a_default_candidate_is_added_beside_the_earlier_ones_each_with_its_own_device() -> None:
    import benchmarks.meld_imbalance as bench

    labels = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
    report = compute_metrics(np.arange(7), np.array([0, 1, 2, 3, 4, 5, 0]), labels)
    earlier_result = bench.MethodResult("old", "default_la", [report], [1.0])
    earlier = bench.with_candidate({"methods": {}, "dev_macro_f1": {}}, earlier_result, [0.4], [0], "one GPU")
    new = bench.MethodResult("new", "default_ft6", [report, report], [2.0, 2.0])
    entry = bench.with_candidate(earlier, new, [0.5, 0.6], [0, 1], "a CPU")
    assert list(entry["methods"]) == ["default_la", "default_ft6"]
    assert entry["dev_macro_f1"] == {"default_la": [0.4], "default_ft6": [0.5, 0.6]}
    text = "\n".join(bench.candidates_section(entry))
    assert "`default_la`: 1 seeds on one GPU" in text and "`default_ft6`: 2 seeds on a CPU" in text
    again = bench.with_candidate(entry, bench.MethodResult("new", "default_ft6", [report], [3.0]), [0.7], [0], "x")
    assert again["dev_macro_f1"]["default_ft6"] == [0.7]
    assert again["methods"]["default_la"] == entry["methods"]["default_la"]


def test_a_reused_adopting_run_reports_the_cost_of_its_first_completion(tmp_path: Path) -> None:
    import benchmarks.meld_imbalance as bench

    run = RunDir(tmp_path / "posthoc")
    run.path.mkdir()
    assert bench._stage_seconds(run, 24.0) == 24.0
    assert bench._stage_seconds(run, 0.001) == 24.0  # a later invocation only read the finished run


def test_rows_trained_with_fewer_threads_on_the_same_machine_join_the_table_and_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import benchmarks.meld_imbalance as bench

    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results.json")
    report = _stored_report()
    monkeypatch.setattr(bench, "benchmark_device", lambda: "x86_64 CPU, 2 threads")
    bench.record("levers_meld_ft6", [bench.MethodResult("plain", "meld_ce", [report], [1.0])], [0], 1.0, 1)
    monkeypatch.setattr(bench, "benchmark_device", lambda: "x86_64 CPU, 1 thread")
    merged = bench.record("levers_meld_ft6", [bench.MethodResult("swa", "meld_swa", [report], [2.0])], [0], 1.0, 1)
    entry = merged["levers_meld_ft6"]
    assert {name: row["device"] for name, row in entry["methods"].items()} == {
        "meld_ce": "x86_64 CPU, 2 threads",
        "meld_swa": "x86_64 CPU, 1 thread",
    }
    assert bench.measured_on(entry) == "x86_64 CPU (1 thread or 2 threads by row)"
    monkeypatch.setattr(bench, "benchmark_device", lambda: "one NVIDIA H100 80GB HBM3 (CUDA, mixed precision)")
    elsewhere = bench.record("levers_meld_ft6", [bench.MethodResult("swa", "meld_swa", [report], [2.0])], [0], 1, 1)
    assert list(elsewhere["levers_meld_ft6"]["methods"]) == ["meld_swa"]  # another machine: a new table
    assert bench.measured_on(elsewhere["levers_meld_ft6"]) == "one NVIDIA H100 80GB HBM3 (CUDA, mixed precision)"

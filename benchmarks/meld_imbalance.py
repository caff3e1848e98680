"""MELD imbalance benchmark: one backbone, every imbalance method, several seeds -> docs/TRAINING_RESULTS.md.

A backbone is a recipe holding the model, data and optimiser (training/recipes/_meld_frozen.toml: frozen
all-MiniLM-L6-v2 with pooled outputs cached once; _meld_ft2.toml: its top two layers fine-tuned; _meld_ft6.toml:
all six), always with the product's fusion layer, dialogue-context transformer and heads, trained on MELD text
with dialogue context (comparable with MELD_ANCHORS.md). Each method is one recipe that changes only its method
sections and is put on the chosen backbone. Methods that only change the stage after the epochs (cRT, tau-norm,
post-hoc) start from the plain-CE run of the same seed (the decoupling protocol of Kang et al. 2020), so they cost
seconds, not a run.

    python -m benchmarks.meld_imbalance --backbone _meld_frozen --seeds 3 [--jobs 4] [--with-default [NAME ...]]
    python -m benchmarks.meld_imbalance --with-default default_la default_text_posthoc --candidates-only

    python -m benchmarks.meld_imbalance --backbone _meld_ft2 --levers --seeds 3
    python -m benchmarks.meld_imbalance --backbone _meld_ft6 --levers --seeds 3 --methods meld_ce meld_posthoc \
        --with-default default_ft6

`--levers` measures the representation levers instead (`LEVERS`: earlier turns in the encoder input, a supervised
contrastive term, distillation from the plain-CE seeds, each alone and with post-hoc adjustment) beside plain CE,
plus the ensemble of the plain-CE seeds.

Runs land in <runs>/<recipe>@<backbone>-seed<N>; a finished run is reused, so an interrupted benchmark continues
where it stopped. `--with-default` also trains the candidates for the shipped default (`DEFAULT_CANDIDATES`, or
the ones named: their own recipes and data, not put on the backbone) into <runs>/<recipe>-seed<N>;
each candidate keeps the seeds and device it was measured with, and `--candidates-only` trains nothing else.
Results of every backbone measured are kept in docs/img/meld_imbalance_results.json (`--methods` adds rows measured
on the same seeds and device to a backbone's table) and the document is rebuilt from all of them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import time
import tomllib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.metrics import MetricsReport
from training.plots import plot_runs
from training.recipe import Recipe, load_recipe, merge_tables, read_recipe_table, resolve_recipe_path
from training.run import RunDir

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC = REPO_ROOT / "docs" / "TRAINING_RESULTS.md"
IMG_DIR = REPO_ROOT / "docs" / "img"
RESULTS = IMG_DIR / "meld_imbalance_results.json"
BACKBONES: dict[str, str] = {
    "_meld_frozen": "frozen all-MiniLM-L6-v2 (pooled outputs cached once)",
    "_meld_ft2": "all-MiniLM-L6-v2 with its top 2 of 6 layers fine-tuned (states below them cached once)",
    "_meld_ft6": "all-MiniLM-L6-v2 with all 6 layers fine-tuned (the whole encoder runs in every epoch)",
}

METHODS: tuple[tuple[str, str], ...] = (
    ("plain cross-entropy", "meld_ce"),
    ("class-weighted CE (inverse frequency)", "meld_weighted_ce"),
    ("class-balanced CE (effective number)", "meld_cb_effective"),
    ("focal loss", "meld_focal"),
    ("LDAM-DRW", "meld_ldam_drw"),
    ("logit-adjusted loss", "meld_logit_adjusted"),
    ("class-balanced sampling", "meld_balanced_sampling"),
    ("mixup (soft labels)", "meld_mixup"),
    ("BalanceMix (sampling + mixing)", "meld_balancemix"),
    ("cRT (decoupled)", "meld_crt"),
    ("tau-norm (decoupled)", "meld_tau_norm"),
    ("post-hoc logit adjustment", "meld_posthoc"),
)
# Candidates for the shipped default, chosen by mean MELD dev macro F1 (training/recipes/default_la.toml is the
# recipe of the 1.x releases on the top-2 backbone).
DEFAULT_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("logit-adjusted loss (pooled prior), top 2 layers", "default_la"),
    ("CE + post-hoc logit adjustment + bias tuning, top 2 layers", "default_ce_posthoc"),
    ("logit-adjusted loss (per-corpus prior), all 6 layers", "default_ft6"),
    ("MELD text only, CE + post-hoc logit adjustment, top 2 layers", "default_text_posthoc"),
)
# Stage-2 methods: their runs adopt the epochs of the plain-CE run of the same seed.
DECOUPLED = ("meld_crt", "meld_tau_norm", "meld_posthoc")
# Runs that need the plain-CE runs of every seed: the stage-2 methods and the distilled students (their teachers).
NEEDS_CE = (*DECOUPLED, "meld_distill")
# Runs trained after the first stage: those above, and the levers' post-hoc rows (they adopt the epochs of their
# lever's run, trained before them).
AFTER_CE = (*NEEDS_CE, "meld_context_posthoc", "meld_supcon_posthoc", "meld_distill_posthoc", "meld_swa_posthoc")
# The text model's representation levers (`--levers`), each beside plain CE and post-hoc adjustment trained in the
# same invocation on the same machine; the ensemble row averages the plain-CE seeds' probabilities.
LEVERS: tuple[tuple[str, str], ...] = (
    ("plain cross-entropy (baseline)", "meld_ce"),
    ("post-hoc logit adjustment", "meld_posthoc"),
    ("earlier turns in the encoder input (64 tokens)", "meld_context"),
    ("supervised contrastive term (SupCon)", "meld_supcon"),
    ("distilled from the three plain-CE seeds", "meld_distill"),
    ("earlier turns + post-hoc logit adjustment", "meld_context_posthoc"),
    ("SupCon + post-hoc logit adjustment", "meld_supcon_posthoc"),
    ("distilled + post-hoc logit adjustment", "meld_distill_posthoc"),
    ("stochastic weight averaging (SWA, last 5 epochs)", "meld_swa"),
    ("SWA + post-hoc logit adjustment", "meld_swa_posthoc"),
)
ENSEMBLES: tuple[tuple[str, str], ...] = (
    ("ensemble of the plain-CE seeds (mean probabilities)", "ensemble_ce"),
    ("the same + post-hoc logit adjustment (tau on dev)", "ensemble_ce_posthoc"),
)

# The anchors' class order (MELD_ANCHORS.md): Neu / Sur / Fear / Sad / Joy / Dis / Ang.
ANCHOR_ORDER = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")
# Copied from /work/shared/docs/MELD_ANCHORS.md (MELD test, 7 classes, %). None = not reported.
ANCHORS: tuple[tuple[str, tuple[float | None, ...], str, str], ...] = (
    # system, (acc, wF1, macro F1, Neu, Sur, Fear, Sad, Joy, Dis, Ang), inputs, source
    ("DialogueMMT (COLING 2025)", (71.19, 70.66, 56.68, 82.55, 63.59, 33.68, 49.02, 66.75, 38.76, 62.39),
     "Mistral-7B + CLIP, LoRA", "paper"),
    ("SACL-LSTM (ACL 2023)", (67.51, 66.45, 50.76, 80.17, 58.77, 26.23, 41.34, 64.98, 31.47, 52.35),
     "RoBERTa-large features, text", "zerohd4869/SACL README"),
    ("ECERC (2025)", (67.32, 66.46, 50.87, 79.80, 58.98, 26.12, 40.95, 64.95, 31.43, 53.89), "T+A+V", "ECERC paper"),
    ("DialogueCRN + RoBERTa", (66.93, 65.77, 49.15, 79.72, 57.62, 18.26, 39.30, 64.56, 32.07, 52.53), "text",
     "zerohd4869/DialogueCRN README"),
    ("M3Net (r)", (65.17, 64.84, 48.98, 78.61, 58.48, 22.22, 41.65, 62.71, 29.75, 49.44), "T+A+V", "ECERC paper"),
    ("DialogueRNN (r)", (64.29, 64.09, 47.27, 78.00, 55.59, 20.51, 39.80, 62.30, 23.21, 51.46), "T+A+V",
     "ECERC paper"),
    ("MMGCN (r)", (66.21, 64.55, 42.24, 79.58, 58.54, 0.00, 43.34, 63.69, 0.00, 50.56), "T+A+V", "ECERC paper"),
    ("SDT (r)", (66.18, 65.12, 45.83, 79.59, 58.01, 6.18, 43.70, 63.36, 19.08, 50.86), "T+A+V", "ECERC paper"),
    ("MM-DFN (ICASSP 2022)", (62.49, 59.46, 36.28, 77.76, 50.69, None, 22.93, 54.78, None, 47.82),
     "GloVe + OpenSMILE + DenseNet", "zerohd4869/MM-DFN README"),
    ("frozen MiniLM + logistic regression (floor)", (None, 55.7, 33.4, None, None, 3.6, None, None, 2.9, None),
     "text, no context", "MELD_ANCHORS.md, measured here"),
    ("same, class-balanced weights", (None, 51.2, 37.1, None, None, 11.3, None, None, 18.5, None),
     "text, no context", "MELD_ANCHORS.md, measured here"),
)  # fmt: skip


@dataclass
class MethodResult:
    label: str
    recipe: str
    reports: list[MetricsReport] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # training wall time per seed (stage-2 methods: the stage)
    shared_backbone: bool = False

    def to_dict(self) -> dict:
        return {"label": self.label, "seconds": self.seconds, "shared_backbone": self.shared_backbone,
                "reports": [r.to_dict() for r in self.reports]}  # fmt: skip

    @classmethod
    def from_dict(cls, recipe: str, data: dict) -> MethodResult:
        reports = [MetricsReport.from_dict(r) for r in data["reports"]]
        return cls(data["label"], recipe, reports, data["seconds"], data["shared_backbone"])


def method_recipe(name: str, backbone: str) -> Recipe:
    """A method recipe put on `backbone`: the backbone's tables with the method file's own tables merged in."""
    own = tomllib.loads(resolve_recipe_path(name).read_text(encoding="utf-8"))
    own.pop("extends", None)
    on = Path(backbone).stem.lstrip("_")
    if "distill" in own:
        own["distill"]["teachers"] = [_teacher_on(t, on) for t in own["distill"].get("teachers", [])]
    table = merge_tables(read_recipe_table(resolve_recipe_path(backbone)), own)
    table["name"] = f"{own['name']}@{on}"
    return Recipe.from_dict(table, where=f"{name} on {backbone}")


def _teacher_on(teacher: str, backbone: str) -> str:
    """A method file's teacher run (`meld_ce@meld_ft2-seed0`) moved to the backbone its student is put on, so that a
    student distils from its own backbone's runs (`meld_ce@meld_ft6-seed0` on `_meld_ft6`)."""
    return re.sub(r"@[^@/]+(?=-seed\d+$)", f"@{backbone}", teacher)


def run_of(name: str, backbone: str, seed: int, runs_dir: Path) -> RunDir:
    return RunDir.for_recipe(runs_dir, method_recipe(name, backbone).with_seed(seed))


def run_one(name: str, backbone: str, seed: int, runs_dir: Path, data_dir: Path, cache_dir: Path) -> dict:
    """Train (or reuse) one method and seed; returns its MELD test report and training time."""
    from training.loop import train

    recipe = method_recipe(name, backbone).with_seed(seed)
    run = run_of(name, backbone, seed, runs_dir)
    run.prepare(recipe)
    adopted = _adopt_backbone(run, recipe, runs_dir)
    start = time.perf_counter()
    final = train(recipe, run, data_dir, cache_dir, progress=False)
    seconds = final.get("train_seconds", 0.0) if not adopted else _stage_seconds(run, time.perf_counter() - start)
    report = meld_test_report(run)
    print(f"{recipe.name} seed {seed}: macro F1 {report.macro_f1:.4f} ({seconds:.0f} s)", flush=True)
    return {"report": report.to_dict(), "seconds": seconds, "adopted": adopted}


def _stage_seconds(run: RunDir, measured: float) -> float:
    """An adopting run's own cost (its stage after the adopted epochs), kept in the run directory the first time,
    so that a later invocation reusing the finished run reports what it cost rather than the time to read it."""
    record = run.path / "stage_seconds"
    if not record.is_file():
        record.write_text(f"{measured}\n", encoding="utf-8")
    return float(record.read_text(encoding="utf-8"))


def run_methods(
    methods: Sequence[tuple[str, str]], backbone: str, seeds: Sequence[int], runs_dir: Path, data_dir: Path,
    cache_dir: Path, jobs: int,
) -> list[MethodResult]:  # fmt: skip
    """Every (method, seed): first-stage methods in parallel, then the stage-2 methods that adopt their epochs."""
    first = [(n, s) for _, n in methods if n not in AFTER_CE for s in seeds]
    second = [(n, s) for _, n in methods if n in AFTER_CE for s in seeds]
    if any(n in NEEDS_CE for n, _ in second) and not any(n == "meld_ce" for n, _ in first):
        first += [("meld_ce", s) for s in seeds]  # the donor of the stage-2 runs, the distilled runs' teachers
    # The frozen text encoder's outputs are cached once, before the workers start reading the cache.
    done = {}
    if first:
        name, seed = first[0]
        done[first[0]] = run_one(name, backbone, seed, runs_dir, data_dir, cache_dir)
    # spawn: a forked child inherits torch's thread pools mid-use and can deadlock
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        for stage in (first[1:], second):
            futures = {key: pool.submit(run_one, key[0], backbone, key[1], runs_dir, data_dir, cache_dir)
                       for key in stage}  # fmt: skip
            done.update({key: future.result() for key, future in futures.items()})
    results = []
    for label, name in methods:
        outcome = [done[(name, s)] for s in seeds]
        results.append(MethodResult(label, name, [MetricsReport.from_dict(o["report"]) for o in outcome],
                                    [o["seconds"] for o in outcome], any(o["adopted"] for o in outcome)))  # fmt: skip
    return results


def _adopt_backbone(run: RunDir, recipe: Recipe, runs_dir: Path) -> bool:
    """Copy the epochs of a finished run with the same training (same seed) instead of training again."""
    if run.has_checkpoint() or run.is_finished():
        return (run.path / "adopted_from").is_file()
    for other in sorted(runs_dir.glob(f"*-seed{recipe.train.seed}")):
        donor = RunDir(other)
        same = donor.is_finished() and donor.recipe().training_digest() == recipe.training_digest()
        if donor.path != run.path and same:
            run.adopt_training(donor)
            (run.path / "adopted_from").write_text(donor.path.name + "\n")
            return True
    return False


def meld_test_report(run: RunDir, split: str = "test") -> MetricsReport:
    test = RunDir.read_json(run.reports / f"{split}.json")
    return MetricsReport.from_dict(test["meld"]["bidirectional"]["emotion"])


def run_candidates(names: Sequence[str], seeds: Sequence[int], runs_dir: Path, data_dir: Path, cache_dir: Path,
                   earlier: dict | None) -> dict:  # fmt: skip
    """Train (or reuse) the named default candidates and seeds, one after the other; the results file's entry, with
    the candidates measured earlier kept beside them (each records its own device and seeds)."""
    from training.loop import train

    entry = earlier or {"methods": {}, "dev_macro_f1": {}}
    for label, name in DEFAULT_CANDIDATES:
        if name not in names:
            continue
        result, dev = MethodResult(label, name), []
        for seed in seeds:
            recipe = load_recipe(name).with_seed(seed)
            run = RunDir.for_recipe(runs_dir, recipe)
            final = train(recipe, run, data_dir, cache_dir, progress=False)
            result.reports.append(meld_test_report(run))
            result.seconds.append(final.get("train_seconds", 0.0))
            dev.append(meld_test_report(run, "dev").macro_f1)
        entry = with_candidate(entry, result, dev, seeds, benchmark_device())
    return entry


def with_candidate(entry: dict, result: MethodResult, dev: list[float], seeds: Sequence[int], device: str) -> dict:
    """The candidates' entry with `result` added or replaced; the others keep the seeds and device they had."""
    methods = {**entry["methods"], result.recipe: {**result.to_dict(), "device": device, "seeds": list(seeds)}}
    return {**entry, "methods": methods, "dev_macro_f1": {**entry["dev_macro_f1"], result.recipe: dev}}


def ensemble_results(backbone: str, seeds: Sequence[int], runs_dir: Path, data_dir: Path, cache_dir: Path
                     ) -> tuple[list[MethodResult], dict[str, list[float]]]:  # fmt: skip
    """The plain-CE seeds as one ensemble (mean probabilities), and with post-hoc logit adjustment tuned on dev;
    their MELD test results and dev macro F1."""
    from training.ensemble import ensemble_probabilities
    from training.finish import monitored_train_counts
    from training.forward import report
    from training.posthoc import apply_offset, logit_adjustment, tune_logit_adjustment
    from training.session import build_session

    recipe = method_recipe("meld_ce", backbone)
    runs = [RunDir.for_recipe(runs_dir, recipe.with_seed(seed)) for seed in seeds]
    s = build_session(recipe, runs[0], data_dir, cache_dir, device="cpu", progress=False)
    logits = {}
    for split in ("dev", "test"):
        rows = s.tables[split].groups()["meld"]
        probs = ensemble_probabilities(s, runs, split, (False,))[False][rows]
        logits[split] = (probs.log(), s.tables[split].emotions[rows])
    prior = monitored_train_counts(s)
    tau = tune_logit_adjustment(*logits["dev"], prior).value
    offsets = (np.zeros(len(prior)), logit_adjustment(prior, tau))

    def scored(split: str, offset: np.ndarray) -> MetricsReport:
        return report(s, logits[split][1], apply_offset(logits[split][0], offset))

    plain, posthoc = (scored("test", offset) for offset in offsets)
    dev = [scored("dev", offset).macro_f1 for offset in offsets]
    (label, name), (label_posthoc, name_posthoc) = ENSEMBLES
    results = [
        MethodResult(label, name, [plain]),
        MethodResult(f"{label_posthoc}, tau {tau:g}", name_posthoc, [posthoc]),
    ]
    return results, {name: [dev[0]], name_posthoc: [dev[1]]}


# ---- the document ----------------------------------------------------------------------------------------------


def _pm(values: Sequence[float]) -> str:
    """Mean ± std in %; a single model (an ensemble) has no spread to show."""
    v = 100 * np.asarray(values, dtype=np.float64)
    return f"{v.mean():.2f}" if len(v) == 1 else f"{v.mean():.2f} ± {v.std():.2f}"


def results_table(results: Sequence[MethodResult]) -> list[str]:
    head = ["method", "recipe", "acc", "weighted F1", "macro F1", *[c[:3].title() for c in ANCHOR_ORDER], "s / seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        per_class = [_pm([rep[c].f1 for rep in r.reports]) for c in ANCHOR_ORDER]
        overall = [_pm([getattr(rep, m) for rep in r.reports]) for m in ("accuracy", "weighted_f1", "macro_f1")]
        seconds = f"{np.mean(r.seconds):.0f}" if r.seconds else "–"  # an ensemble trains nothing of its own
        seconds += " (+ the run it adopts)" if r.shared_backbone else ""
        lines.append("| " + " | ".join([r.label, f"`{r.recipe}`", *overall, *per_class, seconds]) + " |")
    return lines


def anchors_table() -> list[str]:
    head = ["system", "acc", "weighted F1", "macro F1", *[c[:3].title() for c in ANCHOR_ORDER], "inputs", "source"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for system, values, inputs, source in ANCHORS:
        cells = ["–" if v is None else f"{v:.2f}" for v in values]
        lines.append("| " + " | ".join([system, *cells, inputs, source]) + " |")
    return lines


def backbone_section(backbone: str, entry: dict) -> list[str]:
    results = [MethodResult.from_dict(name, data) for name, data in entry["methods"].items()]
    image = IMG_DIR / f"meld_imbalance_f1{backbone}.png"
    plot_runs({r.label: r.reports for r in results}, image, title=f"MELD test per-class F1 ({backbone}), mean ± std")
    recipe = load_recipe(resolve_recipe_path(backbone))
    seeds = entry["seeds"]
    return [
        f"## Backbone `{backbone}`: {BACKBONES.get(backbone, recipe.description)}",
        "",
        f"`python -m benchmarks.meld_imbalance --backbone {backbone} --seeds {len(seeds)}` on "
        f"{measured_on(entry)}; {entry['wall_seconds'] / 60:.1f} min wall time for the invocation that wrote it "
        f"({entry['jobs']} parallel jobs; runs finished by an earlier, interrupted invocation are reused, so "
        "the seconds per seed below are the better measure of cost). Text encoder -> the product's text "
        "projection and modality gate -> "
        f"{recipe.model.context_layers}-layer dialogue-context transformer (d={recipe.model.embed_dim}, speaker "
        "embeddings, causal and bidirectional attention at random per batch) -> emotion and sentiment heads "
        f"(sentiment weight {recipe.train.sentiment_weight}). AdamW lr {recipe.optim.lr} (text layers "
        f"{recipe.optim.text_lr}), {recipe.optim.batch_dialogues} dialogues per step, at most "
        f"{recipe.optim.epochs} epochs, early stopping after {recipe.train.patience} epochs without a better dev "
        "macro F1. Seconds are training time per seed.",
        "",
        *results_table(results),
        "",
        f"![per-class F1 per method, {backbone}]({image.relative_to(DOC.parent).as_posix()})",
        "",
    ]


def candidates_section(entry: dict) -> list[str]:
    """Candidates for the shipped default's text model, selected by mean MELD dev macro F1."""
    results = [MethodResult.from_dict(name, data) for name, data in entry["methods"].items()]
    dev = ", ".join(f"`{name}` {100 * np.mean(v):.2f}" for name, v in entry["dev_macro_f1"].items())
    where = "; ".join(
        f"`{name}`: {len(data['seeds'])} seeds on {data['device']}" for name, data in entry["methods"].items()
    )
    return [
        "## Candidates for the default model",
        "",
        "Each candidate is its own recipe (`training/recipes/<name>.toml`: data, loss, backbone; those with "
        "`speech` also train on RAVDESS / TESS / EmoDB, speaker-independent splits). Where each was measured: "
        f"{where}. Mean MELD dev macro F1: {dev}; compared on one device, the highest is the release candidate "
        "(its best dev seed; docs/TRAINING.md says which shipped as `training/recipes/default.toml`, and why). "
        "MELD test below; speech-corpus results are in the model card (model/default/MODEL_CARD.md).",
        "",
        *results_table(results),
        "",
    ]


def levers_section(key: str, entry: dict) -> list[str]:
    """The representation levers of one backbone, measured side by side in one invocation."""
    backbone = key.removeprefix("levers")
    results = [MethodResult.from_dict(name, data) for name, data in entry["methods"].items()]
    image = IMG_DIR / f"meld_levers_f1{backbone}.png"
    plot_runs({r.label: r.reports for r in results}, image, title=f"MELD test per-class F1, levers ({backbone})")
    dev = ", ".join(f"`{name}` {100 * np.mean(v):.2f}" for name, v in entry["dev_macro_f1"].items())
    trained = [name for _, name in LEVERS if name in entry["methods"]]
    methods = "" if len(trained) == len(LEVERS) else f" --methods {' '.join(trained)}"
    return [
        f"## Representation levers on `{backbone}`",
        "",
        f"`python -m benchmarks.meld_imbalance --backbone {backbone} --levers --seeds {len(entry['seeds'])}"
        f"{methods}` on {measured_on(entry)}, every row on the same machine and seeds. Each lever changes one thing "
        "of plain cross-entropy (recipes `training/recipes/meld_*.toml`). The ensemble rows are one model each (the "
        "plain-CE seeds together), so they have no spread. Mean MELD dev macro F1 per recipe (what selects): "
        f"{dev}.",
        "",
        *results_table(results),
        "",
        f"![per-class F1 per lever, {backbone}]({image.relative_to(DOC.parent).as_posix()})",
        "",
    ]


def write_document(everything: dict[str, dict]) -> None:
    lines = [
        "# Training results: imbalance-aware methods on MELD",
        "",
        "MELD test set, 7 emotions, bidirectional dialogue context, MELD text only (no audio), so the numbers "
        "compare with the text columns of the anchors. Model selection (best epoch, early stopping, every tau / "
        "bias) on MELD dev macro F1. Values in %, mean ± std over seeds (population std). Rebuilt from "
        f"`{RESULTS.relative_to(REPO_ROOT).as_posix()}` by every benchmark run. The default recipe against its "
        "targets, and what was tried: [TRAINING.md](TRAINING.md).",
        "",
    ]
    for backbone, entry in everything.items():
        if backbone.startswith("_meld"):
            lines += backbone_section(backbone, entry)
        elif backbone.startswith("levers"):
            lines += levers_section(backbone, entry)
    if "default_candidates" in everything:
        lines += candidates_section(everything["default_candidates"])
    lines += [
        "## Published results on MELD test (copied from MELD_ANCHORS.md)",
        "",
        *anchors_table(),
        "",
        "Fear + disgust are 4.5% of the test set: they barely move weighted F1 but weigh 2/7 of macro F1.",
        "",
    ]
    DOC.write_text("\n".join(lines), encoding="utf-8")


def record(key: str, results: Sequence[MethodResult], seeds: Sequence[int], wall: float, jobs: int,
           **extra: object) -> dict:  # fmt: skip
    """Store the results under `key` (a backbone, or "levers" + backbone). Methods measured earlier with the same
    seeds on the same machine are kept beside the new ones, so `--methods` adds rows instead of replacing the table;
    each row keeps the device it trained on, thread count included."""
    everything = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.is_file() else {}
    kept = ("_meld", "levers", "default_candidates")
    everything = {k: v for k, v in everything.items() if k.startswith(kept)}
    device = benchmark_device()
    entry = {"seeds": list(seeds), "wall_seconds": wall, "jobs": jobs, "device": device, **extra,
             "methods": {r.recipe: {**r.to_dict(), "device": device} for r in results}}  # fmt: skip
    earlier = everything.get(key, {})
    if earlier.get("seeds") == entry["seeds"] and machine_of(earlier.get("device", "")) == machine_of(device):
        earlier_rows = {name: {"device": earlier["device"], **data} for name, data in earlier["methods"].items()}
        entry["methods"] = {**earlier_rows, **entry["methods"]}
        for name in extra:
            entry[name] = {**earlier.get(name, {}), **entry[name]}
    everything[key] = entry
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(everything, indent=1), encoding="utf-8")
    return everything


def machine_of(device: str) -> str:
    """The machine of a device description without the torch thread count: seeds trained side by side with one
    thread each ran on the same machine as those trained alone with two."""
    return re.sub(r", \d+ threads?$", "", device)


def measured_on(entry: dict) -> str:
    """Where a table's rows trained: the device, or the machine and each thread count where the rows differ."""
    devices = sorted({data.get("device", entry["device"]) for data in entry["methods"].values()})
    if len(devices) == 1:
        return devices[0]
    threads = " or ".join(device.removeprefix(machine_of(device)).removeprefix(", ") for device in devices)
    return f"{machine_of(entry['device'])} ({threads} by row)"


def benchmark_device() -> str:
    """Where this invocation trains (the recipes train with mixed precision on CUDA)."""
    from training.session import describe_device, resolve_device

    return describe_device(resolve_device("auto"), amp=True)


def main(argv: Sequence[str] | None = None) -> int:
    from core.settings import get_settings

    settings = get_settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="_meld_frozen", help="backbone recipe (default: _meld_frozen)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per method")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes")
    parser.add_argument("--runs", type=Path, default=settings.state_dir / "benchmarks" / "meld_imbalance")
    parser.add_argument("--methods", nargs="*", help="recipe names (default: all)")
    parser.add_argument("--with-default", nargs="*", metavar="CANDIDATE",
                        help="also train these default candidates (none named: all of DEFAULT_CANDIDATES)")  # fmt: skip
    parser.add_argument("--levers", action="store_true", help="the representation levers instead of the methods")
    parser.add_argument("--candidates-only", action="store_true",
                        help="with --with-default: train no method, keep every table as recorded")  # fmt: skip
    args = parser.parse_args(argv)
    if settings.data_dir is None:
        parser.error("no data directory: set EQUIPOISE_DATA_DIR")
    if args.candidates_only and args.with_default is None:
        parser.error("--candidates-only records default candidates: name them with --with-default")
    seeds, start, cache = list(range(args.seeds)), time.perf_counter(), settings.state_dir / "cache"
    if args.candidates_only:
        everything = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.is_file() else {}
    else:
        everything = measure_methods(args, seeds, settings.data_dir, cache, start)
    if args.with_default is not None:
        names = args.with_default or [name for _, name in DEFAULT_CANDIDATES]
        everything["default_candidates"] = run_candidates(names, seeds, args.runs, settings.data_dir, cache,
                                                          everything.get("default_candidates"))  # fmt: skip
        RESULTS.write_text(json.dumps(everything, indent=1), encoding="utf-8")
    wall = time.perf_counter() - start
    write_document(everything)
    print(f"wrote {DOC} ({wall / 60:.1f} min)")
    return 0


def measure_methods(args: argparse.Namespace, seeds: list[int], data_dir: Path, cache: Path, start: float) -> dict:
    """Train (or reuse) the methods or levers on the backbone and record their table."""
    table = LEVERS if args.levers else METHODS
    methods = [m for m in table if not args.methods or m[1] in args.methods]
    results = run_methods(methods, args.backbone, seeds, args.runs, data_dir, cache, args.jobs)
    if not args.levers:
        return record(args.backbone, results, seeds, time.perf_counter() - start, args.jobs)
    # The ensemble rows are the plain-CE seeds': recomputed when those were trained here, kept as recorded otherwise.
    ensembles: list[MethodResult] = []
    dev: dict[str, list[float]] = {}
    if any(name == "meld_ce" for _, name in methods):
        ensembles, dev = ensemble_results(args.backbone, seeds, args.runs, data_dir, cache)
    dev |= {name: [meld_test_report(run_of(name, args.backbone, s, args.runs), "dev").macro_f1 for s in seeds]
            for _, name in methods}  # fmt: skip
    return record(f"levers{args.backbone}", results + ensembles, seeds, time.perf_counter() - start, args.jobs,
                  dev_macro_f1=dev)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())

"""The gate under the null: how often it promotes a candidate that is no better than the champion.

    python -m benchmarks.gate_null [--jobs 200] [--data-dir DIR] [--state-dir DIR] [--out docs/img]

Real data, the shipped model and the gate's own code:
- Production feedback: every MELD test conversation scored by the shipped default through the serving runtime
  (model/runtime.py, fp32, text), which gives the utterance embeddings the service logs; each turn comes back
  with its gold label; context modes alternate by conversation, as production uses both.
- Base corpora: MELD train and dev encoded by the shipped encoder, as a job assembles them
  (retraining/dataset.py `base_dialogues`); tier 2 trains on MELD train.
- Frozen features: the shipped context graph with its classifier's input exposed (retraining/graphs.py), once.
- Job j: the feedback is split by conversation with the product's split function and fraction under a salt of
  its own (the product's salt is fixed; another salt stands for another production sample of conversations).
  The champion is tier 2's head (retraining/tier2_head.py `train_head`, the job defaults) trained with seed 2j
  on MELD train and the training conversations; the candidate is the same training with seed 2j + 1, on the same
  data, with no shift: no better than the champion by construction. The gate's paired test and rules
  (retraining/gate.py `paired_comparison` and `compare`, the GateConfig defaults) judge them on the held-out
  conversations, from the heads' logits on the frozen features (what the exported graph computes; ONNX parity
  is the gate's other check and plays no part here).

Reports: the share of jobs promoted with its exact (Clopper-Pearson) 95% interval, the distribution of the two
lower bounds the rules read, the previous gate's point-margin rule on the same jobs for comparison, a histogram
(OUT/gate_null_bounds.png) and every job's figures (OUT/gate_null.json). A job's outcome depends only on its
index, so a run resumes: the jobs OUT/gate_null.json already holds for the same model and gate are kept, and
`--jobs` can grow run after run (each job trains two heads: about 3.5 s on one CPU thread). With
`--champion-shift S` the champion leans toward the majority class by S on its logit, so the candidate is truly
better: the same jobs then measure the gate's power (OUT/gate_shift_S.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import binomtest

from core.settings import data_dir_or_exit, load_settings
from model.artifact import ModelArtifact, load_artifact
from model.data.meld import group_dialogues, read_utterances
from model.default_model import shipped_artifact
from model.preprocess import speaker_indices
from model.runtime import InferenceRuntime, UtteranceInput
from retraining.dataset import HELDOUT_FRACTION, base_dialogues, conversation_key, is_heldout
from retraining.gate import compare, paired_comparison
from retraining.gate_config import GateConfig
from retraining.graphs import FEATURES_OUTPUT, Dialogue, EmotionHead, run_context, session, with_features_output
from retraining.paired import MACRO_F1, MINORITY_RECALL
from retraining.tier2_head import HeadTraining, train_head
from training.metrics import MetricsReport, compute_metrics

DIALOGUES_PER_CALL = 32


@dataclass(frozen=True)
class Features:
    """Frozen classifier inputs: MELD train (tier 2's base data) and the labelled feedback conversations."""

    base: np.ndarray  # [M, F]
    base_labels: np.ndarray  # [M]
    feedback: np.ndarray  # [N, F]
    labels: np.ndarray  # [N]
    conversations: list[str]  # [N] conversation key of each feedback turn


@dataclass(frozen=True)
class JobOutcome:
    job: int
    promoted: bool
    reasons: list[str]
    heldout_turns: int
    heldout_conversations: int
    minority_recall_gain: dict[str, float] | None
    macro_f1_gain: dict[str, float]
    previous_rule_promoted: bool  # the point margins the gate used before (+0.005 macro F1, +0.02 minority recall)


def feedback_dialogues(artifact: ModelArtifact, data_dir: Path) -> tuple[list[Dialogue], np.ndarray, list[str]]:
    """MELD test conversations as the service logs them: (embeddings, speakers, causal) per conversation, the
    gold label and conversation key of every turn."""
    runtime = InferenceRuntime.load(artifact.path, device="cpu")
    conversations = group_dialogues(read_utterances(data_dir, "test"))
    dialogues: list[Dialogue] = []
    for first in range(0, len(conversations), DIALOGUES_PER_CALL):
        chunk = conversations[first : first + DIALOGUES_PER_CALL]
        turns = [UtteranceInput(u.text, None, u.speaker) for d in chunk for u in d.utterances]
        embeddings = np.split(runtime.encode(turns), np.cumsum([len(d.utterances) for d in chunk])[:-1])
        for index, (dialogue, vectors) in enumerate(zip(chunk, embeddings, strict=True)):
            speakers = speaker_indices([u.speaker for u in dialogue.utterances], artifact.preprocessing.max_speakers)
            dialogues.append((vectors, speakers, (first + index) % 2 == 0))
    labels = np.array([artifact.emotions.index(u.emotion) for d in conversations for u in d.utterances])
    keys = [conversation_key(f"meld-test-{d.dialogue_id}", "") for d in conversations for _ in d.utterances]
    return dialogues, labels, keys


def frozen_features(artifact: ModelArtifact, data_dir: Path, cache_dir: Path, base_max: int | None) -> Features:
    graph = session(with_features_output(artifact.context_path))
    base = base_dialogues(data_dir, artifact, cache_dir, max_dialogues=base_max)
    if base is None:
        raise SystemExit(f"no MELD under {data_dir}")
    train = base.labelled(heldout=False)
    (base_features,) = run_context(graph, base.dialogues(), [FEATURES_OUTPUT])
    dialogues, labels, keys = feedback_dialogues(artifact, data_dir)
    (feedback,) = run_context(graph, dialogues, [FEATURES_OUTPUT])
    return Features(base_features[train], base.labels[train], feedback, labels, keys)


def logits(head: EmotionHead, features: np.ndarray) -> np.ndarray:
    return features @ head.weight.T + head.bias


def _previous_rule(champion: MetricsReport, candidate: MetricsReport) -> bool:
    """The gate before the paired test: point margins on macro F1 and minority recall, a weighted F1 guard."""
    recall_gain = (candidate.minority_recall or 0.0) - (champion.minority_recall or 0.0)
    return (
        candidate.macro_f1 - champion.macro_f1 >= 0.005
        and recall_gain >= 0.02
        and champion.weighted_f1 - candidate.weighted_f1 <= 0.01
    )


def null_job(
    job: int,
    features: Features,
    names: Sequence[str],
    minority: Sequence[str],
    config: GateConfig,
    training: HeadTraining,
    fraction: float = HELDOUT_FRACTION,
    champion_shift: float = 0.0,
) -> JobOutcome:
    """One simulated job: champion and candidate heads from two seeds on the same data, judged by the gate; with
    `champion_shift`, the champion's logit of the majority class is raised by it (a champion leaning toward the
    majority, which the candidate is genuinely better than)."""
    held = np.array([is_heldout(key, fraction, salt=f"gate-null-{job}") for key in features.conversations])
    x = np.concatenate([features.base, features.feedback[~held]])
    y = np.concatenate([features.base_labels, features.labels[~held]])
    champion_head, candidate_head = (
        train_head(x, y, len(names), dataclasses.replace(training, seed=2 * job + k)) for k in (0, 1)
    )
    labels, test = features.labels[held], features.feedback[held]
    lean = np.zeros(len(names))
    lean[np.bincount(y, minlength=len(names)).argmax()] = champion_shift
    before, after = (logits(champion_head, test) + lean).argmax(axis=1), logits(candidate_head, test).argmax(axis=1)
    conversations = [key for key, h in zip(features.conversations, held, strict=True) if h]
    paired = paired_comparison(labels, before, after, conversations, names, minority, config)
    champion, candidate = (compute_metrics(labels, p, names, minority=minority) for p in (before, after))
    reasons = compare(champion, candidate, paired, config)
    recall = paired.gains[MINORITY_RECALL]
    return JobOutcome(
        job=job,
        promoted=not reasons,
        reasons=reasons,
        heldout_turns=paired.turns,
        heldout_conversations=paired.conversations,
        minority_recall_gain=None if recall is None else asdict(recall),
        macro_f1_gain=asdict(paired.gains[MACRO_F1]),  # type: ignore[arg-type]
        previous_rule_promoted=_previous_rule(champion, candidate),
    )


def simulate(
    features: Features,
    names: Sequence[str],
    minority: Sequence[str],
    jobs: Sequence[int],
    *,
    config: GateConfig | None = None,
    training: HeadTraining | None = None,
    champion_shift: float = 0.0,
    progress: Callable[[JobOutcome], None] = lambda _outcome: None,
) -> list[JobOutcome]:
    outcomes = []
    for job in jobs:
        config, training = config or GateConfig(), training or HeadTraining()
        outcomes.append(null_job(job, features, names, minority, config, training, champion_shift=champion_shift))
        progress(outcomes[-1])
    return outcomes


def earlier_outcomes(path: Path, setup: dict[str, Any]) -> list[JobOutcome]:
    """The jobs a previous run wrote to `path` with the same `setup` (model, gate, champion shift)."""
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text(encoding="utf-8"))
    if any(earlier.get(key) != json.loads(json.dumps(value)) for key, value in setup.items()):
        return []
    return [JobOutcome(**job) for job in earlier["jobs"]]


@dataclass(frozen=True)
class Rate:
    promoted: int
    jobs: int
    low: float
    high: float  # exact 95% interval of the promotion rate

    @classmethod
    def of(cls, promoted: int, jobs: int) -> Rate:
        interval = binomtest(promoted, jobs).proportion_ci(confidence_level=0.95, method="exact")
        return cls(promoted, jobs, float(interval.low), float(interval.high))

    def __str__(self) -> str:
        return (
            f"{self.promoted} of {self.jobs} ({self.promoted / self.jobs:.1%}; 95% CI {self.low:.1%}-{self.high:.1%})"
        )


def _quantiles(values: Sequence[float]) -> str:
    q = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    return " | ".join(f"{v:+.3f}" for v in q)


def markdown(outcomes: Sequence[JobOutcome], config: GateConfig) -> str:
    lower_recall = [o.minority_recall_gain["lower"] for o in outcomes if o.minority_recall_gain]
    lower_f1 = [o.macro_f1_gain["lower"] for o in outcomes]
    estimate_recall = [o.minority_recall_gain["estimate"] for o in outcomes if o.minority_recall_gain]
    turns = [o.heldout_turns for o in outcomes]
    conversations = [o.heldout_conversations for o in outcomes]
    lines = [
        f"- gate promoted: {Rate.of(sum(o.promoted for o in outcomes), len(outcomes))}",
        f"- minority-recall bound alone above 0: {Rate.of(sum(v > 0 for v in lower_recall), len(outcomes))}",
        f"- macro F1 bound alone above -{config.macro_f1_tolerance:g}: "
        f"{Rate.of(sum(v > -config.macro_f1_tolerance for v in lower_f1), len(outcomes))}",
        f"- the previous point-margin rule would have promoted: "
        f"{Rate.of(sum(o.previous_rule_promoted for o in outcomes), len(outcomes))}",
        f"- held-out set per job: {min(turns)}-{max(turns)} turns in {min(conversations)}-{max(conversations)} "
        f"conversations; {config.bootstrap_replicates} replicates, {config.confidence:.0%} intervals",
        "",
        "| per job | 5% | 25% | median | 75% | 95% |",
        "|---|--:|--:|--:|--:|--:|",
        f"| minority-recall gain (point) | {_quantiles(estimate_recall)} |",
        f"| its lower bound (rule: > 0) | {_quantiles(lower_recall)} |",
        f"| macro F1 gain's lower bound (rule: > -{config.macro_f1_tolerance:g}) | {_quantiles(lower_f1)} |",
    ]
    return "\n".join(lines)


def plot(outcomes: Sequence[JobOutcome], config: GateConfig, path: Path) -> Path:
    figure = Figure(figsize=(10, 3.6))
    FigureCanvasAgg(figure)
    panels = (
        (
            "minority-recall gain: lower bound",
            [o.minority_recall_gain["lower"] for o in outcomes if o.minority_recall_gain],
            0.0,
        ),
        ("macro F1 gain: lower bound", [o.macro_f1_gain["lower"] for o in outcomes], -config.macro_f1_tolerance),
    )
    for axis, (title, values, threshold) in zip(figure.subplots(1, 2), panels, strict=True):
        axis.hist(values, bins=30, color="#4c72b0")
        axis.axvline(threshold, color="#c44e52", linestyle="--", label=f"promotes above {threshold:+g}")
        axis.set_title(f"{title} ({len(values)} null jobs)")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="simulated jobs (each trains two tier-2 heads)")
    parser.add_argument("--data-dir", type=Path, default=None, help="corpora directory (default: settings)")
    parser.add_argument("--state-dir", type=Path, default=None, help="where the shipped default is assembled")
    parser.add_argument("--base-max-dialogues", type=int, default=None, help="MELD train dialogues (default all)")
    parser.add_argument("--out", type=Path, default=Path("docs/img"), help="directory for the JSON and the plot")
    parser.add_argument(
        "--champion-shift",
        type=float,
        default=0.0,
        help="raise the champion's majority-class logit by this (0: the null; > 0: a candidate truly better)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one linear layer: more threads only contend (10x slower on a shared 2-core host)
    settings = load_settings()
    data_dir = data_dir_or_exit(args.data_dir)
    state_dir = args.state_dir or settings.state_dir
    artifact = load_artifact(shipped_artifact(state_dir))
    minority = [name for name in settings.minority_classes if name in artifact.emotions.names]
    started = time.monotonic()
    features = frozen_features(artifact, data_dir, state_dir / "cache" / "base", args.base_max_dialogues)
    print(f"features: {len(features.base_labels)} base turns, {len(features.labels)} feedback turns", flush=True)

    def progress(outcome: JobOutcome) -> None:
        bound = outcome.minority_recall_gain["lower"] if outcome.minority_recall_gain else float("nan")
        print(f"job {outcome.job}: {'PROMOTED' if outcome.promoted else 'rejected'}, minority bound {bound:+.3f}")

    config, shift = GateConfig(), args.champion_shift
    stem = "gate_null" if shift == 0 else f"gate_shift_{shift:g}"
    path, setup = (
        args.out / f"{stem}.json",
        {"model": artifact.version, "gate": asdict(config), "champion_shift": shift},
    )
    done = {o.job: o for o in earlier_outcomes(path, setup) if o.job < args.jobs}
    todo = [job for job in range(args.jobs) if job not in done]
    print(f"{len(done)} jobs from {path}, {len(todo)} to run", flush=True)
    names = artifact.emotions.names
    fresh = simulate(features, names, minority, todo, config=config, champion_shift=shift, progress=progress)
    outcomes = sorted([*done.values(), *fresh], key=lambda o: o.job)
    table = markdown(outcomes, config)
    what = "null jobs" if shift == 0 else f"jobs, champion's majority logit +{shift:g}"
    print(f"\n{artifact.version}, {len(outcomes)} {what}, {time.monotonic() - started:.0f} s\n\n{table}")
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**setup, "jobs": [asdict(o) for o in outcomes]}, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path} and {plot(outcomes, config, args.out / f'{stem}_bounds.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

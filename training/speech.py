"""Train the speech emotion head and the late-fusion weight, evaluate them on held-out speakers, and save them.

    flock -w 1800 /tmp/equipoise-cpu.lock python -m training.speech --data-dir ../shared/data \
        --out model/default/speech --report docs/reports/speech.md

Head: `AudioEmotionHead` (LayerNorm -> Linear) on frozen Whisper features (training/speech_features.py). It is fitted
as a class-balanced multinomial logistic regression on standardised layer-normed features, and the
standardisation is folded into the LayerNorm's affine, so the saved head is exactly the graph's. C (inverse L2
strength) is chosen on the dev speakers (RAVDESS and EmoDB), mean macro F1 over clean and mu-law. T_a is fitted by
NLL on the dev speakers over every line. The fusion weight w follows docs/SPEECH.md's rule on MELD dev text
(the shipped default's runtime) paired with dev speakers' clips.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from scipy.optimize import minimize_scalar
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from core.resampling import turn_weights
from core.settings import data_dir_or_exit
from model.data.meld import group_dialogues, read_utterances
from model.data.speech import EMOTION_MAP, Clip, split_by_speaker, split_by_text
from model.labels import EMOTIONS
from training.metrics import resampled_f1
from training.speech_features import PHONE_VARIANTS, load_features

LINES = ("clean", *PHONE_VARIANTS)
CLASSES = len(EMOTIONS)
NEUTRAL = EMOTIONS.index("neutral")


@dataclass(frozen=True)
class SpeechRecipe:
    speech_layers: tuple[int, ...] = (2, 3)
    augmented: int = 2  # PhoneChain draws per clip
    seed: int = 0
    c_grid: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1)
    # steps of 0.01 where the neutral-audio cost is steep (up to 0.2), then 0.05
    fusion_grid: tuple[float, ...] = tuple(round(0.01 * k, 2) for k in range(20)) + tuple(
        round(0.05 * k, 2) for k in range(4, 21)
    )
    text_floor: float = 0.01  # neutral audio may cost dev macro F1 at most this much
    fusion_lines: tuple[str, ...] = ("clean", "mulaw")  # the rule must hold on each
    replicates: int = 2000


@dataclass(frozen=True)
class Head:
    norm_weight: np.ndarray
    norm_bias: np.ndarray
    weight: np.ndarray  # [C, F]
    bias: np.ndarray
    c: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        return (_layer_norm(x) * self.norm_weight + self.norm_bias) @ self.weight.T + self.bias

    def state(self) -> dict[str, np.ndarray]:
        return {
            "norm.weight": self.norm_weight.astype(np.float32),
            "norm.bias": self.norm_bias.astype(np.float32),
            "linear.weight": self.weight.astype(np.float32),
            "linear.bias": self.bias.astype(np.float32),
        }


def _layer_norm(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(axis=-1, keepdims=True) + eps)


def fit_head(x: np.ndarray, y: np.ndarray, c: float) -> Head:
    """Class-balanced multinomial logistic regression on standardised LayerNorm(x), folded into the head."""
    z = _layer_norm(x)
    mean, scale = z.mean(axis=0), z.std(axis=0) + 1e-6
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=3000)
    model.fit((z - mean) / scale, y)
    weight = np.zeros((CLASSES, x.shape[1]))
    bias = np.full(CLASSES, -30.0)  # a class absent from training is never predicted
    weight[model.classes_], bias[model.classes_] = model.coef_, model.intercept_
    return Head(1.0 / scale, -mean / scale, weight, bias, c)


def speaker_centred(x: np.ndarray, speakers: np.ndarray) -> np.ndarray:
    """Each row minus the mean row of its speaker (a request's turns of one speaker)."""
    out = x.copy()
    for speaker in np.unique(speakers):
        rows = speakers == speaker
        out[rows] -= x[rows].mean(axis=0)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    def nll(log_t: float) -> float:
        p = softmax(logits / np.exp(log_t))
        return float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


def macro_f1(truth: np.ndarray, predicted: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Macro F1 over the classes present in `truth`; with weights [R, N] (resample multiplicities) one per row."""
    w = np.ones((1, len(truth))) if weights is None else weights
    return resampled_f1(truth, predicted, w, np.unique(truth))[0].mean(axis=1)


@dataclass(frozen=True)
class Score:
    estimate: float
    replicates: np.ndarray

    def __sub__(self, other: Score) -> Score:
        return Score(self.estimate - other.estimate, self.replicates - other.replicates)

    def cell(self, sign: str = "") -> str:
        low, high = np.quantile(self.replicates, [0.025, 0.975])
        return f"{self.estimate:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"

    def summary(self) -> dict[str, float]:
        low, high = np.quantile(self.replicates, [0.025, 0.975])
        return {"macro_f1": round(self.estimate, 4), "low": round(float(low), 4), "high": round(float(high), 4)}


def scored(truth: np.ndarray, predicted: np.ndarray, weights: np.ndarray) -> Score:
    return Score(float(macro_f1(truth, predicted)[0]), macro_f1(truth, predicted, weights))


# ---- data views --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """The clips, labels and features of every variant, and named row sets (splits)."""

    clips: tuple[Clip, ...]
    y: np.ndarray
    speakers: np.ndarray  # "corpus/speaker"
    features: dict[str, np.ndarray]

    def rows(self, corpus: str, split: str, by: str = "speaker") -> np.ndarray:
        members = set(getattr((split_by_speaker if by == "speaker" else split_by_text)(self.clips), split))
        return np.array([i for i, c in enumerate(self.clips) if c.corpus == corpus and c in members], dtype=int)

    def speaker_rows(self, corpus: str, speaker: str) -> np.ndarray:
        return np.flatnonzero(self.speakers == f"{corpus}/{speaker}")

    def x(self, variant: str, rows: np.ndarray, centred: bool = False) -> np.ndarray:
        x = self.features[variant][rows]
        return speaker_centred(x, self.speakers[rows]) if centred else x

    def training_set(self, rows: np.ndarray, augmented: bool, centred: bool) -> tuple[np.ndarray, np.ndarray]:
        variants = ["clean", *(v for v in self.features if v.startswith("aug"))] if augmented else ["clean"]
        x = np.concatenate([self.x(v, rows, centred) for v in variants])
        return x, np.tile(self.y[rows], len(variants))


def corpus_view(data_dir: Path, cache_dir: Path, recipe: SpeechRecipe) -> tuple[Corpus, float]:
    found = load_features(data_dir, cache_dir, recipe.speech_layers, recipe.augmented, recipe.seed)
    y = np.array([EMOTIONS.index(c.emotion) for c in found.clips])
    speakers = np.array([f"{c.corpus}/{c.speaker}" for c in found.clips])
    return Corpus(found.clips, y, speakers, found.features), found.parity


def split_rows(data: Corpus) -> dict[str, np.ndarray]:
    """Named row sets: train / dev / test of the speaker split, and the TESS reverse and word splits."""
    rows = {f"{c}/{s}": data.rows(c, s) for c in ("ravdess", "emodb", "tess") for s in ("train", "dev", "test")}
    rows["tess/OAF"], rows["tess/YAF"] = data.speaker_rows("tess", "OAF"), data.speaker_rows("tess", "YAF")
    rows["tess/word-train"] = np.concatenate([data.rows("tess", s, "text") for s in ("train", "dev")])
    rows["tess/word-test"] = data.rows("tess", "test", "text")
    return rows


# ---- head: selection, evaluation ---------------------------------------------------------------------------

CONFIGS = {"clean only": (False, False), "augmented": (True, False), "augmented, speaker-centred": (True, True)}
MAIN = "augmented"
# test set -> (training rows, scored rows) by name in split_rows
HEADS = {
    "RAVDESS test actors": ("speaker", "ravdess/test"),
    "EmoDB test speakers": ("speaker", "emodb/test"),
    "TESS YAF (trained on OAF)": ("speaker", "tess/YAF"),
    "TESS OAF (trained on YAF)": ("reverse", "tess/OAF"),
    "TESS held-out words": ("word", "tess/word-test"),
}


def training_rows(rows: dict[str, np.ndarray], kind: str) -> np.ndarray:
    tess = {"speaker": "tess/OAF", "reverse": "tess/YAF", "word": "tess/word-train"}[kind]
    return np.concatenate([rows["ravdess/train"], rows["emodb/train"], rows[tess]])


def select_c(data: Corpus, train: np.ndarray, dev: np.ndarray, augmented: bool, centred: bool, grid) -> Head:
    """The head of the C with the best dev macro F1 (mean over clean and mu-law)."""
    x, y = data.training_set(train, augmented, centred)

    def dev_score(head: Head) -> float:
        lines = ("clean", "mulaw")
        return float(np.mean([macro_f1(data.y[dev], head.logits(data.x(v, dev, centred)).argmax(1))[0] for v in lines]))

    heads = [fit_head(x, y, c) for c in grid]
    return max(heads, key=dev_score)


def evaluate_heads(data: Corpus, recipe: SpeechRecipe, rows: dict[str, np.ndarray], progress: tqdm) -> tuple:
    """Per config: the head per training kind (C chosen on dev for the main config), and Score per (test set,
    line)."""
    dev = np.concatenate([rows["ravdess/dev"], rows["emodb/dev"]])
    heads: dict[tuple[str, str], Head] = {}
    scores: dict[tuple[str, str, str], Score] = {}
    c = select_c(data, training_rows(rows, "speaker"), dev, *CONFIGS[MAIN], recipe.c_grid).c
    for config, (augmented, centred) in CONFIGS.items():  # the ablations keep the main config's C
        for kind in ("speaker", "reverse", "word"):
            x, y = data.training_set(training_rows(rows, kind), augmented, centred)
            heads[(config, kind)] = fit_head(x, y, c)
        for name, (kind, test) in HEADS.items():
            weights = turn_weights(np.arange(len(rows[test])), recipe.replicates, recipe.seed)
            for line in LINES:
                predicted = heads[(config, kind)].logits(data.x(line, rows[test], centred)).argmax(1)
                scores[(config, name, line)] = scored(data.y[rows[test]], predicted, weights)
        progress.update()
    return heads, scores


# ---- fusion ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeldText:
    logits: np.ndarray  # [N, C] the shipped default's raw emotion logits, text only
    y: np.ndarray
    dialogue: np.ndarray


def meld_text(data_dir: Path, state_dir: Path, cache_dir: Path, split: str) -> MeldText:
    """Raw text logits of the shipped default through the serving runtime (bidirectional context), cached."""
    from model.default_model import read_release, shipped_artifact
    from model.runtime import InferenceRuntime, UtteranceInput

    dialogues = group_dialogues(read_utterances(data_dir, split))
    turns = [u for d in dialogues for u in d.utterances]
    y = np.array([EMOTIONS.index(u.emotion) for u in turns])
    dialogue = np.array([u.dialogue_id for u in turns])
    path = Path(cache_dir) / f"meld_{read_release()['version']}_{split}.npy"
    if path.is_file():
        return MeldText(np.load(path), y, dialogue)
    runtime = InferenceRuntime.load(shipped_artifact(state_dir), device="cpu", intra_op_threads=2)
    inputs = [[UtteranceInput(u.text, None, u.speaker) for u in d.utterances] for d in dialogues]
    predictions = [turn for batch in _chunks(inputs, 16) for dial in runtime.classify(batch, False) for turn in dial]
    if list(runtime.emotions.names) != list(EMOTIONS):
        raise ValueError(f"the default's emotions {runtime.emotions.names} are not {EMOTIONS}")
    probs = np.stack([p.emotion_probs for p in predictions]).astype(np.float64)
    logits = runtime.artifact.calibration.temperature * np.log(np.maximum(probs, 1e-30))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, logits)
    return MeldText(logits, y, dialogue)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def paired_evidence(evidence: np.ndarray, clip_y: np.ndarray, turn_y: np.ndarray, mode: str, seed: int) -> np.ndarray:
    """Per MELD turn, the audio evidence of a clip drawn (seeded) from the pool: of the turn's emotion
    ("congruent") or neutral ("neutral"). Emotions missing from the pool fall back to no audio (0 evidence)."""
    rng = np.random.default_rng([seed, 0 if mode == "neutral" else 1])
    wanted = np.full_like(turn_y, NEUTRAL) if mode == "neutral" else turn_y
    out = np.zeros((len(turn_y), evidence.shape[1]))
    for emotion in np.unique(wanted):
        pool = np.flatnonzero(clip_y == emotion)
        turns = np.flatnonzero(wanted == emotion)
        if len(pool):
            out[turns] = evidence[rng.choice(pool, len(turns))]
    return out


def fused_predictions(text: np.ndarray, evidence: np.ndarray, w: float) -> np.ndarray:
    return (text + w * evidence).argmax(1)


def choose_weight(text: MeldText, evidence: dict[str, dict[str, np.ndarray]], recipe: SpeechRecipe) -> tuple:
    """The w of the largest mean congruent gain over `fusion_lines` among those whose neutral-audio dev macro F1
    stays within text_floor of text-only on every line; the dev curve for the report."""
    base = float(macro_f1(text.y, text.logits.argmax(1))[0])
    curve = []
    for w in recipe.fusion_grid:
        row = {"w": w}
        for line in recipe.fusion_lines:
            for mode in ("neutral", "congruent"):
                row[f"{line}/{mode}"] = float(
                    macro_f1(text.y, fused_predictions(text.logits, evidence[line][mode], w))[0]
                )
        curve.append(row)
    allowed = [
        r for r in curve if all(r[f"{line}/neutral"] >= base - recipe.text_floor for line in recipe.fusion_lines)
    ]
    best = max(allowed, key=lambda r: (np.mean([r[f"{line}/congruent"] for line in recipe.fusion_lines]), -r["w"]))
    return float(best["w"]), base, curve


def fusion_pools(data: Corpus, rows: dict[str, np.ndarray], part: str) -> np.ndarray:
    """Clips paired with MELD turns: dev speakers for MELD dev; held-out speakers (RAVDESS, EmoDB test, TESS
    YAF) for MELD test."""
    if part == "dev":
        return np.concatenate([rows["ravdess/dev"], rows["emodb/dev"]])
    return np.concatenate([rows["ravdess/test"], rows["emodb/test"], rows["tess/YAF"]])


def audio_evidence(head: Head, temperature: float, x: np.ndarray) -> np.ndarray:
    """audio_logits / T_a - log prior_a with the uniform prior of a class-balanced head."""
    return head.logits(x) / temperature - np.log(1.0 / CLASSES)


def fusion_evidence(data: Corpus, pool: np.ndarray, head: Head, temperature: float, text: MeldText, seed: int):
    """line -> mode -> [N, C] evidence paired with the MELD turns."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for line in LINES:
        evidence = audio_evidence(head, temperature, data.x(line, pool))
        out[line] = {m: paired_evidence(evidence, data.y[pool], text.y, m, seed) for m in ("neutral", "congruent")}
    return out


def fusion_test(text: MeldText, evidence: dict, w: float, recipe: SpeechRecipe) -> dict[tuple[str, str], Score]:
    weights = turn_weights(text.dialogue, recipe.replicates, recipe.seed)
    scores = {("text only", "-"): scored(text.y, text.logits.argmax(1), weights)}
    for line in LINES:
        for mode in ("neutral", "congruent"):
            predicted = fused_predictions(text.logits, evidence[line][mode], w)
            scores[(mode, line)] = scored(text.y, predicted, weights)
    return scores


# ---- command -----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="corpora directory (default: settings)")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "equipoise" / "speech")
    parser.add_argument("--state-dir", type=Path, default=None, help="where the default is assembled (cache dir)")
    parser.add_argument("--out", type=Path, default=Path("model/default/speech"), help="head, numbers, JSON")
    parser.add_argument("--report", type=Path, default=None, help="also write the Markdown report here")
    parser.add_argument("--augmented", type=int, default=SpeechRecipe.augmented)
    parser.add_argument("--seed", type=int, default=SpeechRecipe.seed)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    data_dir = data_dir_or_exit(args.data_dir)
    recipe = SpeechRecipe(augmented=args.augmented, seed=args.seed)
    progress = tqdm(total=len(CONFIGS) + 4, desc="speech", mininterval=5)
    data, parity = corpus_view(data_dir, args.cache_dir, recipe)
    progress.update()
    rows = split_rows(data)
    heads, head_scores = evaluate_heads(data, recipe, rows, progress)
    head = heads[(MAIN, "speaker")]
    dev = np.concatenate([rows["ravdess/dev"], rows["emodb/dev"]])
    dev_logits = np.concatenate([head.logits(data.x(line, dev)) for line in LINES])
    temperature = fit_temperature(dev_logits, np.tile(data.y[dev], len(LINES)))
    state_dir = args.state_dir or args.cache_dir / "state"
    meld = {part: meld_text(data_dir, state_dir, args.cache_dir, part) for part in ("dev", "test")}
    progress.update()
    evidence = {
        part: fusion_evidence(data, fusion_pools(data, rows, part), head, temperature, meld[part], recipe.seed)
        for part in ("dev", "test")
    }
    w, dev_text, curve = choose_weight(meld["dev"], evidence["dev"], recipe)
    fusion = fusion_test(meld["test"], evidence["test"], w, recipe)
    progress.update()
    figures = dict(
        parity=parity, temperature=temperature, fusion_weight=w, dev_text_macro_f1=dev_text, curve=curve,
        c={config: heads[(config, "speaker")].c for config in CONFIGS},
    )  # fmt: skip
    save(args.out, head, recipe, data, rows, figures, head_scores, fusion)
    text = report(recipe, figures, head_scores, fusion, rows)
    progress.close()
    print(text)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text)


HEAD_FILE, JSON_FILE = "audio_head.safetensors", "speech.json"


def save(out: Path, head: Head, recipe: SpeechRecipe, data: Corpus, rows: dict, figures: dict, head_scores: dict,
         fusion: dict) -> None:  # fmt: skip
    """audio_head.safetensors (float32, the AudioEmotionHead state) and speech.json (the numbers the model reads:
    speech_layers, audio_temperature, audio_prior, fusion_weight; and how they were made)."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(head.state(), str(out / HEAD_FILE))
    speakers = {name: sorted({data.clips[i].speaker for i in r}) for name, r in rows.items() if "word" not in name}
    record = {
        "speech_layers": list(recipe.speech_layers),
        "audio_temperature": round(figures["temperature"], 6),
        "audio_prior": [1.0 / CLASSES] * CLASSES,
        "fusion_weight": figures["fusion_weight"],
        "emotions": list(EMOTIONS),
        "head": {"file": HEAD_FILE, "features": int(head.weight.shape[1]), "C": head.c, "class_balanced": True},
        "recipe": _json_safe(asdict(recipe)),
        "data": {
            "corpora": {c: int(sum(clip.corpus == c for clip in data.clips)) for c in ("ravdess", "tess", "emodb")},
            "label_map": {c: dict(m) for c, m in EMOTION_MAP.items()},
            "training": "speaker-split train speakers of RAVDESS, EmoDB and TESS (OAF): clean + augmented draws",
            "speakers": speakers,
            "tess_words_held_out": sorted({data.clips[i].text for i in rows["tess/word-test"]}),
        },
        "figures": {
            "onnx_vs_torch_feature_difference": figures["parity"],
            "C_by_config": figures["c"],
            "dev_text_macro_f1": round(figures["dev_text_macro_f1"], 4),
            "fusion_dev_curve": [{k: round(v, 4) for k, v in row.items()} for row in figures["curve"]],
            "audio_only": {f"{c} | {t} | {line}": s.summary() for (c, t, line), s in head_scores.items()},
            "meld_test_fusion": {f"{mode} | {line}": s.summary() for (mode, line), s in fusion.items()},
        },
    }
    (out / JSON_FILE).write_text(json.dumps(record, indent=1) + "\n")


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def report(recipe: SpeechRecipe, figures: dict, head_scores: dict, fusion: dict, rows: dict) -> str:
    configs = list(CONFIGS)
    lines = ["## Audio-only macro F1 on held-out speakers [95% bootstrap over clips]", ""]
    lines.append(f"C chosen on dev speakers: {figures['c']}; T_a = {figures['temperature']:.3f}; "
                 f"ONNX vs PyTorch pooled features: max |diff| {figures['parity']:.2g}")  # fmt: skip
    lines += ["", "| test set | line | " + " | ".join(configs) + " | augmented − clean only | centred − not |"]
    lines.append("|---" * (len(configs) + 4) + "|")
    for name, (_, test) in HEADS.items():
        for line in LINES:
            s = [head_scores[(c, name, line)] for c in configs]
            cells = [x.cell() for x in s] + [(s[1] - s[0]).cell("+"), (s[2] - s[1]).cell("+")]
            lines.append(f"| {name} ({len(rows[test])}) | {line} | " + " | ".join(cells) + " |")
    lines += ["", f"## Fusion on MELD test (w = {figures['fusion_weight']:g}, chosen on dev; dev text-only "
              f"{figures['dev_text_macro_f1']:.3f}) [95% paired bootstrap over dialogues]", ""]  # fmt: skip
    base = fusion[("text only", "-")]
    lines += [
        f"Text only: {base.cell()}",
        "",
        "| audio on every turn | line | macro F1 | − text only |",
        "|---|---|---|---|",
    ]
    for (mode, line), s in fusion.items():
        if mode != "text only":
            lines.append(f"| {mode} | {line} | {s.cell()} | {(s - base).cell('+')} |")
    lines += ["", "## Dev curve (MELD dev, dev speakers' clips)", ""]
    keys = [k for k in figures["curve"][0] if k != "w"]
    lines += ["| w | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {r['w']:g} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |" for r in figures["curve"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""The model card says which data trained which part, on which device, and the MELD figures' intervals."""

from __future__ import annotations

import json

from model.default_model import SHIPPED_DIR, read_release
from training.recipe import Recipe, load_recipe
from training.release import EARLIER_RELEASES_DEVICE, model_card, trained_on
from training.run import RunDir


def _release_without_speech() -> dict:
    release = read_release()
    release.pop("speech", None)
    release["metrics"] = {k: v for k, v in release["metrics"].items() if k != "speech"}
    return release


def test_a_text_model_trained_on_meld_alone_lists_no_speech_corpora_unless_a_speech_head_uses_them() -> None:
    meld_only = load_recipe("meld_ce")
    assert not meld_only.data.speech
    card = model_card(meld_only, _release_without_speech())
    assert "MELD (Friends TV-series dialogues" in card and "RAVDESS" not in card and "calm" not in card
    assert "Text only: its audio path was never trained" in card
    head = json.loads((SHIPPED_DIR / "speech" / "speech.json").read_text(encoding="utf-8"))
    with_head = model_card(meld_only, read_release(), head)
    assert "they train\n  the audio head only" in with_head and "calm" in with_head and "boredom" in with_head


def test_the_card_names_the_training_device_and_prints_meld_intervals_when_the_release_has_them() -> None:
    release = _release_without_speech()
    recipe = Recipe.from_dict(release["recipe"])
    posthoc = {"logit_adjustment_tau": 0.5, "offset": [0.0] * 7}
    release["training"] = {**release["training"], "device": "x86_64 CPU, 2 threads", "posthoc": posthoc}
    release["metrics"]["meld_test_intervals"] = {
        "replicates": 2000,
        "unit": "conversation",
        "weighted_f1": [0.5, 0.6],
        "macro_f1": [0.4, 0.45],
        "f1": {name: [0.1, 0.2] for name in recipe.model.emotions},
    }
    card = model_card(recipe, release)
    assert "Trained on\nx86_64 CPU, 2 threads in" in card and "post-hoc logit adjustment (tau 0.5, tuned" in card
    macro = 100 * release["metrics"]["meld_test"]["macro_f1"]
    assert f"macro F1 {macro:.2f} [40.00, 45.00]" in card and "2,000 bootstrap resamples of whole dialogues" in card
    release["training"].pop("device")
    release["training"].pop("posthoc")
    release["metrics"].pop("meld_test_intervals")
    earlier = model_card(recipe, release)
    assert f"Trained on\n{EARLIER_RELEASES_DEVICE}" in earlier and "bootstrap resamples" not in earlier
    assert "folded into the emotion bias" not in earlier


def test_a_run_from_before_devices_were_recorded_is_placed_by_its_torch_build(tmp_path) -> None:  # noqa: ANN001
    run = RunDir(tmp_path)
    run.config.write_text(json.dumps({"versions": {"torch": "2.13.0+cpu"}}), encoding="utf-8")
    assert trained_on(run, {}) == "a CPU (torch built for CPU only)"
    assert trained_on(run, {"device": "one GPU"}) == "one GPU"
    run.config.write_text(json.dumps({"versions": {"torch": "2.13.0+cu128"}}), encoding="utf-8")
    assert trained_on(run, {}) == "a device the run did not record"

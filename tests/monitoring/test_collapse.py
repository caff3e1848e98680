"""The collapse detector tells a collapse from a label shift, fires once per collapse after consecutive evidence,
and re-arms with hysteresis."""

from __future__ import annotations

from dataclasses import replace

from monitoring.collapse import CollapseDetector, CollapseRules, WindowSignals, assess, recall_floor

RULES = CollapseRules(fire_after=2, clear_after=2, cooldown_windows=4)
HEALTHY = WindowSignals(
    n_predictions=500,
    n_labelled=0,
    majority_share=0.48,
    reference_majority_share=0.47,
    drifted=False,
    minority_recall_measured=None,
    minority_recall_estimated=0.40,
    reference_minority_recall=0.42,
    minority_recall_estimated_upper=0.50,
    mix_p_value=0.5,
)
# More majority-class traffic: the estimated prior moved, the served mix is what it explains, recall holds.
LABEL_SHIFT = replace(HEALTHY, majority_share=0.75, drifted=True, prior_shifted=True, mix_p_value=0.2)
# The model leans to the majority: more majority predictions than the estimated prior explains.
COLLAPSED = replace(LABEL_SHIFT, mix_p_value=1e-5, minority_recall_estimated=0.30, minority_recall_estimated_upper=0.4)


def _fired(stream: list[WindowSignals], detector: CollapseDetector | None = None) -> list[int]:
    detector = detector or CollapseDetector(RULES)
    return [i for i, signals in enumerate(stream) if detector.observe(signals).fired]


def test_a_label_shift_is_not_a_collapse() -> None:
    assert not assess(LABEL_SHIFT, RULES)[0]
    assert _fired([LABEL_SHIFT] * 20) == []


def test_majority_predictions_beyond_what_the_prior_explains_are_a_collapse() -> None:
    suspicious, reasons = assess(COLLAPSED, RULES)
    assert suspicious and "more than the estimated class mix explains" in reasons[0]
    assert not assess(replace(COLLAPSED, majority_share=0.5), RULES)[0], "the majority share must have risen"
    assert not assess(replace(COLLAPSED, mix_p_value=0.02), RULES)[0]


def test_recall_decided_below_the_floor_is_a_collapse_whatever_the_mix() -> None:
    floor = recall_floor(HEALTHY, RULES)  # 0.6 x 0.42 = 0.252 here
    label_free = replace(HEALTHY, minority_recall_estimated=0.15, minority_recall_estimated_upper=floor - 0.01)
    assert assess(label_free, RULES)[0]
    assert not assess(replace(label_free, minority_recall_estimated_upper=floor + 0.01), RULES)[0]
    audited = replace(
        HEALTHY,
        minority_recall_measured=0.1,
        minority_recall_halfwidth=0.08,
        minority_recall_measured_upper=0.2,
        measured_source="audit",
    )
    assert assess(audited, RULES)[0]
    assert not assess(replace(audited, minority_recall_measured_upper=0.3), RULES)[0], "the interval reaches the floor"
    corrected = replace(audited, measured_source="correction")
    assert not assess(corrected, RULES)[0], "corrections are a biased sample: they never fire the detector"


def test_the_floor_follows_the_champions_own_recall() -> None:
    """A champion whose healthy minority recall sits near a fixed line must not be held to that line: its floor
    is a fraction of its own reference, and the fixed floor serves only a champion without one."""
    low_reference = replace(HEALTHY, reference_minority_recall=0.285)
    assert recall_floor(low_reference, RULES) == RULES.minority_recall_ratio * 0.285
    healthy_window = replace(low_reference, minority_recall_estimated=0.21, minority_recall_estimated_upper=0.24)
    assert not assess(healthy_window, RULES)[0]
    assert assess(replace(healthy_window, minority_recall_estimated_upper=0.16), RULES)[0]
    assert recall_floor(replace(HEALTHY, reference_minority_recall=None), RULES) == RULES.minority_recall_floor


def test_an_artifact_without_dev_confusion_falls_back_to_drift_and_recall() -> None:
    older = replace(COLLAPSED, mix_p_value=None, minority_recall_estimated=0.12, minority_recall_estimated_upper=None)
    assert assess(older, RULES)[0]
    assert not assess(replace(older, drifted=False), RULES)[0]
    assert not assess(replace(older, minority_recall_estimated=0.35), RULES)[0]
    decided = replace(older, minority_recall_measured=0.40, minority_recall_halfwidth=0.03, measured_source="audit")
    assert decided.minority_recall(RULES) == (0.40, "measured") and not assess(decided, RULES)[0]
    assert replace(decided, measured_source="correction").minority_recall(RULES) == (0.12, "estimated")


def test_small_windows_never_count() -> None:
    tiny = replace(COLLAPSED, n_predictions=RULES.min_predictions - 1)
    assert _fired([tiny] * 10) == []


def test_stationary_stream_never_fires() -> None:
    assert _fired([HEALTHY] * 100) == []


def test_fires_once_after_consecutive_suspicious_windows() -> None:
    assert _fired([HEALTHY] * 3 + [COLLAPSED] * 20) == [4]


def test_a_single_suspicious_window_is_not_enough() -> None:
    assert _fired([HEALTHY, COLLAPSED, HEALTHY, COLLAPSED, HEALTHY] * 5) == []


def test_rearms_only_after_cooldown_and_healthy_windows() -> None:
    stream = [COLLAPSED] * 2 + [HEALTHY] * 2 + [COLLAPSED] * 2 + [HEALTHY] * 4 + [COLLAPSED] * 2
    # fires at 1; the dip at 4-5 comes before the cooldown ends; re-armed by 6-9; fires again at 11.
    assert _fired(stream) == [1, 11]


def test_replay_reconstructs_the_state_after_an_event() -> None:
    since_event = [HEALTHY] * 5
    rebuilt = CollapseDetector.replay(since_event, RULES, fired_before=True)
    assert rebuilt.armed
    assert not CollapseDetector.replay([HEALTHY], RULES, fired_before=True).armed
    assert _fired([COLLAPSED] * 2, rebuilt) == [1]

"""The collapse detector fires once per collapse, after consecutive evidence, and re-arms with hysteresis."""

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
)
COLLAPSED = replace(HEALTHY, majority_share=0.75, drifted=True, minority_recall_estimated=0.12)


def _fired(stream: list[WindowSignals], detector: CollapseDetector | None = None) -> list[int]:
    detector = detector or CollapseDetector(RULES)
    return [i for i, signals in enumerate(stream) if detector.observe(signals).fired]


def test_every_signal_is_needed() -> None:
    assert assess(COLLAPSED, RULES)[0]
    assert not assess(replace(COLLAPSED, drifted=False), RULES)[0]
    assert not assess(replace(COLLAPSED, majority_share=0.5), RULES)[0]
    assert not assess(replace(COLLAPSED, minority_recall_estimated=0.35), RULES)[0]


def test_measured_recall_overrides_the_estimate_when_the_labels_decide_it() -> None:
    """Precise (half-width within the rules' precision) or wholly on one side of the floor: the measurement."""
    precise = replace(COLLAPSED, n_labelled=5000, minority_recall_measured=0.40, minority_recall_halfwidth=0.03)
    assert not assess(precise, RULES)[0]
    assert precise.minority_recall(RULES) == (0.40, "measured")
    assert assess(replace(precise, minority_recall_measured=None, minority_recall_halfwidth=None), RULES)[0]

    floor = recall_floor(COLLAPSED, RULES)  # 0.252 here
    clearly_above = replace(precise, minority_recall_measured=floor + 0.12, minority_recall_halfwidth=0.1)
    assert clearly_above.minority_recall(RULES) == (floor + 0.12, "measured") and not assess(clearly_above, RULES)[0]
    clearly_below = replace(COLLAPSED, minority_recall_estimated=0.9, minority_recall_measured=0.0)
    clearly_below = replace(clearly_below, minority_recall_halfwidth=0.1)
    assert clearly_below.minority_recall(RULES) == (0.0, "measured") and assess(clearly_below, RULES)[0]


def test_an_imprecise_measurement_straddling_the_floor_leaves_the_judgement_to_the_estimate() -> None:
    floor = recall_floor(COLLAPSED, RULES)
    straddling = replace(COLLAPSED, minority_recall_measured=floor + 0.05, minority_recall_halfwidth=0.1)
    assert straddling.minority_recall(RULES) == (COLLAPSED.minority_recall_estimated, "estimated")
    assert assess(straddling, RULES)[0]
    assert not assess(replace(straddling, minority_recall_estimated=0.4), RULES)[0]


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

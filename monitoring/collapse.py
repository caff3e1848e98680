"""The collapse detector: is the model sliding toward the majority class?

A window is *suspicious* when three signals agree: the majority class's share of predictions rose well
above the champion's reference share, the predicted-class mix drifted significantly, and minority recall
fell below its floor. That recall is the one measured from the window's feedback labels when they decide it
(its 95% interval is within `recall_precision`, or lies wholly on one side of the floor), otherwise the
label-free estimate. Each signal alone is noisy; together they are specific.

The detector fires after `fire_after` consecutive suspicious windows (small windows never count), then
stays disarmed until both `cooldown_windows` windows have passed and `clear_after` consecutive healthy
windows were seen (hysteresis), so one collapse yields one event and one retraining job.

The state is a pure function of the ordered window history since the last event, so the monitor can
rebuild it from stored snapshots after a restart (`CollapseDetector.replay`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from core.settings import MONITOR_RECALL_PRECISION, Settings


@dataclass(frozen=True)
class CollapseRules:
    min_predictions: int = 200
    majority_rise: float = 0.10
    minority_recall_ratio: float = 0.6
    minority_recall_floor: float = 0.25
    fire_after: int = 2
    clear_after: int = 2
    cooldown_windows: int = 6
    # 95% half-width at which a measured minority recall counts as precise: a window's, and the monitor's
    # measurement over the newest labelled predictions (monitoring/job.py)
    recall_precision: float = MONITOR_RECALL_PRECISION


def rules_from_settings(settings: Settings, *, min_predictions: int | None = None) -> CollapseRules:
    """The rules with the configured recall precision; by default a window counts from the rules' own minimum,
    or from the monitor's window size when that is smaller (else no window would ever count)."""
    if min_predictions is None:
        min_predictions = min(settings.monitor_window, CollapseRules.min_predictions)
    return CollapseRules(min_predictions=min_predictions, recall_precision=settings.monitor_recall_precision)


@dataclass(frozen=True)
class WindowSignals:
    n_predictions: int
    n_labelled: int
    majority_share: float
    reference_majority_share: float
    drifted: bool
    minority_recall_measured: float | None
    minority_recall_estimated: float | None
    reference_minority_recall: float | None = None
    minority_recall_halfwidth: float | None = None  # 95% half-width of the measured value

    def minority_recall(self, rules: CollapseRules) -> tuple[float | None, str]:
        """The measured value where the window's labels decide it against the floor, else the estimate."""
        measured, halfwidth = self.minority_recall_measured, self.minority_recall_halfwidth
        if measured is None or halfwidth is None:
            return self.minority_recall_estimated, "estimated"
        if halfwidth <= rules.recall_precision or abs(measured - recall_floor(self, rules)) > halfwidth:
            return measured, "measured"
        return self.minority_recall_estimated, "estimated"


@dataclass(frozen=True)
class Decision:
    fired: bool
    suspicious: bool
    reasons: tuple[str, ...]
    evidence: dict[str, Any]


def recall_floor(signals: WindowSignals, rules: CollapseRules) -> float:
    """A fraction of the champion's own minority recall when known, never below the absolute floor."""
    if signals.reference_minority_recall is None:
        return rules.minority_recall_floor
    return max(rules.minority_recall_floor, rules.minority_recall_ratio * signals.reference_minority_recall)


def assess(signals: WindowSignals, rules: CollapseRules) -> tuple[bool, tuple[str, ...]]:
    """Whether one window is suspicious, and the reasons that held."""
    if signals.n_predictions < rules.min_predictions:
        return False, ()
    rise = signals.majority_share - signals.reference_majority_share
    recall, source = signals.minority_recall(rules)
    floor = recall_floor(signals, rules)
    checks = {
        f"majority share {signals.majority_share:.2f} is {rise:+.2f} over reference": rise >= rules.majority_rise,
        "predicted-class mix drifted": signals.drifted,
        f"minority recall ({source}) {recall if recall is None else round(recall, 3)} below {floor:.3f}": (
            recall is not None and recall < floor
        ),
    }
    held = tuple(reason for reason, ok in checks.items() if ok)
    return len(held) == len(checks), held


@dataclass
class CollapseDetector:
    rules: CollapseRules = field(default_factory=CollapseRules)
    armed: bool = True
    suspicious_streak: int = 0
    healthy_streak: int = 0
    windows_since_fire: int | None = None

    def observe(self, signals: WindowSignals) -> Decision:
        suspicious, reasons = assess(signals, self.rules)
        if signals.n_predictions < self.rules.min_predictions:
            return Decision(False, False, ("window too small",), self._evidence(signals))
        self.suspicious_streak = self.suspicious_streak + 1 if suspicious else 0
        self.healthy_streak = 0 if suspicious else self.healthy_streak + 1
        if self.windows_since_fire is not None:
            self.windows_since_fire += 1
        self._maybe_rearm()
        fired = self.armed and self.suspicious_streak >= self.rules.fire_after
        if fired:
            self.armed, self.windows_since_fire, self.suspicious_streak = False, 0, 0
        return Decision(fired, suspicious, reasons, self._evidence(signals))

    def _maybe_rearm(self) -> None:
        cooled = self.windows_since_fire is None or self.windows_since_fire >= self.rules.cooldown_windows
        if not self.armed and cooled and self.healthy_streak >= self.rules.clear_after:
            self.armed = True

    def _evidence(self, signals: WindowSignals) -> dict[str, Any]:
        return {
            "signals": asdict(signals),
            "floor": recall_floor(signals, self.rules),
            "suspicious_streak": self.suspicious_streak,
            "rules": asdict(self.rules),
        }

    @classmethod
    def replay(
        cls, history: Iterable[WindowSignals], rules: CollapseRules, *, fired_before: bool = False
    ) -> CollapseDetector:
        """Rebuild the state from the windows observed since the last event (or since the champion began)."""
        detector = cls(rules=rules)
        if fired_before:
            detector.armed, detector.windows_since_fire = False, 0
        for signals in history:
            detector.observe(signals)
        return detector

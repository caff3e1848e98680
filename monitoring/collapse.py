"""The collapse detector: is the model sliding toward the majority class, or has the traffic changed its mix?

Two situations raise the majority class's share of predictions. Under *label shift* the traffic holds more
majority-class turns: the class prior estimated without labels (monitoring/prior.py) moves, and the served mix
is what the model's dev confusion behaviour makes of that prior. A balanced model's per-class recall does not
move: nothing is wrong with the model, and no retraining is queued. A *collapse* is the model's own behaviour
changing. A window is suspicious when any of these holds:

- the served mix moved toward the majority class beyond what the estimated prior explains: its consistency test
  rejects it (p < `mix_alpha`) and either the majority class's share rose at least `majority_rise` above the
  reference or the minority classes' share fell under `minority_share_ratio` times theirs. An artifact without a
  calibration record has no dev confusion to test against: for it the older rule stands (the majority share's
  rise, the class-mix drift test and the minority recall below the floor, measured where audit labels decide
  it, else estimated);
- minority recall measured on the window's audit labels (a random sample) is decided below the floor: its 95%
  interval lies wholly under it. Corrections are not a random sample (users correct mistakes), so a recall
  measured on them never fires the detector;
- the label-free minority recall is decided below the floor: its 95% upper bound (bootstrap over the window's
  conversations) lies under it. It is computed on prior-corrected posteriors while label shift explains the
  served mix, else on the posteriors as calibrated (the correction's premise no longer holds).

The floor is a fraction of the champion's own minority recall on its dev set: the detector watches the model
change, and a fixed line near a model's own recall would fire on its healthy traffic. Only a champion without a
recorded reference is held to the fixed floor.

The detector fires after `fire_after` consecutive suspicious windows (small windows never count), then stays
disarmed until both `cooldown_windows` windows have passed and `clear_after` consecutive healthy windows were
seen (hysteresis), so one collapse yields one event and one retraining job.

The state is a pure function of the ordered window history since the last event, so the monitor can
rebuild it from stored snapshots after a restart (`CollapseDetector.replay`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from core.db.models import FeedbackKind
from core.settings import MONITOR_RECALL_PRECISION, Settings
from monitoring.prior import MIX_ALPHA


@dataclass(frozen=True)
class CollapseRules:
    min_predictions: int = 200
    majority_rise: float = 0.10
    minority_share_ratio: float = 0.5  # ... or the minority classes' share of predictions fell under this x reference
    mix_alpha: float = MIX_ALPHA  # the served mix is unexplained by the estimated prior when its test's p is below
    minority_recall_ratio: float = 0.6  # the floor is this x the champion's own minority recall ...
    minority_recall_floor: float = 0.25  # ... or this where it recorded none
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
    minority_recall_measured_upper: float | None = None  # upper end of its (Agresti-Coull) 95% interval
    measured_source: str | None = None  # "audit" (a random sample) or "correction" (biased toward mistakes)
    minority_recall_estimated_upper: float | None = None  # 95% upper bound of the label-free estimate
    mix_p_value: float | None = None  # the served mix against the one the estimated prior explains
    prior_shifted: bool = False  # the estimated prior moved significantly (label shift)
    minority_share: float | None = None  # of the window's predictions, in the minority classes
    reference_minority_share: float | None = None

    def minority_recall(self, rules: CollapseRules) -> tuple[float | None, str]:
        """The value measured on audit labels where they decide it against the floor, else the estimate."""
        measured, halfwidth = self.minority_recall_measured, self.minority_recall_halfwidth
        if measured is None or halfwidth is None or self.measured_source != FeedbackKind.AUDIT:
            return self.minority_recall_estimated, "estimated"
        if halfwidth <= rules.recall_precision or abs(measured - recall_floor(self, rules)) > halfwidth:
            return measured, "measured"
        return self.minority_recall_estimated, "estimated"

    def audit_recall_below(self, floor: float) -> bool:
        """Whether the recall measured on audit labels lies, with its whole 95% interval, under `floor`."""
        upper = self.minority_recall_measured_upper
        return self.measured_source == FeedbackKind.AUDIT and upper is not None and upper < floor


@dataclass(frozen=True)
class Decision:
    fired: bool
    suspicious: bool
    reasons: tuple[str, ...]
    evidence: dict[str, Any]


def recall_floor(signals: WindowSignals, rules: CollapseRules) -> float:
    """A fraction of the champion's own minority recall when known, else the fixed floor."""
    if signals.reference_minority_recall is None:
        return rules.minority_recall_floor
    return rules.minority_recall_ratio * signals.reference_minority_recall


def _mix_unexplained(signals: WindowSignals, rules: CollapseRules, floor: float) -> tuple[bool, str]:
    """Whether the served mix moved beyond what the estimated prior explains, and how that was judged."""
    if signals.mix_p_value is not None:
        return signals.mix_p_value < rules.mix_alpha, f"p {signals.mix_p_value:.2g}"
    recall, source = signals.minority_recall(rules)
    low = recall is not None and recall < floor
    return (
        signals.drifted and low,
        f"no dev confusion recorded: class-mix drift, minority recall ({source}) {_shown(recall)}",
    )


def _shown(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def _minority_share_fell(signals: WindowSignals, rules: CollapseRules) -> bool:
    share, reference = signals.minority_share, signals.reference_minority_share
    return share is not None and reference is not None and share < rules.minority_share_ratio * reference


def assess(signals: WindowSignals, rules: CollapseRules) -> tuple[bool, tuple[str, ...]]:
    """Whether one window is suspicious, and the reasons that held."""
    if signals.n_predictions < rules.min_predictions:
        return False, ()
    rise = signals.majority_share - signals.reference_majority_share
    floor = recall_floor(signals, rules)
    unexplained, how = _mix_unexplained(signals, rules, floor)
    upper = signals.minority_recall_estimated_upper
    checks = {
        f"majority share {signals.majority_share:.2f} is {rise:+.2f} over reference, more than the estimated "
        f"class mix explains ({how})": rise >= rules.majority_rise and unexplained,
        f"minority classes' share of predictions {_shown(signals.minority_share)} is under "
        f"{rules.minority_share_ratio:g} x the reference {_shown(signals.reference_minority_share)}, more than the "
        f"estimated class mix explains ({how})": (_minority_share_fell(signals, rules) and unexplained),
        f"minority recall measured on audit labels {_shown(signals.minority_recall_measured)} (95% upper bound "
        f"{_shown(signals.minority_recall_measured_upper)}) is below {floor:.3f}": signals.audit_recall_below(floor),
        f"label-free minority recall {_shown(signals.minority_recall_estimated)} (95% upper bound {_shown(upper)}) "
        f"is below {floor:.3f}": upper is not None and upper < floor,
    }
    held = tuple(reason for reason, ok in checks.items() if ok)
    return bool(held), held


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

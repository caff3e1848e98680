"""Label shift: the class prior of unlabelled traffic, and per-class recall under it.

Under pure label shift the class-conditional inputs p(x | y) stay put and only the class prior moves from the
source prior pi_s (the training prior the model's calibrated posteriors assume) to a new pi. Then

    p_new(y | x)  is proportional to  p_s(y | x) * pi_y / pi_s,y                       (Saerens et al. 2002)

and pi is the fixed point of EM: correct the posteriors with the current pi, average them, repeat (MLLS, the
maximum-likelihood prior). EM trusts the posteriors, so they must be calibrated; bias-corrected temperature
scaling (BCTS: softmax(z / T + b), fitted on dev by NLL) is what makes MLLS reliable (Alexandari et al. 2020).

The label-free recall of class k is then confidence-based performance estimation on the *prior-corrected*
posteriors: E[true k and served k] / E[true k] = sum over served-k turns of p_new,k / sum of p_new,k. On the
uncorrected ones it is biased as soon as the mix moves (too few neutral turns expected when neutral grows).

A balanced decision rule (argmax of p(y | x) / pi_y, which logit-adjusted training approximates) decides by
p(x | y) alone, so its per-class recall does not move under pure label shift; what moves is precision and
accuracy. Under label shift the served labels follow the model's confusion behaviour: the expected predicted
mix is C^T pi, with C the dev confusion rates P(served j | true i). A predicted mix far from that is not
explained by the traffic's class mix: the model itself has changed behaviour.

Every figure comes with a 95% interval from the bootstrap over the window's conversations (core/resampling.py),
EM re-run on each replicate: turns of one conversation are correlated, so an interval over turns would be
too narrow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2, norm

from core.resampling import conversation_units, turn_weights
from model.artifact import Calibration

MIN_EXPECTED_SUPPORT = 1.0  # a class expected to hold under one turn of the window has no recall estimate
PRIOR_FLOOR = 1e-6
EM_MAX_ITER = 1000
EM_TOLERANCE = 1e-6
CONFIDENCE = 0.95
MIX_ALPHA = 0.01  # the served mix is unexplained by the estimated prior when its test's p is below this


def normalised(shares: Sequence[float] | np.ndarray) -> np.ndarray:
    values = np.clip(np.asarray(shares, dtype=np.float64), PRIOR_FLOOR, None)
    return values / values.sum(axis=-1, keepdims=True)


def prior_corrected(posteriors: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """p_k * target_k / source_k, renormalised per turn; `target` [C] or one prior per replicate [R, C] (then
    the result is [R, N, C])."""
    ratio = normalised(target) / normalised(source)
    corrected = posteriors * (ratio[..., None, :] if ratio.ndim == 2 else ratio)
    return corrected / corrected.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class PriorFit:
    prior: np.ndarray  # [C], or [R, C] for weighted replicates
    iterations: int
    converged: bool


def _em_step(posteriors: np.ndarray, source: np.ndarray, weights: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """One EM iteration for each replicate: the (weighted) mean of the posteriors corrected to its prior."""
    corrected = prior_corrected(posteriors, source, prior)  # E-step [R, N, C]
    return np.einsum("rn,rnc->rc", weights, corrected) / weights.sum(axis=1, keepdims=True)  # M-step


def mlls_prior(
    posteriors: np.ndarray,
    source: Sequence[float] | np.ndarray,
    weights: np.ndarray | None = None,
    *,
    max_iter: int = EM_MAX_ITER,
    tol: float = EM_TOLERANCE,
) -> PriorFit:
    """Saerens, Latinne & Decaestecker 2002: EM for the class prior of the turns whose calibrated posteriors
    (under the `source` prior) are `posteriors` [N, C]. With `weights` [R, N] (bootstrap multiplicities), one
    prior per replicate [R, C], each iterated until it converges.

    EM converges slowly when a class's maximum-likelihood share is near 0, so its iterations are accelerated
    with SQUAREM (Varadhan & Roland 2008): two EM steps, an extrapolation along them kept inside the simplex,
    then one EM step from there. The fixed point, the MLLS prior, is the same; `max_iter` counts EM steps."""
    p = np.asarray(posteriors, dtype=np.float64)
    src = normalised(source)
    w = np.ones((1, len(p))) if weights is None else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    prior = np.tile(src, (len(w), 1))
    active = np.arange(len(w))
    steps = 0
    while len(active) and steps < max_iter:
        theta, weight = prior[active], w[active]
        first = _em_step(p, src, weight, theta)
        second = _em_step(p, src, weight, first)
        updated = _em_step(p, src, weight, _extrapolate(theta, first, second))
        steps += 3
        moved = np.abs(updated - theta).max(axis=1)
        prior[active] = updated
        active = active[moved >= tol]
    return PriorFit(prior[0] if weights is None else prior, steps, not len(active))


def _extrapolate(theta: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """SQUAREM's step theta - 2 a r + a^2 v with a = -|r| / |v| (at most -1), halved toward -1 (where it is the
    plain second EM step) until every share stays positive."""
    r, v = first - theta, second - 2 * first + theta
    norm_v = np.linalg.norm(v, axis=1)
    alpha = np.where(norm_v > 0, -np.linalg.norm(r, axis=1) / np.where(norm_v > 0, norm_v, 1), -1.0)
    alpha = np.minimum(alpha, -1.0)[:, None]
    for _ in range(30):
        step = theta - 2 * alpha * r + alpha**2 * v
        bad = (step <= 0).any(axis=1, keepdims=True)
        if not bad.any():
            break
        alpha = np.where(bad, (alpha - 1) / 2, alpha)
    step = theta - 2 * alpha * r + alpha**2 * v
    step = np.where((step <= 0).any(axis=1, keepdims=True), second, step)
    return step / step.sum(axis=1, keepdims=True)


def corrected_recall(corrected: np.ndarray, served: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Label-free recall per class of the served labels [N] from prior-corrected posteriors ([N, C], or [R, N, C]
    with `weights` [R, N]); NaN where the expected support is under MIN_EXPECTED_SUPPORT."""
    c = corrected.shape[-1]
    hit = np.eye(c)[np.asarray(served)] * corrected  # p_k where the served label is k
    if weights is None:
        expected, hits = corrected.sum(axis=0), hit.sum(axis=0)
    else:
        expected, hits = np.einsum("rn,rnc->rc", weights, corrected), np.einsum("rn,rnc->rc", weights, hit)
    return np.divide(hits, expected, out=np.full_like(expected, np.nan), where=expected >= MIN_EXPECTED_SUPPORT)


@dataclass(frozen=True)
class ShiftModel:
    """What label-shift estimation needs from the serving model's artifact: its calibrated posteriors of the
    served probabilities, the prior they assume, and its dev confusion rates (None: not recorded)."""

    calibration: Calibration
    source_prior: np.ndarray | None  # [C]; None: unknown (an artifact without a calibration record)
    confusion: np.ndarray | None  # [C, C] P(served j | true i) on dev
    confusion_support: np.ndarray | None = None  # [C] dev turns of each true class behind those rates

    def expected_share_covariance(self, prior: np.ndarray) -> np.ndarray:
        """[C, C] sampling covariance of C^T pi from the dev counts behind C (each row a multinomial proportion
        of its class's dev turns), at a fixed prior `pi`."""
        assert self.confusion is not None and self.confusion_support is not None
        covariance = np.zeros((len(prior), len(prior)))
        for k, row in enumerate(self.confusion):
            if self.confusion_support[k] > 0:
                covariance += prior[k] ** 2 * (np.diag(row) - np.outer(row, row)) / self.confusion_support[k]
        return covariance

    @classmethod
    def from_calibration(cls, calibration: Calibration) -> ShiftModel:
        """From the artifact's record: the BCTS posteriors and the training prior they assume, and the dev
        confusion when recorded (a tier-1 candidate drops it: its decision rule moved). An artifact without the
        posteriors states no prior they assume: its served probabilities (times its estimation weights) are taken
        as posteriors for the traffic as it is, so the prior is their mean and nothing is corrected (the
        label-free recall of older releases)."""
        if calibration.posterior is None or calibration.training_prior is None:
            return cls(calibration, None, None)
        source = normalised(calibration.training_prior.shares)
        reference = calibration.dev_reference
        if reference is None:
            return cls(calibration, source, None)
        support = np.asarray(reference.confusion, dtype=np.float64).sum(axis=1)
        return cls(calibration, source, reference.confusion_rates(), support)

    def fit_prior(self, posteriors: np.ndarray, weights: np.ndarray | None = None) -> PriorFit:
        """MLLS against the source prior; without one, the (weighted) mean posterior."""
        if self.source_prior is not None:
            return mlls_prior(posteriors, self.source_prior, weights)
        if weights is None:
            return PriorFit(posteriors.mean(axis=0), 0, True)
        return PriorFit((weights @ posteriors) / weights.sum(axis=1, keepdims=True), 0, True)

    def corrected(self, posteriors: np.ndarray, prior: np.ndarray) -> np.ndarray:
        """The posteriors moved to `prior` ([C], or [R, C] giving [R, N, C]); unchanged without a source prior."""
        if self.source_prior is not None:
            return prior_corrected(posteriors, self.source_prior, prior)
        return np.broadcast_to(posteriors, (*prior.shape[:-1], *posteriors.shape))

    def posteriors(self, served: np.ndarray) -> np.ndarray:
        served = np.asarray(served, dtype=np.float64)
        if self.calibration.posterior is not None:
            return self.calibration.posterior.posteriors(served, self.calibration.temperature)
        weights = self.calibration.estimation_weights
        weighted = served if weights is None else served * np.asarray(weights)
        return weighted / weighted.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Interval:
    estimate: float
    lower: float
    upper: float

    def excludes(self, value: float) -> bool:
        return not self.lower <= value <= self.upper


def _interval(estimate: float, replicates: np.ndarray, confidence: float = CONFIDENCE) -> Interval | None:
    """The percentile interval of the replicates where the statistic is defined; None when the estimate is
    undefined or most replicates are (a class EM finds absent has no recall)."""
    defined = replicates[~np.isnan(replicates)]
    if np.isnan(estimate) or len(defined) < 0.5 * len(replicates):
        return None
    tail = (1 - confidence) / 2
    lower, upper = np.quantile(defined, [tail, 1 - tail])
    return Interval(float(estimate), float(lower), float(upper))


@dataclass(frozen=True)
class LabelShiftEstimate:
    """One window's label-shift figures, each with its 95% interval over the window's conversations."""

    names: tuple[str, ...]
    source_prior: tuple[float, ...] | None  # None: the artifact states none (nothing corrected, no shift test)
    prior: tuple[Interval, ...]
    shift_significant: bool  # some class's simultaneous (Bonferroni) interval excludes its source share
    recall: tuple[Interval | None, ...]  # label-free: on prior-corrected posteriors when `recall_corrected`
    minority_recall: Interval | None
    predicted_shares: tuple[float, ...]
    expected_shares: tuple[Interval, ...] | None  # C^T pi: the served mix the estimated prior explains
    unexplained_share: float | None  # total variation between the served mix and C^T pi
    mix_p_value: float | None  # of "the served mix is C^T pi" (label shift explains the predictions)
    conversations: int
    replicates: int
    converged: bool
    recall_corrected: bool = True  # False: the served mix was not explained, the recall is uncorrected

    def prior_of(self, name: str) -> Interval:
        return self.prior[self.names.index(name)]

    def explained(self, alpha: float) -> bool | None:
        """Whether label shift explains the served mix at level `alpha` (None: no dev confusion recorded)."""
        return None if self.mix_p_value is None else self.mix_p_value >= alpha


def estimate_label_shift(
    served: np.ndarray,
    conversations: Sequence[object] | np.ndarray,
    model: ShiftModel,
    names: Sequence[str],
    minority: Sequence[str],
    *,
    replicates: int = 200,
    seed: int = 0,
    mix_alpha: float = MIX_ALPHA,
) -> LabelShiftEstimate:
    """The class prior of the turns whose served probabilities are `served` [N, C] (MLLS on BCTS posteriors), the
    served mix it explains and the test of the served mix against it, and the label-free recall of the served
    labels, with their intervals. The recall is computed on posteriors corrected to the estimated prior when label
    shift explains the served mix (p >= `mix_alpha`); when it does not, the correction's premise fails (the model,
    not the traffic, changed) and the recall is computed on the posteriors as calibrated for the training prior."""
    names = tuple(names)
    posteriors = model.posteriors(served)
    labels = np.asarray(served).argmax(axis=1)
    weights = turn_weights(conversations, replicates, seed)
    point, boot = model.fit_prior(posteriors), model.fit_prior(posteriors, weights)
    source = model.source_prior
    expected = _expected_shares(model, point.prior, boot.prior)
    consistency = None if expected is None else _mix_consistency(model, labels, weights, point.prior, expected)
    corrected = consistency is None or consistency[1] >= mix_alpha or source is None
    recall_prior, recall_boot_prior = (
        (point.prior, boot.prior) if corrected else (source, np.tile(source, (replicates, 1)))
    )
    recall = corrected_recall(model.corrected(posteriors, recall_prior), labels)
    recall_boot = corrected_recall(model.corrected(posteriors, recall_boot_prior), labels, weights)
    rows = [names.index(name) for name in minority if name in names]
    shares = np.bincount(labels, minlength=len(names)) / max(len(labels), 1)
    simultaneous = _simultaneous(point.prior, boot.prior)
    return LabelShiftEstimate(
        names=names,
        source_prior=None if source is None else tuple(source.tolist()),
        prior=tuple(_interval(point.prior[k], boot.prior[:, k]) or _point(point.prior[k]) for k in range(len(names))),
        shift_significant=source is not None and any(i.excludes(source[k]) for k, i in enumerate(simultaneous)),
        recall=tuple(_interval(recall[k], recall_boot[:, k]) for k in range(len(names))),
        minority_recall=_interval(_mean(recall[rows]), _mean(recall_boot[:, rows], axis=1)) if rows else None,
        predicted_shares=tuple(shares.tolist()),
        expected_shares=None
        if expected is None
        else tuple(_interval(expected[0][k], expected[1][:, k]) or _point(expected[0][k]) for k in range(len(names))),
        unexplained_share=None if consistency is None else consistency[0],
        mix_p_value=None if consistency is None else consistency[1],
        conversations=conversation_units(conversations)[1],
        replicates=replicates,
        converged=point.converged and boot.converged,
        recall_corrected=corrected,
    )


def _simultaneous(point: np.ndarray, boot: np.ndarray) -> list[Interval]:
    """Intervals of every class's share that hold together at 95% (Bonferroni over the C classes): the estimate
    plus or minus z(1 - 0.05 / 2C) bootstrap standard errors. Percentiles that far in the tails (0.4% for seven
    classes) would rest on one or two replicates; the standard error uses all of them."""
    z = float(norm.ppf(1 - (1 - CONFIDENCE) / (2 * len(point))))
    spread = z * boot.std(axis=0, ddof=1)
    return [Interval(float(p), float(p - s), float(p + s)) for p, s in zip(point, spread, strict=True)]


def _expected_shares(model: ShiftModel, point: np.ndarray, boot: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    if model.confusion is None:
        return None
    return point @ model.confusion, boot @ model.confusion


def _mix_consistency(
    model: ShiftModel, labels: np.ndarray, weights: np.ndarray, prior: np.ndarray, expected: tuple[np.ndarray, ...]
) -> tuple[float, float]:
    """(total variation, p-value) of the served mix against C^T pi. Under label shift both it and MLLS's pi are
    consistent, so their difference d is noise: its covariance is the window's (the bootstrap over conversations,
    EM re-run on each replicate) plus the dev confusion's own sampling noise; d' S^-1 d is then chi-square with
    C - 1 degrees of freedom (the shares sum to 1, so one class is dropped)."""
    c = len(prior)
    one_hot = np.eye(c)[labels]
    served = one_hot.mean(axis=0)
    served_boot = (weights @ one_hot) / weights.sum(axis=1, keepdims=True)
    difference = served - expected[0]
    covariance = np.cov((served_boot - expected[1])[:, :-1], rowvar=False)
    covariance += model.expected_share_covariance(prior)[:-1, :-1]
    statistic = float(difference[:-1] @ np.linalg.pinv(covariance) @ difference[:-1])
    return float(0.5 * np.abs(difference).sum()), float(chi2.sf(statistic, c - 1))


def _mean(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Mean over the classes that have an estimate (as monitoring.estimation.mean_recall); NaN if none has."""
    values = np.asarray(values, dtype=np.float64)
    count = (~np.isnan(values)).sum(axis=axis)
    total = np.nansum(values, axis=axis)
    return np.divide(total, count, out=np.full_like(np.asarray(total, dtype=np.float64), np.nan), where=count > 0)


def _point(value: float) -> Interval:
    return Interval(float(value), float(value), float(value))

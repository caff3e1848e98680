"""PNG charts for reports and benchmark docs (Agg canvas, no pyplot state, safe in workers and threads)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from training.metrics import MetricsReport

METRICS = ("precision", "recall", "f1")


def _figure(n_classes: int, height: float = 4.0) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(max(6.0, 1.1 * n_classes + 2.0), height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _grouped_bars(
    ax: Axes, labels: Sequence[str], series: Mapping[str, np.ndarray], errors: Mapping[str, np.ndarray] | None
) -> None:
    """One group per class, one bar per series; values in [0, 1]."""
    x = np.arange(len(labels))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        yerr = None if errors is None else errors[name]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, yerr=yerr, capsize=2, label=name)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    _legend_below(ax.figure, list(series))


def _legend_below(fig: Figure, names: Sequence[str]) -> None:
    """As many columns as the longest name allows in the figure's width (about 14 small characters per inch);
    the figure grows by the legend's rows so the axes keep their height."""
    columns = max(1, min(3, len(names), int(fig.get_figwidth() * 14 // (max(map(len, names)) + 6))))
    rows = -(-len(names) // columns)
    fig.set_figheight(fig.get_figheight() + 0.22 * rows)
    fig.legend(loc="outside lower center", ncols=columns, fontsize="small")


def plot_per_class(report: MetricsReport, path: str | Path, title: str | None = None) -> Path:
    """Precision / recall / F1 bars per class, with each class's support under its name."""
    fig, ax = _figure(len(report.labels))
    ticks = [f"{name}\nn={n}" for name, n in zip(report.labels, report.support, strict=True)]
    _grouped_bars(ax, ticks, {m: getattr(report, m) for m in METRICS}, None)
    ax.set_title(title or f"per class (macro F1 {report.macro_f1:.3f}, weighted F1 {report.weighted_f1:.3f})")
    return _save(fig, path)


def plot_confusion(report: MetricsReport, path: str | Path, title: str | None = None) -> Path:
    """Row-normalised confusion matrix (recall on the diagonal), each cell annotated with share and count."""
    cm = report.confusion
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    fig, ax = _figure(len(report.labels), height=max(4.0, 0.8 * len(report.labels) + 1.5))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8)
    for (i, j), value in np.ndenumerate(share):
        colour = "white" if value > 0.5 else "black"
        ax.text(j, i, f"{value:.2f}\n{cm[i, j]}", ha="center", va="center", fontsize=8, color=colour)
    ticks = np.arange(len(report.labels))
    ax.set_xticks(ticks, report.labels, rotation=30, ha="right")
    ax.set_yticks(ticks, report.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (row-normalised)")
    return _save(fig, path)


def plot_runs(
    runs: Mapping[str, Sequence[MetricsReport]], path: str | Path, metric: str = "f1", title: str | None = None
) -> Path:
    """Mean ± std of a per-class metric over runs (seeds), one bar per method; the legend shows macro F1."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    labels = next(iter(runs.values()))[0].labels
    means, stds = {}, {}
    for method, reports in runs.items():
        if any(r.labels != labels for r in reports):
            raise ValueError(f"runs of {method!r} use a different label set than {labels}")
        values = np.stack([getattr(r, metric) for r in reports])
        macro = np.array([r.macro_f1 for r in reports])
        name = f"{method} (macro F1 {macro.mean():.3f} ± {macro.std():.3f}, n={len(reports)})"
        means[name], stds[name] = values.mean(axis=0), values.std(axis=0)
    fig, ax = _figure(len(labels))
    _grouped_bars(ax, labels, means, stds)
    ax.set_title(title or f"per-class {metric}, mean ± std over runs")
    return _save(fig, path)


def plot_models(
    reports: Mapping[str, MetricsReport], path: str | Path, metric: str = "recall", title: str | None = None
) -> Path:
    """One per-class metric of several models on the same data, one bar per model; the legend shows macro F1."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    first = next(iter(reports.values()))
    if any(r.labels != first.labels for r in reports.values()):
        raise ValueError("the reports use different label sets")
    ticks = [f"{name}\nn={n}" for name, n in zip(first.labels, first.support, strict=True)]
    series = {f"{name} (macro F1 {r.macro_f1:.3f})": getattr(r, metric) for name, r in reports.items()}
    fig, ax = _figure(len(first.labels))
    _grouped_bars(ax, ticks, series, None)
    ax.set_title(title or f"per-class {metric}")
    return _save(fig, path)

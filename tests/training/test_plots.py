import numpy as np
import pytest
from matplotlib.image import imread

from training.metrics import compute_metrics
from training.plots import plot_confusion, plot_per_class, plot_runs

LABELS = ("neutral", "joy", "fear")


def _report(seed: int, labels=LABELS):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(labels), 60)
    return compute_metrics(y, np.where(rng.random(60) < 0.6, y, 0), labels)


def _assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = imread(path).shape[:2]
    assert height > 200 and width > 300


def test_report_plots_write_pngs(tmp_path):
    report = _report(0)
    _assert_png(plot_per_class(report, tmp_path / "per_class.png"))
    _assert_png(plot_confusion(report, tmp_path / "nested" / "confusion.png"))


def test_runs_plot_and_label_set_check(tmp_path):
    runs = {"ce": [_report(s) for s in range(3)], "crt": [_report(s + 10) for s in range(3)]}
    _assert_png(plot_runs(runs, tmp_path / "runs.png", metric="recall"))
    with pytest.raises(ValueError, match="label set"):
        plot_runs({"ce": [_report(0), _report(1, ("a", "b", "c"))]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="metric"):
        plot_runs(runs, tmp_path / "bad.png", metric="accuracy")

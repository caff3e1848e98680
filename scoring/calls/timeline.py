"""A call's timeline as a PNG: one row per speaker, one bar per turn, coloured by the turn's emotion (grey without)."""

from __future__ import annotations

import io
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from scoring.calls.analytics import TimedTurn

NO_EMOTION = "#b0b0b0"
EMOTION_COLOURS = {
    "neutral": "#8da0cb",
    "joy": "#f1c232",
    "surprise": "#76c7c0",
    "anger": "#d7301f",
    "sadness": "#3b5ba5",
    "disgust": "#7a9a01",
    "fear": "#8e44ad",
}
OTHER_EMOTION = "#555555"  # a label of a model whose label set is not MELD's


def timeline_png(
    speakers: Sequence[str], turns: Sequence[TimedTurn], labels: Sequence[str | None], duration_s: float
) -> bytes:
    """The PNG bytes of the timeline; `labels` holds each turn's emotion (None: not scored)."""
    if len(labels) != len(turns):
        raise ValueError(f"{len(labels)} labels were given for {len(turns)} turns")
    # A Figure of its own (not pyplot's global state): safe in the service's worker threads.
    figure = Figure(figsize=(12, 1 + 0.6 * max(1, len(speakers))), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for turn, label in zip(turns, labels, strict=True):
        colour = NO_EMOTION if label is None else EMOTION_COLOURS.get(label, OTHER_EMOTION)
        axes.broken_barh([(turn.start_s, turn.end_s - turn.start_s)], (turn.channel - 0.4, 0.8), color=colour)
    axes.set_yticks(range(len(speakers)), list(speakers))
    axes.set_ylim(len(speakers) - 0.5, -0.5)
    axes.set_xlim(0, max(duration_s, 1e-3))
    axes.set_xlabel("seconds")
    shown = sorted({label for label in labels if label is not None})
    if shown:
        handles = [Patch(color=EMOTION_COLOURS.get(name, OTHER_EMOTION), label=name) for name in shown]
        axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()

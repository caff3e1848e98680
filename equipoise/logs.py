"""Logging of the long-running commands (`serve`, `worker`): one format for everything, the product's own loggers
(and uvicorn's, which carry the access log) at the chosen level, every other library at WARNING unless the level
is debug. So `info` shows what the service does, not the INFO chatter of ONNX Runtime's quantiser (it logs on
the root logger), the ONNX optimisers or Alembic.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OWN_LOGGERS = (
    "api",
    "core",
    "equipoise",
    "migrations",
    "model",
    "monitoring",
    "retraining",
    "scoring",
    "training",
    "uvicorn",
)
LIBRARY_LEVEL = logging.WARNING


def configure_logging(level: str) -> None:
    """One handler on the root logger; own loggers at `level`, libraries at WARNING (or `level` when quieter or
    when it is debug). Replaces any earlier configuration, so calling it twice is harmless."""
    chosen = logging.getLevelName(level.upper())
    if not isinstance(chosen, int):
        raise ValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(chosen if chosen == logging.DEBUG else max(chosen, LIBRARY_LEVEL))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(chosen)


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Around the export and quantisation of a model, outside debug: what the libraries warn about there is not
    the user's to act on (the torch exporter's optional torchvision and its dynamic-axis naming, torch's own
    FutureWarnings, the quantiser's advice to pre-process, logged on the root logger); a real problem raises.
    torch resets its loggers' levels when it is imported, so this imports it first."""
    if logging.getLogger("equipoise").getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    import torch  # noqa: F401

    exporter, root = logging.getLogger("torch.onnx"), logging.getLogger()
    previous = exporter.level
    exporter.setLevel(logging.ERROR)
    root.addFilter(_errors_only)  # a logger's filters see only records logged on it: ours use named loggers
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
            yield
    finally:
        root.removeFilter(_errors_only)
        exporter.setLevel(previous)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR

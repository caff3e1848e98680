"""Python's cyclic garbage collector in a long-running service.

Start-up leaves several hundred thousand tracked objects that live as long as the process (modules, the model's
wrappers, SQLAlchemy's and pydantic's metadata): about 410,000 in `equipoise serve`. A full collection walks them
all while holding the GIL, so the event loop and the Python parts of the model threads stand still: on the 2-core
development machine four full collections of about 200 ms each in 20 s at 32 concurrent clients. Freezing moves
what exists after start-up into the permanent generation, which collections skip; objects made while serving are
collected as before. A larger first-generation threshold makes collections rarer: a request's objects are freed by
reference counting, so few of them ever need the collector. Measured in docs/BENCHMARKS.md "The garbage collector".

A model swapped out was frozen with the rest of start-up, and what of it sits in reference cycles only the
collector frees: `thaw_then_refreeze` unfreezes at once and collects and freezes again a little later, once the
requests still holding the replaced model are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator

REFREEZE_DELAY_S = 10.0  # after a model swap: far longer than any batch that may still hold the replaced model

_serving = False  # inside collector_for_serving with freezing on


@contextlib.contextmanager
def collector_for_serving(freeze: bool, gen0_threshold: int) -> Iterator[int]:
    """Within: the objects that exist now frozen when `freeze` (after one full collection), and a collection of
    the youngest generation only after `gen0_threshold` net allocations. Yields how many objects are frozen; on
    exit the thresholds are restored and the objects unfrozen."""
    global _serving
    previous = gc.get_threshold()
    if freeze:
        _refreeze()
        _serving = True
    gc.set_threshold(gen0_threshold, *previous[1:])
    try:
        yield gc.get_freeze_count()
    finally:
        gc.set_threshold(*previous)
        if freeze:
            _serving = False
            gc.unfreeze()


def thaw_then_refreeze(delay_s: float = REFREEZE_DELAY_S) -> None:
    """After long-lived objects are dropped (a model swapped out): unfreeze now, and after `delay_s` on the running
    event loop collect (freeing the dropped objects' cycles) and freeze again. Nothing happens unless serving
    froze start-up."""
    if not _serving:
        return
    gc.unfreeze()
    asyncio.get_running_loop().call_later(delay_s, _refreeze_while_serving)


def _refreeze_while_serving() -> None:
    if _serving:
        _refreeze()


def _refreeze() -> None:
    gc.collect()
    gc.freeze()

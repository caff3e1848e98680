"""The collector while serving: start-up's objects frozen, the youngest generation collected less often."""

from __future__ import annotations

import asyncio
import gc
import weakref

from core.heap import collector_for_serving, thaw_then_refreeze


class Node:
    """An object in a reference cycle, which only the collector frees."""

    def __init__(self) -> None:
        self.itself = self


def test_frozen_objects_outlive_full_collections_until_thawed_and_refrozen() -> None:
    previous = gc.get_threshold()
    node = Node()
    alive = weakref.ref(node)

    async def swap() -> None:
        thaw_then_refreeze(delay_s=0.05)
        assert gc.get_freeze_count() == 0
        await asyncio.sleep(0.2)

    with collector_for_serving(freeze=True, gen0_threshold=5_000) as frozen:
        assert frozen > 0
        assert gc.get_threshold() == (5_000, *previous[1:])
        del node
        gc.collect()
        assert alive() is not None  # frozen: collections skip it
        asyncio.run(swap())
        assert alive() is None
        assert gc.get_freeze_count() > 0  # what survived is frozen again
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == previous


def test_without_freezing_only_the_threshold_changes_and_a_swap_thaws_nothing() -> None:
    previous = gc.get_threshold()
    with collector_for_serving(freeze=False, gen0_threshold=2_000) as frozen:
        assert frozen == 0 and gc.get_threshold()[0] == 2_000
        thaw_then_refreeze()  # no running loop needed: nothing is frozen
        assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == previous

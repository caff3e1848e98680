"""Micro-batching: concurrent requests share model calls, a full queue refuses at once, failures stay isolated."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from api.batcher import MicroBatcher, ModelUnavailable, Overloaded, RecentPeak, Scored
from api.metrics import Metrics
from api.reload import LoadedModel, ModelHolder
from model.runtime import UtteranceInput
from tests.api.conftest import FakeRuntime


def _holder(runtime: FakeRuntime) -> ModelHolder:
    holder = ModelHolder()
    holder.current = LoadedModel(runtime, runtime.version, "0" * 64)
    return holder


def run(test: Callable[[MicroBatcher], Awaitable[Any]], holder: ModelHolder, **options: Any) -> Any:
    """Run `test` against a started batcher on a fresh event loop."""
    settings = {"max_size": 16, "max_wait_s": 0.02, "queue_limit": 64} | options

    async def main() -> Any:
        batcher = MicroBatcher(holder, Metrics(), **settings)
        batcher.start()
        try:
            return await test(batcher)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def turn(text: str, speaker: str = "a") -> UtteranceInput:
    return UtteranceInput(text=text, audio=None, speaker=speaker)


def test_concurrent_requests_are_scored_together_and_get_their_own_results() -> None:
    runtime = FakeRuntime(delay_s=0.02)

    async def burst(batcher: MicroBatcher) -> list[Scored]:
        return await asyncio.gather(*(batcher.score([turn(f"utterance {i}")], causal=False) for i in range(40)))

    results = run(burst, _holder(runtime))
    sizes = [sum(lengths) for lengths, _causal in runtime.calls]
    assert sum(sizes) == 40 and max(sizes) <= 16 and len(runtime.calls) <= 6
    alone = FakeRuntime()
    for i, result in enumerate(results):
        (expected,) = alone.classify([[turn(f"utterance {i}")]], causal=False)[0]
        np.testing.assert_array_equal(result.turns[0].emotion_probs, expected.emotion_probs)


def test_a_full_queue_refuses_immediately_instead_of_queuing() -> None:
    runtime = FakeRuntime(delay_s=0.3)

    async def overload(batcher: MicroBatcher) -> float:
        first = asyncio.ensure_future(batcher.score([turn("busy")], causal=False))
        await asyncio.sleep(0.05)  # the first request is on the model thread now
        waiting = [asyncio.ensure_future(batcher.score([turn(f"wait {i}")], causal=False)) for i in range(2)]
        await asyncio.sleep(0)
        started = time.perf_counter()
        with pytest.raises(Overloaded):
            await batcher.score([turn("one too many")], causal=False)
        refused_after = time.perf_counter() - started
        await asyncio.gather(first, *waiting)
        return refused_after

    assert run(overload, _holder(runtime), max_size=1, queue_limit=2) < 0.05


def test_context_modes_are_scored_in_separate_calls() -> None:
    runtime = FakeRuntime(delay_s=0.05)

    async def mixed(batcher: MicroBatcher) -> None:
        await asyncio.gather(
            batcher.score([turn("a"), turn("b", "x")], causal=True),
            batcher.score([turn("c")], causal=False),
            batcher.score([turn("d")], causal=True),
        )

    run(mixed, _holder(runtime))
    by_mode: dict[bool, int] = {}
    for lengths, causal in runtime.calls:
        by_mode[causal] = by_mode.get(causal, 0) + sum(lengths)
    assert by_mode == {True: 3, False: 1}


def test_a_failing_request_does_not_fail_its_batch_neighbours() -> None:
    runtime = FakeRuntime(delay_s=0.01)

    async def neighbours(batcher: MicroBatcher) -> list[Any]:
        return await asyncio.gather(
            batcher.score([turn("fine")], causal=False),
            batcher.score([turn("explode")], causal=False),
            batcher.score([turn("also fine")], causal=False),
            return_exceptions=True,
        )

    fine, exploded, also_fine = run(neighbours, _holder(runtime))
    assert isinstance(fine, Scored) and isinstance(also_fine, Scored)
    assert isinstance(exploded, RuntimeError)


@dataclass
class TwoWaves(FakeRuntime):
    """Answers a batch in two waves, `gap_s` apart: the texts without "long" first, as the encoder's shortest
    calls come first. A text with "failing" fails its wave, as a failing encoder call would."""

    gap_s: float = 0.0
    waves: list[list[str]] = field(default_factory=list)  # the texts of every wave answered

    def classify_in_waves(self, dialogues, causal, history=None):  # type: ignore[no-untyped-def]
        short = [i for i, dialogue in enumerate(dialogues) if "long" not in dialogue[0].text]
        long = [i for i in range(len(dialogues)) if i not in short]
        for wave in (short, long):
            texts = [dialogues[i][0].text for i in wave]
            if not wave:
                continue
            if any("failing" in text for text in texts):
                raise RuntimeError("the encoder call failed")
            self.waves.append(texts)
            yield wave, self.classify([dialogues[i] for i in wave], causal)
            time.sleep(self.gap_s)


def _answered_after(texts: list[str], runtime: FakeRuntime) -> dict[str, Any]:
    """Each text's result (or error) and the seconds until it came, all sent into one batch."""

    async def timed(batcher: MicroBatcher, text: str, started: float) -> tuple[Any, float]:
        try:
            result: Any = await batcher.score([turn(text)], causal=False)
        except RuntimeError as error:
            result = error
        return result, time.perf_counter() - started

    async def one_batch(batcher: MicroBatcher) -> list[tuple[Any, float]]:
        started = time.perf_counter()
        return await asyncio.gather(*(timed(batcher, text, started) for text in texts))

    outcomes = run(one_batch, _holder(runtime), max_wait_s=0.05)
    return dict(zip(texts, outcomes, strict=True))


def test_the_short_utterances_of_a_batch_are_answered_before_its_long_ones_finish() -> None:
    runtime = TwoWaves(gap_s=0.5)
    answers = _answered_after(["short one", "a long one", "short two"], runtime)
    assert len(runtime.calls) == 2  # one batch, two waves
    assert answers["short one"][1] < 0.3 and answers["short two"][1] < 0.3
    assert answers["a long one"][1] >= 0.5
    for text, (scored, _) in answers.items():
        (expected,) = runtime.classify([[turn(text)]], False)[0]
        assert isinstance(scored, Scored) and scored.turns[0].emotion_probs.tolist() == expected.emotion_probs.tolist()


def test_a_wave_that_fails_keeps_the_answers_given_and_retries_the_rest_one_by_one() -> None:
    runtime = TwoWaves()
    answers = _answered_after(["short", "a long one", "long and failing"], runtime)
    assert isinstance(answers["short"][0], Scored) and isinstance(answers["a long one"][0], Scored)
    assert isinstance(answers["long and failing"][0], RuntimeError)
    assert runtime.waves == [["short"], ["a long one"]]  # the second wave failed; its requests went alone


def test_a_dialogue_longer_than_the_batch_is_scored_alone() -> None:
    runtime = FakeRuntime()

    async def long_dialogue(batcher: MicroBatcher) -> Scored:
        return await batcher.score([turn(str(i)) for i in range(40)], causal=False)

    assert len(run(long_dialogue, _holder(runtime)).turns) == 40
    assert runtime.calls == [([40], False)]


def test_without_a_model_requests_are_refused() -> None:
    async def no_model(batcher: MicroBatcher) -> None:
        with pytest.raises(ModelUnavailable):
            await batcher.score([turn("hello")], causal=False)

    run(no_model, ModelHolder())


def test_a_swap_during_a_call_leaves_in_flight_requests_on_the_old_model() -> None:
    old, new = FakeRuntime(version="old", delay_s=0.2), FakeRuntime(version="new")
    holder = _holder(old)

    async def swap(batcher: MicroBatcher) -> tuple[str, str]:
        in_flight = asyncio.ensure_future(batcher.score([turn("hello")], causal=False))
        await asyncio.sleep(0.08)
        holder.current = LoadedModel(new, "new", "1" * 64)
        after = await batcher.score([turn("hello")], causal=False)
        return (await in_flight).model.version, after.model.version

    assert run(swap, holder) == ("old", "new")


def test_the_event_loop_keeps_running_while_the_model_works() -> None:
    runtime = FakeRuntime(delay_s=0.3)

    async def responsiveness(batcher: MicroBatcher) -> float:
        work = asyncio.ensure_future(batcher.score([turn("slow")], causal=False))
        await asyncio.sleep(0.03)
        worst = 0.0
        while not work.done():
            started = time.perf_counter()
            await asyncio.sleep(0.01)
            worst = max(worst, time.perf_counter() - started)
        return worst

    assert run(responsiveness, _holder(runtime)) < 0.2  # a blocked loop would stall for the whole 0.3 s


class OverlapRecorder(FakeRuntime):
    """Counts how many model calls run at the same moment."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(delay_s=delay_s)
        self._lock = threading.Lock()
        self.active = self.peak = 0

    def classify(self, dialogues, causal, history=None):  # type: ignore[no-untyped-def]
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            return super().classify(dialogues, causal, history)
        finally:
            with self._lock:
                self.active -= 1


@pytest.mark.parametrize("workers", [1, 2])
def test_each_model_thread_scores_a_batch_while_the_next_one_gathers(workers: int) -> None:
    runtime = OverlapRecorder(delay_s=0.2)  # long enough for the waiting batches to reach a free thread

    async def three_at_once(batcher: MicroBatcher) -> None:
        await asyncio.gather(*(batcher.score([turn(f"utterance {i}")], causal=False) for i in range(3)))

    run(three_at_once, _holder(runtime), max_size=1, max_wait_s=0.0, workers=workers)
    assert len(runtime.calls) == 3
    assert runtime.peak == workers  # never more calls at once than model threads, and every thread used


def _trickle(count: int, gap_s: float) -> Callable[[MicroBatcher], Awaitable[None]]:
    """Four requests at once, then `count` more `gap_s` apart while the first four are scored."""

    async def send(batcher: MicroBatcher) -> None:
        first = [asyncio.ensure_future(batcher.score([turn(f"first {i}")], causal=False)) for i in range(4)]
        later = []
        for i in range(count):
            await asyncio.sleep(gap_s)
            later.append(asyncio.ensure_future(batcher.score([turn(f"later {i}")], causal=False)))
        await asyncio.gather(*first, *later)

    return send


def test_a_freed_thread_gathers_its_fair_share_while_another_scores() -> None:
    runtime = OverlapRecorder(delay_s=0.6)  # the first batch is still scored when the last request arrives
    run(_trickle(4, 0.05), _holder(runtime), max_size=16, max_wait_s=0.0, workers=2)
    # Taking what had arrived would give batches of 1; the second thread waits until it holds as many utterances
    # as the first (the most in service, 8, halved) and scores them beside it.
    assert [len(sizes) for sizes, _ in runtime.calls] == [4, 4]
    assert runtime.peak == 2


def test_the_batch_wait_gathers_only_up_to_the_fair_share_with_several_threads() -> None:
    runtime = OverlapRecorder(delay_s=0.6)
    run(_trickle(4, 0.05), _holder(runtime), max_size=16, max_wait_s=0.5, workers=2)
    # Waiting its 0.5 s toward 16, the first batch would take all eight while the second thread had none.
    assert [len(sizes) for sizes, _ in runtime.calls] == [4, 4]
    assert runtime.peak == 2


def test_without_the_fair_share_a_freed_thread_scores_what_is_waiting() -> None:
    runtime = FakeRuntime(delay_s=0.6)
    run(_trickle(4, 0.05), _holder(runtime), max_size=16, max_wait_s=0.0, workers=2, fair_share=False)
    # The second thread takes the first late request alone; the three after it wait for the next free thread.
    assert [len(sizes) for sizes, _ in runtime.calls] == [4, 1, 3]


def test_the_gathering_wait_ends_when_the_busy_thread_finishes() -> None:
    runtime = FakeRuntime(delay_s=0.3)

    async def one_late(batcher: MicroBatcher) -> float:
        started = time.perf_counter()
        await _trickle(1, 0.05)(batcher)
        return time.perf_counter() - started

    seconds = run(one_late, _holder(runtime), max_size=16, max_wait_s=0.0, workers=2)
    assert [len(sizes) for sizes, _ in runtime.calls] == [4, 1]  # its share (3) never came: scored once alone
    assert seconds < 0.3 + 0.3 + 0.2  # scored when the first batch ended, not held any longer


def test_a_lone_request_is_scored_at_once_with_several_threads() -> None:
    runtime = FakeRuntime(delay_s=0.05)

    async def timed(batcher: MicroBatcher) -> float:
        await batcher.score([turn("warm")], causal=False)
        started = time.perf_counter()
        await batcher.score([turn("alone")], causal=False)
        return time.perf_counter() - started

    assert run(timed, _holder(runtime), max_size=16, max_wait_s=0.0, workers=2) < 0.05 + 0.1


def test_a_past_peak_of_requests_in_service_fades_after_two_windows() -> None:
    peak = RecentPeak(window_s=0.05)
    peak.observe(30)
    peak.observe(4)
    assert peak.value == 30
    time.sleep(0.06)
    peak.observe(5)
    assert peak.value == 30  # the window before still counts
    time.sleep(0.06)
    peak.observe(6)
    assert peak.value == 6
    time.sleep(0.12)
    peak.observe(2)
    assert peak.value == 2  # two windows without traffic: nothing of the old peak is left

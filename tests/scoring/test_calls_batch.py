"""`equipoise score --calls`: stereo calls assembled from the held-out RAVDESS actors' clips scored in batch (turns
against the builder's truth, one summary row and one timeline per call, bad recordings as error rows), a run killed
with SIGKILL and resumed (its outputs and its logged predictions: one per turn), a list of calls with bad rows, and
the Ray engine against the local one."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from sqlalchemy import select

from benchmarks.call_builder import AssembledCall, TrueTurn, assemble, ravdess_utterances
from core.db import migrate
from core.db.models import Prediction, RequestKind
from core.db.session import make_engine, session_scope
from model.runtime import InferenceRuntime
from model.speech_to_text import SpeechToText
from scoring.calls.batch import CallRunConfig, run_calls, timeline_name
from scoring.calls.engines import LocalCallEngine, RayCallEngine
from scoring.calls.scorer import CallScorer, CallSpec
from scoring.calls.sources import DUPLICATE_CALL, list_calls
from scoring.engine import RuntimeSpec
from scoring.inputs import INVALID_ROW, UNSAFE_AUDIO_PATH
from scoring.manifest import manifest_path
from tests.scoring.helpers import assert_same_predictions, read_rows, run_score, score_command

pytestmark = [pytest.mark.data, pytest.mark.slow]

CALLS = 6  # assembled calls in the directory (8 kHz stereo, 4-6 turns each)
ROLES = ("agent", "customer")
BAD = {"not-audio.wav": b"this is a text file, not a recording" * 20, "zero-length.wav": b""}
BAD_KINDS = {"not-audio": "audio_undecodable", "zero-length": "audio_empty"}


@pytest.fixture(scope="module")
def calls(data_dir: Path) -> dict[str, AssembledCall]:
    built = {}
    for index in range(CALLS):
        utterances = ravdess_utterances(data_dir, 4 + index % 3, seed=10 + index)
        built[f"call-{index:02d}"] = assemble(utterances, seed=10 + index)
    return built


@pytest.fixture(scope="module")
def call_dir(tmp_path_factory: pytest.TempPathFactory, calls: dict[str, AssembledCall]) -> Path:
    directory = tmp_path_factory.mktemp("calls")
    for name, call in calls.items():
        (directory / f"{name}.wav").write_bytes(call.wav(8_000))
    for name, data in BAD.items():
        (directory / name).write_bytes(data)
    return directory


# One speech-to-text thread in every engine: Whisper's decoding on CTranslate2 may differ in the last bits between
# thread counts on some CPUs, and a transcript that differs by a word is another input to the model. (NumPy's BLAS
# threads, which Ray's workers limit through OMP_NUM_THREADS, are pinned by SpeechToText itself.)
STT_THREADS = 1


@pytest.fixture(scope="module")
def stt() -> SpeechToText:
    return SpeechToText("cpu", cpu_threads=STT_THREADS)


@pytest.fixture(scope="module")
def call_spec(spec: RuntimeSpec) -> CallSpec:
    return CallSpec(spec, stt_threads=STT_THREADS, timelines=True)


@pytest.fixture(scope="module")
def local_calls(call_spec: CallSpec, runtime: InferenceRuntime, stt: SpeechToText) -> LocalCallEngine:
    return LocalCallEngine(CallScorer(call_spec, runtime, stt))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, call_dir: Path, local_calls: LocalCallEngine) -> Path:
    """The directory scored once, uninterrupted: out.jsonl, summary.csv and timelines/."""
    out = tmp_path_factory.mktemp("reference")
    config = CallRunConfig(
        call_dir, out / "out.jsonl", local_calls.scorer.spec, out / "summary.csv", roles=ROLES,
        timelines=out / "timelines", progress=False,
    )  # fmt: skip
    start = time.perf_counter()
    report = run_calls(config, local_calls)
    audio_s = report.audio_s
    print(f"{report.calls} calls, {audio_s:.0f} s of audio, in {time.perf_counter() - start:.1f} s\n{report.text()}")
    return out


def test_a_directory_of_calls_gives_their_turns_summaries_and_timelines(
    reference: Path, calls: dict[str, AssembledCall]
) -> None:
    rows = read_rows(reference / "out.jsonl")
    by_call: dict[str, list[dict]] = {}
    for row in rows:
        by_call.setdefault(row["conversation_id"], []).append(row)
    assert set(by_call) == set(calls) | set(BAD_KINDS)
    found, true = sum(len(by_call[name]) for name in calls), sum(len(call.turns) for call in calls.values())
    print(f"turns: {found} found, {true} true")
    assert abs(found - true) <= 0.1 * true
    matched = 0
    for name, call in calls.items():
        turns = by_call[name]
        assert [row["turn"] for row in turns] == list(range(len(turns)))
        assert all(row["error"] is None and row["label"] and row["text"] is not None for row in turns)
        assert [row["start_s"] for row in turns] == sorted(row["start_s"] for row in turns)
        assert {row["speaker"] for row in turns} <= set(ROLES)
        matched += sum(any(_matches(row, truth) for row in turns) for truth in call.turns)
    print(f"{matched} of {true} true turns matched by a found turn of their speaker starting within 0.5 s")
    assert matched >= 0.85 * true
    for name, kind in BAD_KINDS.items():
        (row,) = by_call[name]
        assert row["error"].startswith(kind) and row["turn"] is None and row["label"] is None

    summaries = {row["conversation_id"]: row for row in read_rows(reference / "summary.csv")}
    assert set(summaries) == set(by_call)
    for name, call in calls.items():
        summary = summaries[name]
        assert int(summary["turns"]) == len(by_call[name]) and int(summary["errors"]) == 0
        assert float(summary["duration_s"]) == pytest.approx(call.channels.shape[1] / 16_000, abs=0.01)
        speakers = json.loads(summary["speakers"])
        assert [s["speaker"] for s in speakers] == list(ROLES)
        assert (reference / "timelines" / timeline_name(name)).read_bytes().startswith(b"\x89PNG")
    assert summaries["zero-length"]["duration_s"] is None
    assert not (reference / "timelines" / timeline_name("zero-length")).exists()


def test_a_killed_run_resumes_to_the_uninterrupted_result(
    tmp_path: Path, call_dir: Path, reference: Path, tiny_artifact: Path
) -> None:
    output, summary, state = tmp_path / "out.jsonl", tmp_path / "summary.csv", tmp_path / "state"
    args = (call_dir, "--calls", "--out", output, "--summary", summary, "--channels", ",".join(ROLES),
            "--timelines", tmp_path / "timelines", "--model", tiny_artifact, "--log-to-db")  # fmt: skip
    database = f"sqlite:///{state / 'equipoise.db'}"
    state.mkdir()
    migrate.upgrade(database)
    log = tmp_path / "killed.log"
    with log.open("w") as sink:
        process = score_command(*args, state_dir=state, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while _commits(output) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # inside the next call, most likely
        running = process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert running, f"the run ended before it could be killed: {log.read_text()[-2000:]}"
    committed = _commits(output)
    assert 0 < committed < CALLS + len(BAD) and "complete" not in manifest_path(output).read_text()

    resumed = run_score(*args, state_dir=state)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{committed:,} resumed from earlier runs" in resumed.stdout
    rows, expected = read_rows(output), read_rows(reference / "out.jsonl")
    assert Counter((r["conversation_id"], r["turn"]) for r in rows).most_common(1)[0][1] == 1
    assert_same_predictions(rows, expected, atol=1e-4)
    assert [(r["text"], r["start_s"], r["end_s"]) for r in rows] == [
        (r["text"], r["start_s"], r["end_s"]) for r in expected
    ]
    assert len(read_rows(summary)) == CALLS + len(BAD)
    engine = make_engine(database)
    with session_scope(engine) as session:
        logged = session.scalars(select(Prediction)).all()
    engine.dispose()
    scored = [r for r in rows if not r["error"]]
    assert sorted((p.conversation_id, p.turn_index) for p in logged) == sorted(
        (r["conversation_id"], r["turn"]) for r in scored
    )  # one prediction per turn, after a kill inside a call
    by_turn = {(r["conversation_id"], r["turn"]): r for r in scored}
    for prediction in logged:
        row = by_turn[prediction.conversation_id, prediction.turn_index]
        assert prediction.request_kind == RequestKind.BATCH and prediction.call_id is None
        assert (prediction.label, prediction.speaker, prediction.text) == (row["label"], row["speaker"], row["text"])
        assert (prediction.start_s, prediction.end_s) == pytest.approx((row["start_s"], row["end_s"]), abs=1e-3)


def test_a_list_of_calls_names_roles_and_turns_bad_rows_into_error_rows(
    tmp_path: Path, call_dir: Path, local_calls: LocalCallEngine
) -> None:
    listing = tmp_path / "calls.jsonl"
    rows = [
        {"path": "call-00.wav", "call_id": "first", "roles": "customer,agent"},
        {"path": "call-00.wav", "call_id": "first"},
        {"path": "../outside.wav"},
        {"call_id": "no-path"},
        {"path": "missing.wav"},
        {"path": "call-01.wav", "roles": "one,two,three"},
    ]
    listing.write_text("".join(json.dumps(row) + "\n" for row in rows) + "[1, 2]\n")
    jobs = list_calls(listing, call_dir, ROLES)
    assert [job.call_id for job in jobs] == ["first", "first#2", "../outside", "row-4", "missing", "call-01", "row-7"]
    assert [job.error.kind if job.error else None for job in jobs] == [
        None, DUPLICATE_CALL, UNSAFE_AUDIO_PATH, INVALID_ROW, None, None, INVALID_ROW,
    ]  # fmt: skip
    config = CallRunConfig(listing, tmp_path / "out.parquet", local_calls.scorer.spec, audio_root=call_dir, roles=ROLES)
    report = run_calls(config, local_calls)
    out = read_rows(tmp_path / "out.parquet")
    assert {row["speaker"] for row in out if row["conversation_id"] == "first"} == {"customer", "agent"}
    errors = {row["conversation_id"]: row["error"].split(":")[0] for row in out if row["error"]}
    assert errors == {
        "first#2": DUPLICATE_CALL, "../outside": UNSAFE_AUDIO_PATH, "row-4": INVALID_ROW,
        "missing": "audio_not_found", "call-01": "channel_names_mismatch", "row-7": INVALID_ROW,
    }  # fmt: skip
    assert report.calls == len(jobs) and sum(report.errors.values()) == len(errors)


@pytest.mark.ray
def test_the_ray_engine_gives_the_local_engines_rows(
    tmp_path: Path, call_dir: Path, reference: Path, call_spec: CallSpec, ray_cluster: None
) -> None:
    subset = tmp_path / "subset"
    subset.mkdir()
    for name in ("call-00.wav", "call-01.wav", "call-02.wav", "not-audio.wav"):
        (subset / name).write_bytes((call_dir / name).read_bytes())
    spec = CallSpec(call_spec.runtime, stt_threads=STT_THREADS)
    config = CallRunConfig(subset, tmp_path / "ray.jsonl", spec, roles=ROLES, progress=False)
    report = run_calls(config, RayCallEngine(spec, actors=2))
    assert report.calls == 4
    rows = _error_kinds(read_rows(tmp_path / "ray.jsonl"))
    names = {"call-00", "call-01", "call-02", "not-audio"}
    expected = _error_kinds([r for r in read_rows(reference / "out.jsonl") if r["conversation_id"] in names])
    assert [(r["conversation_id"], r["text"]) for r in rows] == [(r["conversation_id"], r["text"]) for r in expected]
    assert_same_predictions(rows, expected, atol=1e-4)  # error messages name the recording's path: kinds only


def test_an_mp3_recording_is_scored_like_its_wav(
    tmp_path: Path, calls: dict[str, AssembledCall], local_calls: LocalCallEngine
) -> None:
    """libsndfile (soundfile 0.14) decodes MP3, so a call arrives as MP3 as it does as WAV."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(calls["call-00"].channels.T, -1, 1), 16_000, format="MP3")
    (tmp_path / "calls").mkdir()
    (tmp_path / "calls" / "call.mp3").write_bytes(buffer.getvalue())
    config = CallRunConfig(tmp_path / "calls", tmp_path / "out.csv", local_calls.scorer.spec, progress=False)
    report = run_calls(config, local_calls)
    rows = read_rows(tmp_path / "out.csv")
    assert not report.errors and rows and all(r["conversation_id"] == "call" and not r["error"] for r in rows)
    assert abs(len(rows) - len(calls["call-00"].turns)) <= max(1, len(calls["call-00"].turns) // 10)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("--out", "turns.txt"), "unsupported output file turns.txt"),
        (("--log-to-db",), "run `equipoise db upgrade` first"),
    ],
    ids=["output-format", "log-to-db-without-database"],
)
def test_the_command_reports_problems_of_its_arguments(
    tmp_path: Path, call_dir: Path, tiny_artifact: Path, arguments: tuple[str, ...], message: str
) -> None:
    args = ("--calls", call_dir, "--out", tmp_path / "out.jsonl", "--model", tiny_artifact, *arguments)
    result = run_score(*args, state_dir=tmp_path / "state")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def _error_kinds(rows: list[dict]) -> list[dict]:
    return [{**row, "error": row["error"].split(":")[0] if row["error"] else None} for row in rows]


def _matches(row: dict, truth: TrueTurn) -> bool:
    return row["speaker"] == ROLES[truth.channel] and abs(row["start_s"] - truth.start_s) <= 0.5


def _commits(output: Path) -> int:
    path = manifest_path(output)
    return max(0, len(path.read_bytes().splitlines()) - 1) if path.exists() else 0

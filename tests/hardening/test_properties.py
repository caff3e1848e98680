"""Property-based tests (Hypothesis) of the three parsers that take untrusted input: the audio decoder, the
request schemas and the call-centre turn readers. Each property says what may come out of arbitrary input;
anything else (an exception of another type, a wrong shape, a crash) fails it.

tests/model/test_audio.py, tests/model/test_turns.py and tests/api/test_bad_input.py hold the example-based
cases; these add generated input. `max_examples` is modest so that the directory runs in a few minutes.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from api.errors import validation_problem
from api.schemas import MAX_PARAMS_DEPTH, DialogueRequest, FeedbackRequest, JobRequest, UtteranceRequest
from model.audio import SAMPLE_RATE, AudioError, AudioTooLarge, AudioTooLong, decode_audio
from model.data.turns import FIELDS, RowError, Turn, TurnRow, read_turns

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ------------------------------------------------------------------------------------------------ audio

FORMATS = {  # soundfile format, subtype
    "WAV": ("WAV", "PCM_16"),
    "WAV-float": ("WAV", "FLOAT"),
    "FLAC": ("FLAC", "PCM_16"),
    "OGG": ("OGG", "VORBIS"),
}


def encode(samples: np.ndarray, rate: int, kind: str) -> bytes:
    buffer = io.BytesIO()
    container, subtype = FORMATS[kind]
    sf.write(buffer, samples, rate, format=container, subtype=subtype)
    return buffer.getvalue()


@st.composite
def waveforms(draw: st.DrawFn) -> tuple[np.ndarray, int, str]:
    rate = draw(st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000]))
    channels = draw(st.integers(1, 2))
    frames = draw(st.integers(int(0.02 * rate), int(0.5 * rate)))
    # Sums of tones below 40 % of the lower of the two rates: band-limited, so resampling cannot overshoot much.
    top = 0.4 * min(rate, SAMPLE_RATE)
    tones = draw(st.lists(st.tuples(st.floats(20, top), st.floats(0, 0.3)), min_size=1, max_size=3))
    time = np.arange(frames)[:, None] / rate
    phases = np.arange(channels)[None, :]
    samples = sum(level * np.sin(2 * np.pi * hertz * time + phases) for hertz, level in tones)
    return np.asarray(samples, dtype=np.float32), rate, draw(st.sampled_from(sorted(FORMATS)))


def check_waveform(decoded: np.ndarray) -> None:
    assert decoded.dtype == np.float32 and decoded.ndim == 1 and len(decoded) > 0
    assert np.isfinite(decoded).all()


@SETTINGS
@given(waveforms())
def test_valid_audio_decodes_to_16k_mono_float(waveform: tuple[np.ndarray, int, str]) -> None:
    samples, rate, kind = waveform
    decoded = decode_audio(encode(samples, rate, kind))
    check_waveform(decoded)
    expected = len(samples) * SAMPLE_RATE / rate
    assert abs(len(decoded) - expected) <= 2, (len(decoded), expected)
    # Mean of the channels, resampled: the level stays that of the input (Vorbis and resampling add little).
    assert np.abs(decoded).max() <= np.abs(samples).max() * 1.25 + 0.05
    if rate == SAMPLE_RATE and kind in ("WAV", "FLAC"):  # lossless and not resampled: exact to 16-bit
        np.testing.assert_allclose(decoded, samples.mean(axis=1), atol=2 / 32768)


@SETTINGS
@given(waveforms(), st.floats(0.01, 0.4))
def test_limits_hold_for_every_valid_file(waveform: tuple[np.ndarray, int, str], max_seconds: float) -> None:
    samples, rate, kind = waveform
    data = encode(samples, rate, kind)
    with pytest.raises(AudioTooLarge):
        decode_audio(data, max_bytes=len(data) - 1)
    try:
        decoded = decode_audio(data, max_seconds=max_seconds)
    except AudioTooLong:
        assert len(samples) / rate > max_seconds
    else:
        assert len(samples) / rate <= max_seconds + 1 / rate
        check_waveform(decoded)


def decodes_or_refuses(data: bytes) -> None:
    """The decoder's whole contract on untrusted bytes: a 16 kHz mono float waveform, or an AudioError."""
    try:
        decoded = decode_audio(data, max_seconds=5.0)
    except AudioError as error:
        assert error.code.startswith("audio_") and str(error)
    else:
        check_waveform(decoded)
        assert len(decoded) <= 5.0 * SAMPLE_RATE + 1


@SETTINGS
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_decode_or_raise_an_audio_error(data: bytes) -> None:
    decodes_or_refuses(data)


@SETTINGS
@given(
    st.sampled_from([b"RIFF", b"RIFX", b"RF64", b"fLaC", b"OggS", b"FORM", b".snd", b"caff"]),
    st.binary(min_size=0, max_size=512),
)
def test_arbitrary_bytes_behind_a_container_magic_decode_or_raise_an_audio_error(magic: bytes, rest: bytes) -> None:
    decodes_or_refuses(magic + rest)


@SETTINGS
@given(
    waveforms(),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 10_000),
)
def test_corrupted_valid_files_decode_or_raise_an_audio_error(
    waveform: tuple[np.ndarray, int, str], flips: list[tuple[int, int]], cut: int
) -> None:
    """Bytes of a valid file overwritten (headers included) and the file truncated: the header may now lie
    about the length, the rate or the channels."""
    data = bytearray(encode(*waveform))
    for position, value in flips:
        data[position % len(data)] = value
    decodes_or_refuses(bytes(data[: max(1, len(data) - cut)]))


# ------------------------------------------------------------------------------------------------ request schemas

STRINGS = st.text(max_size=12) | st.sampled_from(["", "\x00", "a\x00b", "\ud800", "ok\udfff", "neutral", "joy"])
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinity included: Python's JSON parser accepts them
    | STRINGS,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["text", "audio", "speaker", "turns", "context", "conversation_id", "prediction_id"])
            | st.sampled_from(["label", "sentiment", "source", "reason", "tier", "params"])
            | STRINGS,
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)
REQUEST_MODELS: list[type[BaseModel]] = [UtteranceRequest, DialogueRequest, FeedbackRequest, JobRequest]


def strings_in(value: Any) -> list[str]:
    if isinstance(value, BaseModel):
        return strings_in(value.model_dump())
    if isinstance(value, dict):
        return [*strings_in(list(value)), *strings_in(list(value.values()))]
    if isinstance(value, list | tuple):
        return [text for item in value for text in strings_in(item)]
    return [value] if isinstance(value, str) else []


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    return 0


@SETTINGS
@given(model=st.sampled_from(REQUEST_MODELS), data=JSON_VALUES)
def test_arbitrary_json_is_a_request_or_a_validation_error(model: type[BaseModel], data: Any) -> None:
    try:
        parsed = model.model_validate(data)
    except ValidationError as error:
        problem = validation_problem(error)  # what the service answers: it must render as UTF-8 JSON
        assert problem.status_code == 422 and problem.errors
        json.dumps([problem.detail, *(vars(field) for field in problem.errors)], allow_nan=False).encode("utf-8")
        return
    # Accepted: every string can be stored on PostgreSQL and encoded, every number written as JSON.
    for text in strings_in(parsed):
        assert "\x00" not in text
        text.encode("utf-8")
    json.dumps(parsed.model_dump(mode="json"), allow_nan=False).encode("utf-8")
    assert depth_of(parsed.model_dump(mode="json")) <= MAX_PARAMS_DEPTH + 2


@SETTINGS
@given(
    body=st.fixed_dictionaries(
        {"reason": st.text(min_size=1, max_size=20), "params": st.dictionaries(st.text(max_size=5), JSON_VALUES)}
    )
)
def test_job_params_are_stored_only_when_they_can_be_answered_back(body: dict[str, Any]) -> None:
    try:
        job = JobRequest.model_validate(body)
    except ValidationError:
        return
    assert json.loads(json.dumps(job.params, allow_nan=False)) == job.params


@pytest.mark.parametrize("depth", [MAX_PARAMS_DEPTH, MAX_PARAMS_DEPTH + 1, 5_000])
def test_job_params_nest_at_most_the_documented_depth(depth: int) -> None:
    params: dict[str, Any] = {}
    for _ in range(depth - 1):
        params = {"a": params}
    if depth <= MAX_PARAMS_DEPTH:
        assert JobRequest(reason="r", params=params).params == params
    else:
        with pytest.raises(ValidationError, match="levels deep"):
            JobRequest(reason="r", params=params)


# ------------------------------------------------------------------------------------------------ turn readers

CELLS = st.none() | st.text(max_size=10) | st.integers(-3, 10**20) | st.floats() | st.booleans()
ROWS = st.lists(
    st.dictionaries(
        st.sampled_from([*FIELDS, "extra"]),
        CELLS | st.sampled_from(["c1", "agent", "/etc/passwd", "../x.wav", "a\x00.wav", "{}", '{"k": 1}', "[1]"]),
    ).map(lambda row: {"conversation_id": "c1", "turn": 0, "speaker": "agent"} | row),
    max_size=6,
)


def read_all(path: Path) -> list[TurnRow | RowError]:
    results = list(read_turns(path))
    for result in results:
        assert isinstance(result, TurnRow | RowError)
        if isinstance(result, TurnRow):  # a parsed turn satisfies the format's rules
            turn = result.turn
            assert turn.text is not None or turn.audio_path is not None
            assert turn.turn >= 0 and turn.conversation_id and turn.speaker
            for value in (turn.start_s, turn.end_s):
                assert value is None or (math.isfinite(value) and value >= 0)
            if turn.audio_path is not None:
                assert not turn.audio_path.startswith("/") and ".." not in turn.audio_path.split("/")
        else:
            assert result.message
    return results


def jsonl_line(row: Any) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n"


@SETTINGS
@given(rows=ROWS, junk=st.lists(st.binary(max_size=40), max_size=3))
def test_jsonl_rows_become_turns_or_row_errors(
    tmp_path_factory: pytest.TempPathFactory, rows: list, junk: list
) -> None:
    path = tmp_path_factory.mktemp("jsonl") / "turns.jsonl"
    lines = [jsonl_line(row) for row in rows] + [raw.replace(b"\n", b" ") + b"\n" for raw in junk]
    path.write_bytes(b"".join(lines))
    results = read_all(path)
    non_blank = [number for number, line in enumerate(lines, start=1) if line.strip()]
    assert [result.row for result in results] == non_blank  # one result per non-blank line, none lost


@SETTINGS
@given(rows=ROWS, raw_tail=st.binary(max_size=60))
def test_csv_rows_become_turns_or_row_errors(
    tmp_path_factory: pytest.TempPathFactory, rows: list, raw_tail: bytes
) -> None:
    path = tmp_path_factory.mktemp("csv") / "turns.csv"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*FIELDS, "extra"])
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    path.write_bytes(buffer.getvalue().encode("utf-8", "surrogatepass") + raw_tail)
    results = read_all(path)
    assert len([result for result in results if isinstance(result, TurnRow)]) <= len(rows) + raw_tail.count(b"\n") + 1


@SETTINGS
@given(rows=ROWS)
def test_parquet_rows_become_turns_or_row_errors(tmp_path_factory: pytest.TempPathFactory, rows: list) -> None:
    path = tmp_path_factory.mktemp("parquet") / "turns.parquet"
    # Parquet columns are typed: each column takes the strings of its cells (a mixed column would not write).
    columns = {name: [None if row.get(name) is None else str(row[name]) for row in rows] for name in FIELDS}
    pq.write_table(pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()}), path)
    results = read_all(path)
    assert [result.row for result in results] == list(range(1, len(rows) + 1))


UNICODE = st.characters(exclude_categories=("Cs",))  # lone surrogates cannot be written as UTF-8
VALID_ROWS = st.lists(
    st.fixed_dictionaries(
        {
            "conversation_id": st.text(UNICODE, min_size=1, max_size=10),
            "turn": st.integers(0, 10**9),
            "speaker": st.text(UNICODE, min_size=1, max_size=10),
            "text": st.text(UNICODE, min_size=1, max_size=30),
        },
        optional={
            "audio_path": st.sampled_from(["a.wav", "calls/2026/b.flac"]),
            "start_s": st.floats(0, 1e5),
            "end_s": st.floats(0, 1e5),
            "metadata": st.dictionaries(st.text(UNICODE, max_size=5), st.integers() | st.text(UNICODE, max_size=5)),
        },
    ),
    min_size=1,
    max_size=4,
)


@SETTINGS
@given(rows=ROWS, valid_rows=VALID_ROWS)
def test_every_turn_read_back_is_the_turn_written(
    tmp_path_factory: pytest.TempPathFactory, rows: list, valid_rows: list
) -> None:
    """A valid turn survives JSONL: read, written with write_turns's format, read again, unchanged."""
    valid = []
    for row in rows + valid_rows:  # arbitrary rows, most of them invalid, and rows built valid
        try:
            valid.append(Turn.model_validate(row))
        except ValidationError:
            continue
    path = tmp_path_factory.mktemp("round") / "turns.jsonl"
    path.write_text("".join(turn.model_dump_json(exclude_none=True) + "\n" for turn in valid), encoding="utf-8")
    assert [result.turn for result in read_all(path) if isinstance(result, TurnRow)] == valid

"""Output writers cut back to a committed position, and the manifest that records the positions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scoring.manifest import Commit, Manifest, ManifestError
from scoring.output import open_sink, parts_dir, prediction_schema
from tests.scoring.helpers import read_rows

SCHEMA = prediction_schema(("neutral", "anger"))


def _rows(conversation: str, n: int) -> list[dict[str, object]]:
    return [
        {
            "conversation_id": conversation,
            "turn": t,
            "speaker": "customer",
            "channel": None,
            "label": "anger",
            "p_neutral": 0.25,
            "p_anger": 0.75,
            "sentiment": "negative",
            "confidence": 0.75,
            "model_version": "v",
            "error": None,
        }
        for t in range(n)
    ]


@pytest.mark.parametrize("name", ["out.jsonl", "out.csv", "out.parquet"])
def test_a_reopened_sink_drops_what_was_not_committed(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    sink = open_sink(path, SCHEMA, None)
    sink.append(_rows("a", 2))
    position = sink.commit()
    sink.append(_rows("b", 3))
    sink.commit()  # on disk, but the manifest never heard of it: the tail a kill leaves
    sink.close()

    sink = open_sink(path, SCHEMA, position)
    sink.append(_rows("c", 1))
    sink.finish()
    sink.cleanup()
    sink.close()
    assert [(r["conversation_id"], r["turn"]) for r in read_rows(path)] == [("a", 0), ("a", 1), ("c", 0)]
    assert not parts_dir(path).exists()


def test_manifest_resumes_from_complete_lines_and_drops_a_torn_one(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl.manifest"
    manifest, progress = Manifest.open(path, {"input": "x"})
    assert progress.positions is None
    manifest.commit(Commit({"output": 10}, [("a", 2)], [7], {"invalid_row": 1}))
    manifest.close()
    with path.open("ab") as file:
        file.write(b'{"positions": {"output": 99}, "conv')  # killed while appending

    manifest, progress = Manifest.open(path, {"input": "x"})
    assert (progress.rows, progress.positions, progress.done_conversations, progress.done_records) == (
        3,
        {"output": 10},
        {"a"},
        {7},
    )
    manifest.commit(Commit({"output": 20}, [("b", 1)], [], {}))
    manifest.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line.get("positions") for line in lines] == [None, {"output": 10}, {"output": 20}]


def test_manifest_of_another_run_is_refused_unless_restarting(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl.manifest"
    manifest, _ = Manifest.open(path, {"input": "x", "context": "bidirectional"})
    manifest.commit(Commit({"output": 10}, [("a", 2)], [], {}))
    manifest.close()
    with pytest.raises(ManifestError, match="context.*--restart"):
        Manifest.open(path, {"input": "x", "context": "causal"})
    manifest, progress = Manifest.open(path, {"input": "x", "context": "causal"}, restart=True)
    manifest.close()
    assert progress.rows == 0 and len(path.read_text().splitlines()) == 1

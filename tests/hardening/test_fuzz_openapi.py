"""Schemathesis over the service's own OpenAPI document, against a real `equipoise serve` process on loopback
(the tiny exported model), on SQLite and on PostgreSQL: no generated request, valid or not, may get a 5xx.

Every operation of the document is fuzzed, none is excluded: the prediction endpoints in both media types they
document (JSON with base64 audio, and multipart with an audio file), the admin endpoints (auth is off on
loopback, so the generated requests reach the handlers instead of stopping at 401), health and metrics.
Schemathesis runs as its command-line tool (the same command docs/RELIABILITY.md gives), once with positive
(schema-conforming) and once with negative (schema-violating) data, each through its phases `examples`,
`coverage` (boundaries, wrong types, unsupported methods) and `fuzzing` (`MAX_EXAMPLES` Hypothesis cases per
operation). The seed is fixed so that a run is reproducible; set HARDENING_FUZZ_SEED to explore further.
The status codes answered are counted per operation from the HAR report and printed for the docs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.api.conftest import Server, new_database, running_server
from tests.hardening.conftest import FIGURES

MAX_EXAMPLES = 100  # Hypothesis cases per operation and mode in the fuzzing phase
SEED = int(os.environ.get("HARDENING_FUZZ_SEED", "20261123"))
MODES = ("positive", "negative")
UNDOCUMENTED_METHOD = "(undocumented methods)"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def fuzzed_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_artifact: Path
) -> Iterator[Server]:
    root = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    settings = {"default_model_dir": str(tiny_artifact), "batch_max_wait_ms": "2"}
    with new_database(request.param, root) as url, running_server(root / "state", url, **settings) as server:
        yield server


def schemathesis_command(url: str, mode: str, report_dir: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json"),
        *("--checks", "not_a_server_error", "--mode", mode, "--phases", "examples,coverage,fuzzing"),
        *("--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1", "--request-timeout", "30"),
        *("--generation-database", "none", "--report", "har,json", "--report-dir", str(report_dir), "--no-color"),
    ]


def operation_of(method: str, url: str, templates: dict[re.Pattern[str], tuple[str, set[str]]]) -> str:
    """The label ("POST /v1/jobs") of the documented operation a request went to; undocumented methods on a
    documented path count under UNDOCUMENTED_METHOD."""
    path = urlsplit(url).path
    for pattern, (template, methods) in templates.items():
        if pattern.fullmatch(path):
            return f"{method} {template}" if method in methods else UNDOCUMENTED_METHOD
    raise AssertionError(f"schemathesis requested {method} {path}, which is not in the document")


def test_schemathesis_gets_no_server_error_from_any_operation(fuzzed_server: Server, tmp_path: Path) -> None:
    document = httpx.get(f"{fuzzed_server.url}/openapi.json").json()
    templates = {
        re.compile("[^/]+".join(map(re.escape, re.split(r"\{[^}]+\}", path)))): (path, {m.upper() for m in item})
        for path, item in document["paths"].items()
    }
    operations = {f"{method} {path}" for path, methods in templates.values() for method in methods}
    answers: defaultdict[str, Counter[int]] = defaultdict(Counter)
    generated = 0
    for mode in MODES:
        report_dir = tmp_path / mode
        run = subprocess.run(  # in tmp_path: schemathesis keeps a cache directory where it runs
            schemathesis_command(fuzzed_server.url, mode, report_dir),
            capture_output=True,
            text=True,
            timeout=540,
            cwd=tmp_path,
        )
        assert run.returncode == 0, f"schemathesis ({mode}) failed:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
        (summary,) = report_dir.glob("json-*.json")
        report = json.loads(summary.read_text())
        assert report["failures"] == [] and report["test_cases"]["errored"] == 0, report["failures"]
        assert report["operations"]["tested"] == len(operations)
        generated += report["test_cases"]["generated"]
        (har,) = report_dir.glob("har-*.json")
        for entry in json.loads(har.read_text())["log"]["entries"]:
            label = operation_of(entry["request"]["method"], entry["request"]["url"], templates)
            answers[label][entry["response"]["status"]] += 1

    total = sum(sum(counts.values()) for counts in answers.values())
    server_errors = {label: counts for label, counts in answers.items() if any(status >= 500 for status in counts)}
    FIGURES.append(
        f"schemathesis on {fuzzed_server.database_url.split(':', 1)[0]} (seed {SEED}, {MAX_EXAMPLES} examples per "
        f"operation and mode): {len(operations)} operations, {generated} test cases, {total} requests"
    )
    for label, counts in sorted(answers.items(), key=lambda item: item[0].split(" ")[::-1]):
        FIGURES.append(f"  {label}: {sum(counts.values())} requests, statuses {dict(sorted(counts.items()))}")
    assert not server_errors, f"5xx answers: {server_errors}"
    assert operations <= set(answers), f"operations never requested: {operations - set(answers)}"
    # The fuzzing got past validation into the model and the database, not only into 4xx answers.
    assert answers["POST /v1/predict/utterance"][200] > 0 and answers["POST /v1/jobs"][201] > 0
    log = fuzzed_server.log()
    assert "Traceback" not in log and " 500 " not in log

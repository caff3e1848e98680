"""The Prometheus configuration, alerting rules and Grafana dashboard are valid, and their PromQL parses."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
PROMETHEUS = MONITORING / "prometheus"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "equipoise.json"
METRIC_NAME = re.compile(r"\bequipoise_[a-z0-9_]+")


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("TESTS_REQUIRE_PROMTOOL") == "1":
            pytest.fail("promtool required (TESTS_REQUIRE_PROMTOOL=1) but not installed; run `make tools`")
        pytest.skip("promtool not installed (Debian package `prometheus`; `make tools` installs it)")
    return found


def _run(promtool: str, *args: str, cwd: Path = PROMETHEUS) -> str:
    result = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return expressions + [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]


def rule_expressions() -> list[str]:
    groups = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def metrics_used() -> set[str]:
    """Every equipoise_* series the dashboard and the rules read."""
    return {name for expr in dashboard_expressions() + rule_expressions() for name in METRIC_NAME.findall(expr)}


def test_config_and_rules_are_valid(promtool: str) -> None:
    assert "SUCCESS" in _run(promtool, "check", "config", "prometheus.yml")
    assert "12 rules found" in _run(promtool, "check", "rules", "rules.yml")


def test_alerts_fire_on_their_series_and_only_then(promtool: str) -> None:
    _run(promtool, "test", "rules", "rules_test.yml")


def test_every_dashboard_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses rule expressions, so each dashboard query becomes a recording rule to be checked."""
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(dashboard_expressions())]
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dash", "rules": rules}]}))
    assert f"{len(rules)} rules found" in _run(promtool, "check", "rules", "dashboard_rules.yml", cwd=tmp_path)


def test_dashboard_covers_the_product_signals() -> None:
    used = metrics_used()
    for signal in (
        "equipoise_http_request_duration_seconds_bucket",
        "equipoise_predictions_total",
        "equipoise_monitor_class_share",
        "equipoise_monitor_drift_js_distance",
        "equipoise_monitor_minority_recall",
        "equipoise_monitor_estimated_prior",
        "equipoise_monitor_minority_recall_estimated_upper",
        "equipoise_collapse_events_total",
        "equipoise_retraining_jobs",
        "equipoise_model_versions",
        "equipoise_labelled_predictions",
        "equipoise_calls_queued",
        "equipoise_call_real_time_factor_bucket",
    ):
        assert signal in used

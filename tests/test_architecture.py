"""The import-linter contracts of pyproject.toml (docs/ARCHITECTURE.md): kept by the tree, broken by an upward
import. The broken case runs on a copy of the packages, so the real tree is never touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def packages() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return config["tool"]["importlinter"]["root_packages"]


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT), str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def copy_tree(into: Path) -> Path:
    for package in packages():
        shutil.copytree(ROOT / package, into / package, ignore=shutil.ignore_patterns("*.onnx", "*.safetensors"))
    shutil.copy(ROOT / "pyproject.toml", into / "pyproject.toml")
    return into


def test_the_tree_keeps_every_contract() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("core/settings.py", "import model.labels"),
        ("model/labels.py", "from training import metrics"),
        ("scoring/summary.py", "import monitoring.drift"),
        ("migrations/env.py", "import model.artifact"),
    ],
)
def test_an_upward_import_breaks_a_contract(tmp_path: Path, module: str, upward: str) -> None:
    tree = copy_tree(tmp_path)
    path = tree / module
    path.write_text(path.read_text(encoding="utf-8") + f"\n{upward}  # added by the test\n", encoding="utf-8")
    result = lint(tree)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert upward.split()[1].split(".")[0] in result.stdout

"""The int8 sensitivity benchmark builds every variant, scores MELD dev with it and prints one row each."""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest

from benchmarks.int8_sensitivity import main, text_layers

pytestmark = pytest.mark.data


def test_every_variant_is_built_scored_and_timed(
    tiny_artifact: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layers = text_layers(tiny_artifact / "encoder.onnx")
    assert layers == [f"text.bert.encoder.layer.{i}." for i in range(len(layers))] and layers

    assert main(["--artifact", str(tiny_artifact), "--data-dir", str(data_dir), "--n", "32"]) == 0

    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| (every|only|blockwise)", line)]
    assert len(rows) == 1 + len(layers) + 2
    for row in rows:
        agreement, changed = (cell.strip() for cell in row.split("|")[2:4])
        assert 0 <= float(agreement.rstrip("%")) <= 100 and int(changed) >= 0
        assert float(row.split("|")[6].strip().rstrip("×")) > 0


def test_blockwise_variant_uses_matmul_nbits(tiny_artifact: Path, tmp_path: Path) -> None:
    from benchmarks.int8_sensitivity import blockwise_int8

    graph = blockwise_int8(None, accuracy_level=4)(tiny_artifact / "encoder.onnx", tmp_path / "blockwise.onnx")
    assert any(node.op_type == "MatMulNBits" for node in onnx.load(graph).graph.node)

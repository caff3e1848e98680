"""The CTranslate2 model.bin reader: the real Whisper file, and small files written here byte by byte."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from model.ctranslate2_file import SUPPORTED_VERSION, CTranslate2FormatError, read_model
from model.whisper_encoder import weights_path


def _name(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _variable(name: str, array: np.ndarray, type_id: int, size: int | None = None) -> bytes:
    dims = b"".join(struct.pack("<I", d) for d in array.shape)
    data = array.tobytes()
    declared = len(data) if size is None else size
    return _name(name) + struct.pack("<B", array.ndim) + dims + struct.pack("<BI", type_id, declared) + data


def _model_bytes(
    variables: list[bytes] | None = None, aliases: list[tuple[str, str]] | None = None, version: int = 6
) -> bytes:
    if variables is None:
        variables = [
            _variable("encoder/weight", np.arange(6, dtype="<f2").reshape(2, 3), 4),
            _variable("encoder/bias", np.array([0.5, -1.0], dtype="<f4"), 0),
            _variable("encoder/num_heads", np.array(6, dtype="<i2"), 2),
            _variable("flag", np.array(1, dtype="i1"), 1),
            _variable("count", np.array([7], dtype="<i4"), 3),
        ]
    aliases = [("decoder/weight", "encoder/weight")] if aliases is None else aliases
    head = struct.pack("<I", version) + _name("TestSpec") + struct.pack("<II", 2, len(variables))
    tail = struct.pack("<I", len(aliases)) + b"".join(_name(a) + _name(t) for a, t in aliases)
    return head + b"".join(variables) + tail


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    return path


def test_reads_every_dtype_shape_and_alias(tmp_path: Path) -> None:
    model = read_model(_write(tmp_path, _model_bytes()))
    assert (model.spec, model.revision) == ("TestSpec", 2)
    assert list(model.variables) == ["encoder/weight", "encoder/bias", "encoder/num_heads", "flag", "count"]
    np.testing.assert_array_equal(model["encoder/weight"], np.arange(6, dtype=np.float16).reshape(2, 3))
    assert model["encoder/weight"].dtype == np.float16
    np.testing.assert_array_equal(model["encoder/bias"], [0.5, -1.0])
    assert model.scalar("encoder/num_heads") == 6 and model.scalar("flag") == 1
    assert model["count"].dtype == np.int32 and model["count"].shape == (1,)
    assert model["decoder/weight"] is model["encoder/weight"]


@pytest.mark.parametrize("version", [1, 5, 7])
def test_rejects_other_versions(tmp_path: Path, version: int) -> None:
    with pytest.raises(CTranslate2FormatError, match=f"version {version}; .* version {SUPPORTED_VERSION} only"):
        read_model(_write(tmp_path, _model_bytes(version=version)))


def test_rejects_every_truncation(tmp_path: Path) -> None:
    data = _model_bytes()
    for cut in range(len(data)):
        with pytest.raises(CTranslate2FormatError):
            read_model(_write(tmp_path, data[:cut]))


@pytest.mark.parametrize(
    ("variables", "aliases", "message"),
    [
        ([_variable("w", np.zeros(4, "<f4"), 0, size=12)], [], "declares 12 bytes"),
        ([_variable("w", np.zeros(2, "<u2"), 5)], [], r"dtype id 5 \(bfloat16\)"),
        ([_variable("w", np.zeros(2, "<f4"), 9)], [], r"dtype id 9 \(unknown\)"),
        ([_variable("w", np.zeros(2, "<f4"), 0)] * 2, [], "appears twice"),
        ([_variable("w", np.zeros(2, "<f4"), 0)], [("v", "missing")], "names a missing variable"),
    ],
)
def test_rejects_inconsistent_files(
    tmp_path: Path, variables: list[bytes], aliases: list[tuple[str, str]], message: str
) -> None:
    with pytest.raises(CTranslate2FormatError, match=message):
        read_model(_write(tmp_path, _model_bytes(variables, aliases)))


def test_rejects_trailing_bytes_and_a_name_without_nul(tmp_path: Path) -> None:
    with pytest.raises(CTranslate2FormatError, match="3 unexpected bytes"):
        read_model(_write(tmp_path, _model_bytes() + b"abc"))
    data = _model_bytes().replace(b"TestSpec\0", b"TestSpecX")
    with pytest.raises(CTranslate2FormatError, match="lacks its NUL"):
        read_model(_write(tmp_path, data))


def test_reads_the_real_whisper_file() -> None:
    model = read_model(weights_path())
    assert (model.spec, model.revision, len(model.variables)) == ("WhisperSpec", 3, 148)
    assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert model["encoder/position_encodings/encodings"].shape == (1500, 384)
    assert model["encoder/layer_3/self_attention/linear_0/weight"].shape == (1152, 384)
    assert model["encoder/conv1/weight"].dtype == np.float16
    assert model.scalar("encoder/num_heads") == 6


def test_rejects_the_real_file_with_another_version(tmp_path: Path) -> None:
    path = shutil.copyfile(weights_path(), tmp_path / "model.bin")
    with path.open("r+b") as handle:
        handle.write(struct.pack("<I", 5))
    with pytest.raises(CTranslate2FormatError, match="version 5"):
        read_model(path)

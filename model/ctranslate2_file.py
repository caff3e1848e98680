"""Reader of CTranslate2's `model.bin` (binary format version 6) into named numpy arrays; no CTranslate2 needed.

Layout, little-endian throughout: uint32 format version; the spec name; uint32 spec revision; uint32 variable
count; per variable its name, uint8 rank, `rank` uint32 dimensions, uint8 dtype id, uint32 byte count and the
raw bytes; then uint32 alias count and (alias, target) name pairs. A name is a uint16 byte length that counts a
trailing NUL, then the UTF-8 bytes and the NUL.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUPPORTED_VERSION = 6
# CTranslate2's DataType ids. 5 is bfloat16, which numpy cannot hold: such a file is refused by name.
DTYPES: Mapping[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
}
UNSUPPORTED_DTYPES: Mapping[int, str] = {5: "bfloat16"}


class CTranslate2FormatError(ValueError):
    """The file is not a CTranslate2 model this reader understands (wrong version, truncated, inconsistent)."""


@dataclass(frozen=True)
class CTranslate2Model:
    spec: str
    revision: int
    variables: Mapping[str, np.ndarray]  # read-only views into the file's bytes
    aliases: Mapping[str, str]  # alias -> variable name

    def __getitem__(self, name: str) -> np.ndarray:
        return self.variables[self.aliases.get(name, name)]

    def scalar(self, name: str) -> int | float:
        return self[name].item()


def read_model(path: Path) -> CTranslate2Model:
    """Every variable and alias of a version-6 `model.bin`; raises CTranslate2FormatError when it is not one."""
    cursor = _Cursor(Path(path).read_bytes(), Path(path).name)
    version = cursor.unpack("<I")
    if version != SUPPORTED_VERSION:
        raise CTranslate2FormatError(
            f"{cursor.source}: binary format version {version}; this reader supports version {SUPPORTED_VERSION} only"
        )
    spec, revision = cursor.name(), cursor.unpack("<I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(cursor.unpack("<I")):
        name = cursor.name()
        if name in variables:
            raise CTranslate2FormatError(f"{cursor.source}: variable {name!r} appears twice")
        variables[name] = _variable(cursor, name)
    aliases = {}
    for _ in range(cursor.unpack("<I")):
        alias, target = cursor.name(), cursor.name()
        if target not in variables:
            raise CTranslate2FormatError(f"{cursor.source}: alias {alias!r} names a missing variable {target!r}")
        aliases[alias] = target
    cursor.expect_end()
    return CTranslate2Model(spec=spec, revision=revision, variables=variables, aliases=aliases)


def _variable(cursor: _Cursor, name: str) -> np.ndarray:
    shape = tuple(cursor.unpack("<I") for _ in range(cursor.unpack("<B")))
    type_id = cursor.unpack("<B")
    if type_id not in DTYPES:
        kind = UNSUPPORTED_DTYPES.get(type_id, "unknown")
        raise CTranslate2FormatError(f"{cursor.source}: variable {name!r} has dtype id {type_id} ({kind})")
    dtype, size = DTYPES[type_id], cursor.unpack("<I")
    if size != math.prod(shape) * dtype.itemsize:
        raise CTranslate2FormatError(
            f"{cursor.source}: variable {name!r} of shape {shape} and dtype {dtype} declares {size} bytes"
        )
    return np.frombuffer(cursor.take(size), dtype=dtype).reshape(shape)


class _Cursor:
    def __init__(self, data: bytes, source: str) -> None:
        self.data, self.source, self.offset = memoryview(data), source, 0

    def take(self, size: int) -> memoryview:
        if self.offset + size > len(self.data):
            raise CTranslate2FormatError(
                f"{self.source}: truncated at byte {self.offset} ({size} bytes needed, {self.remaining} left)"
            )
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def unpack(self, fmt: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def name(self) -> str:
        raw = bytes(self.take(self.unpack("<H")))
        if not raw.endswith(b"\0"):
            raise CTranslate2FormatError(f"{self.source}: a name at byte {self.offset - len(raw)} lacks its NUL")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as error:
            raise CTranslate2FormatError(f"{self.source}: a name is not UTF-8 ({error})") from None

    @property
    def remaining(self) -> int:
        return len(self.data) - self.offset

    def expect_end(self) -> None:
        if self.remaining:
            raise CTranslate2FormatError(f"{self.source}: {self.remaining} unexpected bytes after the aliases")

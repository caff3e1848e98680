"""File helpers shared by the artifact, the pinned weights, the logging spool and batch output."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The file's SHA-256, read in chunks so large weights never sit in memory whole."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries durable (a file created or renamed in it survives a power loss)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

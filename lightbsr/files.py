"""One atomic file write: a file appears whole, with its bytes on disk, or not at all.

The data goes to a temporary file beside the target, is flushed and fsync'ed, and replaces the
target with `os.replace` (atomic on POSIX within one folder); the folder is then fsync'ed so the
rename itself survives a crash. On any failure the temporary file is removed and an existing
target is left as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes"]

FILE_MODE = 0o644  # mkstemp makes the file private; the result is an ordinary file


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(handle)` on a temporary file beside `path`, then put it in place atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, FILE_MODE)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` so that `path` either holds all of it or is untouched."""
    return atomic_write(path, lambda file: file.write(data))


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; some filesystems (and Windows) cannot open a folder, which is fine."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)

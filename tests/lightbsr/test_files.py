"""`lightbsr.files.atomic_write_bytes`: a file appears whole or not at all, with no temporary left."""

from __future__ import annotations

import errno
import os
import resource
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from lightbsr.files import atomic_write, atomic_write_bytes

pytestmark = pytest.mark.unit


def test_a_write_replaces_the_whole_file_and_leaves_only_it(tmp_path):
    path = tmp_path / "sub" / "data.bin"
    atomic_write_bytes(path, b"a much longer first version")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["data.bin"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def _limit_file_size(limit: int) -> None:
    """In the child: files may not grow past `limit` bytes, and writing past it is an error, not a signal."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_write_that_fails_part_way_keeps_the_old_file_and_no_temporary(tmp_path):
    """The kernel refuses the write after 64 KiB (RLIMIT_FSIZE -> EFBIG): a real failure mid-write."""
    path = tmp_path / "data.bin"
    atomic_write_bytes(path, b"old contents")
    script = textwrap.dedent(
        f"""
        from lightbsr.files import atomic_write_bytes
        try:
            atomic_write_bytes({str(path)!r}, b"x" * (1 << 20))
        except OSError as error:
            print("failed", error.errno)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        preexec_fn=lambda: _limit_file_size(64 * 1024),
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split() == ["failed", str(errno.EFBIG)], done.stderr
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["data.bin"]


def test_a_writer_that_raises_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "data.bin"
    atomic_write_bytes(path, b"old contents")

    def half_then_fail(file) -> None:
        file.write(b"new, half written")
        raise RuntimeError("the producer broke")

    with pytest.raises(RuntimeError, match="producer broke"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["data.bin"]

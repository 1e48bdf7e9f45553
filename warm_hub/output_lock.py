"""The lock of an output folder: two merges into one `--out` never share its partial folder or its rename.

An `flock` on `OUT.warm-hub-lock`, beside the partial folder, held from before the partial folder is touched
until the output is in place (and pushed). The kernel drops it when the process dies, so a killed merge never
leaves a stale lock; the file records who holds it, for the message of the run that finds it taken.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from .constants import LOCK_SUFFIX
from .errors import OutputInUseError


def lock_path(out: Path) -> Path:
    return out.parent / (out.name + LOCK_SUFFIX)


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold the lock of `out` for the duration of the block.

    Args:
        out: the output folder (it need not exist; its parent is created).

    Yields:
        The lock file's path.

    Raises:
        OutputInUseError: another process (or another merge in this one) holds it; the message says who.
    """
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, out)
    try:
        os.ftruncate(fd, 0)
        since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        yield path
    finally:
        # Unlinked while still held: a run that opened the old file sees the inode change and tries again.
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _acquire(path: Path, out: Path) -> int:
    while True:
        try:  # never through a link: it would truncate and overwrite whatever file it points to
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise OutputInUseError(f"{path} is a link, not warm-hub's lock file; remove it and rerun") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise OutputInUseError(
                f"{out} is being written by another merge ({holder or 'holder unknown'}, lock {path}); wait for it"
                " to finish or choose another --out"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder finished and removed this file between our open and our lock: start over


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""

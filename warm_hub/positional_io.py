"""Positional reads and writes of whole buffers: `os.preadv`/`os.pwrite` may move fewer bytes than asked.

One home for the loop every reader of a local file (ingredients, a downloaded shard, a resumed output) and every
writer of one needs; the caller says what a short read means, since only it knows which file ended early.
"""

from __future__ import annotations

import os


def pread_full(fd: int, buffer: memoryview, offset: int) -> int:
    """Fill `buffer` from `fd` at `offset`, looping over short reads.

    Args:
        fd: an open file descriptor (reads do not move its position, so threads may share it).
        buffer: where the bytes go; filled from its start.
        offset: the file position of the first byte.

    Returns:
        The bytes read: `len(buffer)`, or fewer when the file ends first (the caller raises its own error).
    """
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` to `fd` at `offset`, looping over short writes (an `OSError` propagates)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


__all__ = ["pread_full", "pwrite_all"]

"""The resume journal: which chunks of a partial output are finished, and for which plan.

One line of JSON naming the plan's fingerprint, the chunk size and how chunks are numbered, then one line per
finished chunk, appended after its bytes were written. A merge killed at any point resumes from it to the same
bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from .constants import JOURNAL_NAME
from .errors import ResumeMismatchError

# How `engine.work_items` numbers the chunks of a plan. A journal numbered another way (an older warm-hub's) is
# refused: its chunk numbers would name other bytes. 2: runs of small tensors are grouped into one chunk.
ITEM_NUMBERING = 2


class ResumeJournal:
    """The journal of a partial output folder; use `start` or `load`, not the constructor."""

    def __init__(self, path: Path, *, chunk: int, done: set[int]) -> None:
        self.path, self.chunk = path, chunk
        self._done = done
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    @classmethod
    def start(cls, folder: Path, *, fingerprint: str, chunk: int) -> ResumeJournal:
        """Begin a fresh journal (call once the shard files exist with their headers)."""
        path = folder / JOURNAL_NAME
        head = {"fingerprint": fingerprint, "chunk": chunk, "items": ITEM_NUMBERING}
        path.write_text(json.dumps(head) + "\n", encoding="utf-8")
        return cls(path, chunk=chunk, done=set())

    @classmethod
    def load(
        cls, folder: Path, *, fingerprint: str, usable_chunk: Callable[[int], bool] = lambda chunk: chunk > 0
    ) -> ResumeJournal | None:
        """The journal of an interrupted merge of the same plan, or None when there is nothing to resume.

        `usable_chunk` says whether a chunk size is one the engine could have chosen (the journal sits on the
        user's disk: a damaged one must not reach the engine).

        Raises:
            ResumeMismatchError: the journal was written for another plan (other inputs, weights or layout), by a
                warm-hub that numbers chunks another way, or its chunk size is damaged.
        """
        path = folder / JOURNAL_NAME
        if not path.is_file():
            return None
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
        try:
            head = json.loads(lines[0])
            chunk = head["chunk"]
        except (ValueError, KeyError, TypeError, RecursionError):  # a head cut short: nothing was done yet
            return None
        if head.get("fingerprint") != fingerprint:
            raise ResumeMismatchError(
                f"{folder} holds a partial merge of other inputs or options; rerun without --resume to start over"
            )
        if head.get("items", 1) != ITEM_NUMBERING:
            raise ResumeMismatchError(
                f"{folder} holds a partial merge written by another version of warm-hub, which divides the work"
                " differently; rerun without --resume to start over"
            )
        if not isinstance(chunk, int) or isinstance(chunk, bool) or not usable_chunk(chunk):
            raise ResumeMismatchError(
                f"{folder}'s journal is damaged (chunk size {str(chunk)[:20]}); rerun without --resume to start over"
            )
        # Only newline-terminated lines count: a line cut short by a crash is simply done again.
        done = {int(line) for line in lines[1:-1] if line.isascii() and line.isdigit()}
        return cls(path, chunk=chunk, done=done)

    def done(self) -> set[int]:
        return set(self._done)

    def record(self, index: int) -> None:
        os.write(self._fd, b"%d\n" % index)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

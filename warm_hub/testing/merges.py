"""Merges that tests stop part-way: a progress bar that interrupts one, and a merge slow enough to kill."""

from __future__ import annotations

# `python -c SLOW_MERGE MEMBER... OUT`: a merge whose progress callback sleeps 50 ms per chunk, so that a test
# can kill it, or start another one, while it is still writing.
SLOW_MERGE = """
import sys, time
import warm_hub

class SlowBar:
    def __init__(self, **kwargs): pass
    def __enter__(self): return self
    def __exit__(self, *exc): pass
    def update(self, n): time.sleep(0.05)

warm_hub.merge(sys.argv[1:-1], sys.argv[-1], max_memory="300KB", tqdm_class=SlowBar)
"""


def interrupting_bar(after: int, error: type[BaseException] = KeyboardInterrupt) -> type:
    """A progress-bar class for `merge(tqdm_class=...)` that raises `error` at its `after`-th update (Ctrl-C)."""

    class InterruptingBar:
        def __init__(self, **kwargs) -> None:
            self.calls = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def update(self, n: int) -> None:
            self.calls += 1
            if self.calls == after:
                raise error

    return InterruptingBar

"""What tests read from the CLI's output: the one error line a refusal prints on stderr."""

from __future__ import annotations


def error_line(stderr: str, *, alone: bool = False) -> str:
    """The CLI's `Error: ...` line, asserting there is exactly one.

    Args:
        stderr: what the command wrote to stderr.
        alone: the error must be the only non-blank line (no traceback either); otherwise other lines (the
            library's INFO/WARNING, the loopback Hub's own tracebacks) may come before it and the error is last.

    Returns:
        The error line.
    """
    lines = [line for line in stderr.splitlines() if line.strip()]
    if alone:
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in stderr, stderr
    else:
        assert lines and sum(line.startswith("Error: ") for line in lines) == 1, stderr
    return lines[-1]


__all__ = ["error_line"]

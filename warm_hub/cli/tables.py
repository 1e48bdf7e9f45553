"""Plain-text tables for the CLI's reports (`evaluate`, `inspect`, `finetune`, `best-of-n`, `demo`)."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(rows: Sequence[Sequence[object]], *, left: int | None = None, rule: bool = False) -> str:
    """Columns padded to their widest cell, two spaces apart, trailing spaces trimmed.

    Args:
        rows: the header row first, then the body; cells are shown with `str`.
        left: how many leading columns are left-aligned (names); the rest are right-aligned (figures). None:
            every column is left-aligned.
        rule: draw a line of dashes under the header.

    Returns:
        The table's lines joined by newlines (no trailing newline).
    """
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for n, row in enumerate(cells):
        padded = (
            cell.ljust(width) if left is None or i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        lines.append("  ".join(padded).rstrip())
        if n == 0 and rule:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


__all__ = ["format_table"]

"""Human sizes (`512MB`, `5GB`, `2GiB`) to bytes and back, as the CLI and recipes write them."""

from __future__ import annotations

import re
from fractions import Fraction

from .errors import InvalidOptionError

MAX_SIZE = 2**63 - 1  # what a file offset can hold

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int, *, option: str = "size") -> int:
    """`"512MB"` -> 512_000_000; units are decimal (KB, MB, GB, TB) or binary (KiB, MiB, GiB, TiB).

    Raises:
        InvalidOptionError: not a positive size, or one beyond any file offset (2**63 - 1 bytes).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]{1,40}(?:\.[0-9]{1,40})?)\s*([A-Za-z]*)\s*", str(text)[:200])
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise InvalidOptionError(f"{option}: {str(text)[:40]!r} is not a size (examples: 512MB, 5GB, 2GiB)")
        # Exact arithmetic: a float would overflow to inf on a long number, and round big sizes.
        value = int(Fraction(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise InvalidOptionError(f"{option}: the size must be positive, got {str(text)[:40]!r}")
    if value > MAX_SIZE:
        raise InvalidOptionError(f"{option}: {str(text)[:40]!r} is too large (at most {format_size(MAX_SIZE)})")
    return value


def format_size(n: int) -> str:
    """2_500_000_000 -> '2.50 GB'."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"

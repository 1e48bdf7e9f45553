"""The output-folder rule `merge`, `finetune` and `demo` share: refuse a file, refuse a non-empty folder unless
told to replace it, and then remove only what the command itself writes there.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from .errors import OutputExistsError


def check_output(out: Path, *, overwrite: bool, replaces: str = "it") -> bool:
    """Refuse an output that exists as a file (or a dangling link), or as a non-empty folder without `overwrite`.

    Args:
        out: the output folder asked for.
        overwrite: whether a non-empty folder may be replaced.
        replaces: what `--overwrite` replaces, for the refusal's hint ("it", "its members").

    Returns:
        Whether `out` is a non-empty folder (that `overwrite` allows replacing).

    Raises:
        OutputExistsError: `out` is a file, or a non-empty folder and `overwrite` is false.
    """
    if out.is_file() or out.is_symlink() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is a file (or a link to nothing)")
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and not overwrite:
        raise OutputExistsError(f"{out} exists and is not empty (pass --overwrite to replace {replaces})")
    return occupied


def prepare_output(out: Path, *, overwrite: bool, owns: Callable[[str], bool], replaces: str = "it") -> None:
    """`check_output`, then remove the entries of `out` the command wrote earlier and make the folder.

    Args:
        out: the output folder.
        overwrite: whether a non-empty folder may be replaced.
        owns: whether an entry name is one the command writes; only those are removed, so `--out .
            --overwrite` never empties someone's folder.
        replaces: what `--overwrite` replaces, for the refusal's hint.

    Raises:
        OutputExistsError: as `check_output`.
    """
    if check_output(out, overwrite=overwrite, replaces=replaces):
        for entry in out.iterdir():
            if owns(entry.name):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


__all__ = ["check_output", "prepare_output"]

"""Errors raised by warm-hub.

Every error is a `WarmHubError` and also inherits the stdlib type a caller would naturally catch, so
`except ValueError` or `except OSError` keeps working. The CLI prints any of them as one line.
"""

from __future__ import annotations


class WarmHubError(Exception):
    """Base class of every error warm-hub raises on purpose."""


class CheckpointFormatError(WarmHubError, ValueError):
    """A checkpoint file is malformed: bad header, offsets, dtype, truncated data, unsafe path."""


class PickleCheckpointError(CheckpointFormatError):
    """A checkpoint only has pickle weights (`.bin`, `.pt`), which warm-hub never unpickles."""


class AdapterNotSupportedError(WarmHubError, ValueError):
    """A source is a PEFT (LoRA) adapter, which `merge` does not average (yet)."""


class SourceNotFoundError(WarmHubError, FileNotFoundError):
    """A source (folder, file or repo) does not exist."""


class IncompatibleCheckpointsError(WarmHubError, ValueError):
    """The ingredients cannot be averaged: names, shapes, architectures or integer tensors differ."""


class NonFiniteWeightsError(WarmHubError, ValueError):
    """An ingredient holds NaN or Inf values, or the average overflows the output dtype."""


class OutputExistsError(WarmHubError, FileExistsError):
    """The output folder exists and is not empty, and `overwrite` was not given."""


class OutputOverlapsInputError(WarmHubError, ValueError):
    """`out` is, contains or lies inside an ingredient: writing it would change or delete the inputs."""


class OutputInUseError(WarmHubError, OSError):
    """Another merge holds the lock of the same output folder."""


class DiskFullError(WarmHubError, OSError):
    """Writing the output failed for lack of space (or a file size limit)."""


class ResumeMismatchError(WarmHubError, ValueError):
    """`resume` was asked for, but the partial output was made from a different plan."""


class InvalidOptionError(WarmHubError, ValueError):
    """An option has a value that cannot be used (weights, dtype, memory size, ...)."""


class IncompleteOutputError(WarmHubError, ValueError):
    """A folder is not a complete warm-hub merge output (for example when pushing it)."""


class UnsupportedAdapterError(WarmHubError, ValueError):
    """A PEFT adapter of a kind warm-hub cannot merge (not LoRA, DoRA, embedding or convolution targets, ...)."""


class PreferenceDataError(WarmHubError, ValueError):
    """Preference data lacks the `chosen`/`rejected` columns or holds values of the wrong kind."""

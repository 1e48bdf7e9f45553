"""Hub failures as one clear line each: what went wrong with which repo, and what to do about it.

huggingface_hub's errors put the HTTP status and request id first; `translate` turns them (and network errors)
into warm-hub errors whose first line is the helpful one, which is all the CLI prints. Tokens never appear.

Translating serves users better than letting huggingface_hub's errors propagate: only warm-hub knows what to do
next (log in, accept a gated repo's conditions, rerun with `--resume`, that a push is atomic). It is the one
translator: every Hub call of warm-hub (merge, push, evaluate, finetune, `RewardModel.from_pretrained`) goes
through `hub_errors(...)` or `translate`, so the same failure reads the same way in every command.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .errors import SourceNotFoundError, WarmHubError

LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"
RERUN_HINT = "retry later (rerun with --resume to continue)"


class HubAccessError(WarmHubError, PermissionError):
    """A private or gated repo that the current token (or the lack of one) cannot read or write."""


class HubTransferError(WarmHubError, ConnectionError):
    """The Hub could not be reached, or kept failing after retries. A rerun (with `--resume`) continues."""


class HubOfflineError(SourceNotFoundError):
    """`HF_HUB_OFFLINE=1` and what is needed is not in the local Hugging Face cache."""


def has_token(token: str | bool | None) -> bool:
    """Whether a request would carry a token (without ever returning it)."""
    if token is False:
        return False
    if isinstance(token, str):
        return bool(token)
    from huggingface_hub import get_token

    return get_token() is not None


def hub_cause(exc: BaseException) -> BaseException | None:
    """The huggingface_hub or network error behind `exc` (itself, or one of its causes), or None.

    Uploads wrap their errors in `RuntimeError`, and transformers wraps Hub errors in `OSError`: the cause
    is what says what went wrong.
    """
    import httpx2
    from huggingface_hub import errors as hf

    kinds = (hf.HfHubHTTPError, hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError, httpx2.TransportError)
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, WarmHubError):
            return None  # already one of ours: it says what to do
        if isinstance(cause, kinds):
            return cause
        seen.add(id(cause))
        # An error raised `from None` chose to hide its context: that context is not what went wrong.
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return None


def translate(
    exc: BaseException,
    *,
    repo_id: str,
    revision: str | None = None,
    token: str | bool | None = None,
    what: str = "",
    action: str = "read",
    retry: str = RERUN_HINT,
) -> BaseException:
    """The warm-hub error for a huggingface_hub or httpx failure about `repo_id`, or `exc` itself if unknown.

    Args:
        exc: the exception raised by huggingface_hub / httpx (or one wrapping it, as uploads and transformers do).
        repo_id: the repo the request was about.
        revision: the revision asked for, named in "revision not found".
        token: the token the request used (only its presence matters).
        what: the file the request was about, if any.
        action: `read` (download, load, pin) or `push` (create a repo, upload, commit).
        retry: what a user can do after a server or network failure (the end of the message).

    Returns:
        A `SourceNotFoundError`, `HubAccessError` or `HubTransferError`, or `exc` when it is not a Hub failure.
    """
    import httpx2
    from huggingface_hub import errors as hf

    cause = hub_cause(exc)
    if cause is None:
        return exc
    if action == "push":
        return _push_error(cause, repo_id=repo_id, token=token, retry=retry)
    where = f"{repo_id}@{revision}" if revision else repo_id
    if isinstance(cause, hf.GatedRepoError):
        if has_token(token):
            return HubAccessError(
                f"{repo_id} is a gated repo and your token has no access yet: accept its conditions at"
                f" https://huggingface.co/{repo_id} with the account of your token, then retry"
            )
        return HubAccessError(
            f"{repo_id} is a gated repo: accept its conditions at https://huggingface.co/{repo_id}, then {LOGIN_HINT}"
        )
    if isinstance(cause, hf.RevisionNotFoundError):
        return SourceNotFoundError(f"{repo_id} has no revision {revision!r} (expected a branch, tag or commit sha)")
    if isinstance(cause, hf.RemoteEntryNotFoundError):
        return SourceNotFoundError(f"{where}: file {what!r} not found in the repo" if what else f"{where}: not found")
    if isinstance(cause, hf.RepositoryNotFoundError):
        if has_token(token):
            return SourceNotFoundError(
                f"{repo_id}: repository not found on the Hub, or your token cannot read it (check the name and the"
                " token's permissions)"
            )
        return SourceNotFoundError(
            f"{repo_id}: repository not found on the Hub (no local folder of that name either); if it is private,"
            f" {LOGIN_HINT}"
        )
    if isinstance(cause, hf.OfflineModeIsEnabled) or (isinstance(cause, hf.LocalEntryNotFoundError) and _offline()):
        return HubOfflineError(
            f"{where}: HF_HUB_OFFLINE=1 is set and {what or 'this repo'} is not in the local Hugging Face cache;"
            " download it once online (e.g. `hf download " + repo_id + "`) or unset HF_HUB_OFFLINE"
        )
    if isinstance(cause, hf.LocalEntryNotFoundError):
        return HubTransferError(
            f"{where}: could not reach the Hub for {what or 'this repo'} and it is not in the local cache; check your"
            " connection and retry"
        )
    if isinstance(cause, hf.HfHubHTTPError):
        status = _status(cause)
        if status in (401, 403):
            hint = "your token lacks the permission" if has_token(token) else LOGIN_HINT
            return HubAccessError(f"{where}: the Hub refused access (HTTP {status}); {hint}")
        target = f" ({what})" if what else ""
        return HubTransferError(f"{where}{target}: the Hub answered HTTP {status}; {retry}")
    assert isinstance(cause, httpx2.TransportError)
    target = f" while reading {what}" if what else ""
    return HubTransferError(
        f"{where}: network error{target} ({type(cause).__name__}: {cause}); check your connection and {retry},"
        " or set HF_HUB_OFFLINE=1 to use the local cache"
    )


def _status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def _push_error(cause: BaseException, *, repo_id: str, token: str | bool | None, retry: str) -> BaseException:
    """One line for a failed push (create the repo, upload, commit)."""
    from huggingface_hub import errors as hf

    if isinstance(cause, hf.HfHubHTTPError):
        status = _status(cause)
        if isinstance(cause, hf.RepositoryNotFoundError) or status in (401, 403):
            if not has_token(token):
                return HubAccessError(f"cannot push to {repo_id} without a token: {LOGIN_HINT} (write access)")
            return HubAccessError(
                f"cannot push to {repo_id}: your token has no write access to it (or to its organization)"
            )
        return HubTransferError(f"pushing to {repo_id} failed (the Hub answered HTTP {status}); {retry}")
    return HubTransferError(f"pushing to {repo_id} failed (network error: {type(cause).__name__}); {retry}")


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


@contextlib.contextmanager
def hub_errors(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    what: str = "",
    action: str = "read",
    retry: str = RERUN_HINT,
) -> Iterator[None]:
    """Translate huggingface_hub and network failures inside the block with `translate` (same arguments).

    Errors that merely wrap a Hub failure (transformers' `OSError`, an upload's `RuntimeError`) are translated
    too; anything else goes through unchanged.

    Raises:
        SourceNotFoundError: repo, revision or file not found.
        HubAccessError: gated or private without access.
        HubTransferError: network failure or a Hub server error.
    """
    try:
        yield
    except Exception as exc:
        translated = translate(
            exc, repo_id=repo_id, revision=revision, token=token, what=what, action=action, retry=retry
        )
        if translated is exc:
            raise
        raise translated from exc


__all__ = [
    "HubAccessError",
    "HubOfflineError",
    "HubTransferError",
    "LOGIN_HINT",
    "RERUN_HINT",
    "has_token",
    "hub_cause",
    "hub_errors",
    "translate",
]

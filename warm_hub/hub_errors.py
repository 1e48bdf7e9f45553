"""Hub failures as one clear line each: what went wrong with which repo, and what to do about it.

huggingface_hub's errors put the HTTP status and request id first; `hub_errors` turns them (and network errors)
into warm-hub errors whose first line is the helpful one, which is all the CLI prints. Tokens never appear.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .errors import SourceNotFoundError, WarmHubError

LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"


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


def translate(
    exc: BaseException, *, repo_id: str, revision: str | None = None, token: str | bool | None = None, what: str = ""
) -> BaseException:
    """The warm-hub error for a huggingface_hub or httpx failure about `repo_id`, or `exc` itself if unknown.

    Args:
        exc: the exception raised by huggingface_hub / httpx.
        repo_id: the repo the request was about.
        revision: the revision asked for, named in "revision not found".
        token: the token the request used (only its presence matters).
        what: the file the request was about, if any.
    """
    import httpx2
    from huggingface_hub import errors as hf

    where = f"{repo_id}@{revision}" if revision else repo_id
    if isinstance(exc, hf.GatedRepoError):
        if has_token(token):
            return HubAccessError(
                f"{repo_id} is a gated repo and your token has no access yet: accept its conditions at"
                f" https://huggingface.co/{repo_id} with the account of your token, then retry"
            )
        return HubAccessError(
            f"{repo_id} is a gated repo: accept its conditions at https://huggingface.co/{repo_id}, then {LOGIN_HINT}"
        )
    if isinstance(exc, hf.RevisionNotFoundError):
        return SourceNotFoundError(f"{repo_id} has no revision {revision!r} (expected a branch, tag or commit sha)")
    if isinstance(exc, hf.RemoteEntryNotFoundError):
        return SourceNotFoundError(f"{where}: file {what!r} not found in the repo" if what else f"{where}: not found")
    if isinstance(exc, hf.RepositoryNotFoundError):
        if has_token(token):
            return SourceNotFoundError(
                f"{repo_id}: repository not found on the Hub, or your token cannot read it (check the name and the"
                " token's permissions)"
            )
        return SourceNotFoundError(
            f"{repo_id}: repository not found on the Hub (no local folder of that name either); if it is private,"
            f" {LOGIN_HINT}"
        )
    if isinstance(exc, hf.OfflineModeIsEnabled) or (isinstance(exc, hf.LocalEntryNotFoundError) and _offline()):
        return HubOfflineError(
            f"{where}: HF_HUB_OFFLINE=1 is set and {what or 'this repo'} is not in the local Hugging Face cache;"
            " download it once online (e.g. `hf download " + repo_id + "`) or unset HF_HUB_OFFLINE"
        )
    if isinstance(exc, hf.LocalEntryNotFoundError):
        return HubTransferError(
            f"{where}: could not reach the Hub for {what or 'this repo'} and it is not in the local cache; check your"
            " connection and retry"
        )
    if isinstance(exc, hf.HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        if status in (401, 403):
            hint = "your token lacks the permission" if has_token(token) else LOGIN_HINT
            return HubAccessError(f"{where}: the Hub refused access (HTTP {status}); {hint}")
        target = f" ({what})" if what else ""
        return HubTransferError(f"{where}{target}: the Hub answered HTTP {status}; retry later (with --resume)")
    if isinstance(exc, httpx2.TransportError):
        target = f" while reading {what}" if what else ""
        return HubTransferError(
            f"{where}: network error{target} ({type(exc).__name__}: {exc}); check your connection and rerun with"
            " --resume, or set HF_HUB_OFFLINE=1 to use the local cache"
        )
    return exc


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


@contextlib.contextmanager
def hub_errors(
    repo_id: str, *, revision: str | None = None, token: str | bool | None = None, what: str = ""
) -> Iterator[None]:
    """Translate huggingface_hub and network failures inside the block with `translate`.

    Raises:
        SourceNotFoundError: repo, revision or file not found.
        HubAccessError: gated or private without access.
        HubTransferError: network failure or a Hub server error.
    """
    import httpx2
    from huggingface_hub import errors as hf

    try:
        yield
    except (hf.HfHubHTTPError, hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError, httpx2.TransportError) as exc:
        translated = translate(exc, repo_id=repo_id, revision=revision, token=token, what=what)
        if translated is exc:
            raise
        raise translated from exc


__all__ = [
    "HubAccessError",
    "HubOfflineError",
    "HubTransferError",
    "LOGIN_HINT",
    "has_token",
    "hub_errors",
    "translate",
]

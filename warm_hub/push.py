"""Push a merge output folder to the Hub: check it is complete, render its card, check the token, then
`create_repo` (when missing) and ONE `create_commit` carrying every file, so a failure leaves the Hub as it was.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
from pathlib import Path

from huggingface_hub.utils import logging

from . import __version__
from .constants import ADAPTER_CONFIG, CONFIG_NAME, JOURNAL_NAME, PARTIAL_SUFFIX, RECIPE_NAME, SAFE_INDEX
from .errors import IncompleteOutputError
from .hub_errors import LOGIN_HINT, HubAccessError, has_token, hub_errors
from .recipe import WarmRecipe, hash_file

logger = logging.get_logger(__name__)


def check_merge_output(folder: str | os.PathLike) -> WarmRecipe:
    """Check that `folder` is a complete warm-hub merge output whose shards match their hashes in the recipe.

    Returns:
        The recipe.

    Raises:
        IncompleteOutputError: not a folder, a partial merge, or a missing or altered file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise IncompleteOutputError(f"{folder}: no such folder")
    if folder.name.endswith(PARTIAL_SUFFIX) or (folder / JOURNAL_NAME).exists():
        raise IncompleteOutputError(f"{folder} is an unfinished merge; finish it with `warm-hub merge ... --resume`")
    recipe = WarmRecipe.load(folder)
    config_name = ADAPTER_CONFIG if recipe.output == "adapter" else CONFIG_NAME  # --as-adapter outputs
    if not (folder / config_name).is_file():
        raise IncompleteOutputError(f"{folder}: {config_name} is missing; not a complete merge output")
    if not recipe.shards:
        raise IncompleteOutputError(f"{folder}: {RECIPE_NAME} lists no weight shards")
    for name, expected in recipe.shards.items():
        path = folder / name
        if not path.is_file():
            raise IncompleteOutputError(f"{folder}: shard {name} listed in {RECIPE_NAME} is missing")
        try:
            digest = hash_file(path, expected)
        except ValueError as exc:
            raise IncompleteOutputError(f"{folder}: {RECIPE_NAME}: {exc}") from None
        if digest != expected:
            raise IncompleteOutputError(
                f"{folder}: {name} does not match the hash in {RECIPE_NAME} (altered or truncated); merge again"
            )
    if len(recipe.shards) > 1 or (folder / SAFE_INDEX).exists():
        try:
            index = json.loads((folder / SAFE_INDEX).read_text(encoding="utf-8"))
            files = set(index["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise IncompleteOutputError(f"{folder}: {SAFE_INDEX} is missing or malformed") from None
        if files != set(recipe.shards):
            raise IncompleteOutputError(f"{folder}: {SAFE_INDEX} and {RECIPE_NAME} name different shards")
    return recipe


def upload_files(folder: Path) -> list[Path]:
    """Every file of the output to push: its regular files, except hidden ones (caches, lock files).

    Symbolic links are never followed out of the folder: a link (to a file or a folder) or any other entry that
    is not a regular file, such as a FIFO, is refused rather than skipped, since the output would then go up
    without it.

    Raises:
        IncompleteOutputError: the folder holds a link or a special file.
    """
    files = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in [*dirs, *names]:
            path = here / name
            if name.startswith(".") and name not in dirs:
                continue
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise IncompleteOutputError(
                    f"{path} is a symbolic link; only regular files inside the folder are pushed (copy the file in)"
                )
            if not stat.S_ISDIR(mode) and not stat.S_ISREG(mode):
                raise IncompleteOutputError(f"{path} is not a regular file; remove it before pushing")
            if stat.S_ISREG(mode):
                files.append(path)
    return sorted(files)


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
) -> str:
    """Push a complete merge output to `repo_id` in one atomic commit.

    Everything that can fail is checked first: the folder (complete, hashes, regular files only), the card
    (rendered in memory so that its usage snippet names `repo_id`; the local README.md is replaced by it only once
    the commit succeeded) and the token (`whoami`). Only then is the repo created, when missing, and the commit
    sent; a repo created by this push is deleted again if the commit fails, so a failed push leaves the Hub as
    it was.

    Args:
        folder: the merge output folder.
        repo_id: `org/name`; created when missing.
        private: create the repo as private (an existing repo keeps its visibility).
        token: Hub token with write access; None uses `HF_TOKEN` or the login cache.
        commit_message: the commit title (a default names the ingredients' count and warm-hub's version).

    Returns:
        The URL of the commit.

    Raises:
        IncompleteOutputError: `folder` is not a complete merge output (nothing is sent).
        HubAccessError: no token, or one without write access to `repo_id`.
        HubTransferError: the upload or the commit failed; the repo's files are unchanged.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    from .card import CARD_NAME, card_text

    folder = Path(folder)
    recipe = check_merge_output(folder)
    files = [p for p in upload_files(folder) if p.relative_to(folder).as_posix() != CARD_NAME]
    card = card_text(folder, repo_id=repo_id, token=token).encode("utf-8")
    rerun = (
        "the commit is atomic (the repo gets all files or none): rerun"
        f" `warm-hub push {shlex.quote(str(folder))} {shlex.quote(repo_id)}`"
    )
    if not has_token(token):
        raise HubAccessError(f"cannot push to {repo_id} without a token: {LOGIN_HINT} (write access)")
    api = HfApi(endpoint=constants.ENDPOINT, library_name="warm-hub", library_version=__version__)
    operations = [CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card)]
    for path in files:
        name = path.relative_to(folder).as_posix()
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)))
    message = commit_message or (
        f"WARM merge of {len(recipe.ingredients)} reward models (warm-hub {recipe.tool_version or __version__})"
    )
    total = sum(p.stat().st_size for p in files) + len(card)
    with hub_errors(repo_id, token=token, action="push", retry=rerun):
        _check_token(api, repo_id, token)
        created = _create_repo(api, repo_id, private=private, token=token)
    logger.info("pushing %d files (%d bytes) to %s in one commit", len(operations), total, repo_id)
    try:
        with hub_errors(repo_id, token=token, action="push", retry=rerun):
            info = api.create_commit(repo_id, operations, commit_message=message, token=token)
    except BaseException as exc:
        if created:
            _delete_created_repo(api, repo_id, token, exc)
        raise
    # Now that the Hub has it, the local card says the same (its usage snippet names the repo).
    (folder / CARD_NAME).write_bytes(card)
    logger.info("pushed %s: %s", repo_id, info.commit_url)
    return str(info.commit_url)


def _check_token(api, repo_id: str, token: str | bool | None) -> None:
    """Refuse a token the Hub does not know, or one that can only read, before anything is created."""
    from huggingface_hub import errors as hf

    try:
        who = api.whoami(token=token)
    except hf.HfHubHTTPError as exc:
        if getattr(getattr(exc, "response", None), "status_code", None) == 401:
            raise HubAccessError(
                f"cannot push to {repo_id}: the Hub does not accept your token (expired or revoked?); {LOGIN_HINT}"
            ) from None
        raise
    access = (who.get("auth") or {}).get("accessToken") or {} if isinstance(who, dict) else {}
    if access.get("role") == "read":
        raise HubAccessError(f"cannot push to {repo_id}: your token is read-only; use one with write access")


def _create_repo(api, repo_id: str, *, private: bool | None, token: str | bool | None) -> bool:
    """Create `repo_id` unless it exists; return whether this call created it (only then may a failure delete it)."""
    from huggingface_hub import errors as hf

    try:
        api.create_repo(repo_id, private=private, exist_ok=False, token=token)
    except hf.HfHubHTTPError as exc:
        if getattr(getattr(exc, "response", None), "status_code", None) == 409:
            return False  # it exists already
        raise
    return True


def _delete_created_repo(api, repo_id: str, token: str | bool | None, failure: BaseException) -> None:
    """Delete the (empty) repo this push created, after its commit failed."""
    try:
        api.delete_repo(repo_id, token=token, missing_ok=True)
    except Exception as exc:  # noqa: BLE001 - the commit's failure is the one to report
        logger.warning(
            "%s was created for this push but could not be deleted after the commit failed (%s); it is empty",
            repo_id,
            type(exc).__name__,
        )
    else:
        logger.info("deleted %s again: it was created for this push, whose commit failed", repo_id)

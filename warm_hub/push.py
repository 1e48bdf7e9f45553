"""Push a merge output folder to the Hub: check it is complete, refresh its card, then `create_repo` and ONE
`create_commit` carrying every file, so a failure leaves the remote repo's files as they were.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub.utils import logging

from . import __version__
from .errors import IncompleteOutputError
from .hub_errors import LOGIN_HINT, HubAccessError, HubTransferError, has_token
from .journal import JOURNAL_NAME
from .recipe import RECIPE_NAME, WarmRecipe, hash_file
from .sources import SAFE_INDEX

logger = logging.get_logger(__name__)

PARTIAL_SUFFIX = ".warm-hub-partial"  # same as merge.PARTIAL_SUFFIX; not imported to keep torch out of `push`


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
    config_name = "adapter_config.json" if recipe.output == "adapter" else "config.json"  # --as-adapter outputs
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
    """Every file of the output to push: all regular files, except hidden ones (caches, lock files)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
) -> str:
    """Push a complete merge output to `repo_id` in one atomic commit.

    The card is rendered again first, so that its usage snippet names `repo_id`.

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

    from .card import write_card

    folder = Path(folder)
    recipe = check_merge_output(folder)
    write_card(folder, repo_id=repo_id, token=token)
    api = HfApi(endpoint=constants.ENDPOINT, library_name="warm-hub", library_version=__version__)
    files = upload_files(folder)
    operations = []
    for path in files:
        name = path.relative_to(folder).as_posix()
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)))
    message = commit_message or (
        f"WARM merge of {len(recipe.ingredients)} reward models (warm-hub {recipe.tool_version or __version__})"
    )
    total = sum(p.stat().st_size for p in files)
    logger.info("pushing %d files (%d bytes) to %s in one commit", len(operations), total, repo_id)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        info = api.create_commit(repo_id, operations, commit_message=message, token=token)
    except Exception as exc:
        translated = _push_error(exc, repo_id=repo_id, token=token, folder=folder)
        if translated is None:
            raise
        raise translated from exc
    logger.info("pushed %s: %s", repo_id, info.commit_url)
    return str(info.commit_url)


def _push_error(exc: BaseException, *, repo_id: str, token: str | bool | None, folder: Path) -> Exception | None:
    """One line for a failed push, found in `exc` or its causes (uploads wrap errors in RuntimeError)."""
    import httpx2
    from huggingface_hub import errors as hf

    rerun = f"the commit is atomic (the repo gets all files or none): rerun `warm-hub push {folder.name} {repo_id}`"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, hf.HfHubHTTPError):
            status = getattr(getattr(cause, "response", None), "status_code", None)
            if isinstance(cause, hf.RepositoryNotFoundError) or status in (401, 403):
                if not has_token(token):
                    return HubAccessError(f"cannot push to {repo_id} without a token: {LOGIN_HINT} (write access)")
                return HubAccessError(
                    f"cannot push to {repo_id}: your token has no write access to it (or to its organization)"
                )
            return HubTransferError(f"pushing to {repo_id} failed (the Hub answered HTTP {status}); {rerun}")
        if isinstance(cause, httpx2.TransportError):
            return HubTransferError(f"pushing to {repo_id} failed (network error: {type(cause).__name__}); {rerun}")
        cause = cause.__cause__ or cause.__context__
    return None

"""Publishing fine-tuned members: a short model card beside each, and a push of each to its own Hub repo.

Members are pushed as they are (standard checkpoints); merging them is `warm-hub merge`'s job.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub.utils import logging

from ..constants import CARD_NAME, MEMBER_CONFIG_NAME
from .config import MemberConfig

logger = logging.get_logger(__name__)


def write_member_card(path: Path, member: MemberConfig) -> None:
    """Write README.md: what the member is, its hyperparameters, where the exact settings are."""
    from huggingface_hub import ModelCard, ModelCardData

    base_on_hub = not Path(member.base).exists() and "/" in member.base
    data = ModelCardData(
        base_model=member.base if base_on_hub else None,
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=["reward-model", "warm", "warm-member", "warm-hub"],
    )
    dropout = "the base's own" if member.dropout is None else f"{member.dropout:g}"
    body = (
        f"# {member.name}\n\nOne member of a WARM run (Weight Averaged Reward Models, Ramé et al., ICML 2024): a"
        " Bradley-Terry reward model fine-tuned from a shared linear-probed init, meant to be weight-averaged with"
        " its sibling members (`warm-hub merge`).\n\n"
        f"- learning rate: {member.learning_rate:g}\n- dropout: {dropout}\n- seed (data order): {member.seed}\n"
        f"- steps: {member.steps}\n- label noise: {member.corrupt_labels:g}\n\n"
        f"The exact training settings are in `{MEMBER_CONFIG_NAME}`.\n"
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(path / CARD_NAME)


def push_members(paths: list[Path], prefix: str, *, private: bool = False, token=None) -> list[str]:
    """Push each member folder to `prefix-<member name>` on the Hub, one commit per repo.

    Returns:
        The commit URLs.
    """
    from huggingface_hub import HfApi

    from ..hub_errors import hub_errors

    api = HfApi(token=token)
    urls = []
    for path in paths:
        repo_id = f"{prefix}-{path.name}"
        retry = f"the members are saved: push {path} again with `hf upload {repo_id} {path}`"
        with hub_errors(repo_id, token=token, action="push", retry=retry):
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=path, commit_message=f"Upload WARM {path.name}")
        urls.append(str(info.commit_url if hasattr(info, "commit_url") else info))
        logger.info("pushed %s to %s", path.name, repo_id)
    return urls

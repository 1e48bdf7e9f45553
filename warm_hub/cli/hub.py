"""`warm-hub push` and `warm-hub card`: publish a merge output folder, and write or refresh its model card."""

from __future__ import annotations

import click


@click.command("push")
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, default=None, help="Create the repo as private (an existing repo keeps its).")
@click.option("--message", "-m", help="Commit message (default: names the merge and warm-hub's version).")
def push_command(folder: str, repo_id: str, private: bool | None, message: str | None) -> None:
    """Push the merge output FOLDER to the Hub repo REPO_ID in one atomic commit.

    The folder must be a complete merge output (its shards match warm_recipe.yaml). The model card is refreshed
    so that its usage snippet names REPO_ID. Needs a token with write access (`hf auth login` or HF_TOKEN).
    """
    from warm_hub.push import push_to_hub

    url = push_to_hub(folder, repo_id, private=private, commit_message=message)
    click.echo(f"Pushed {folder} to {repo_id}: {url}")


@click.command("card")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option(
    "--eval-results",
    type=click.Path(dir_okay=False),
    help="Evaluation JSON (from `warm-hub evaluate --json`): adds an accuracy table and model-index metadata.",
)
@click.option("--repo-id", help="The Hub repo the model is (or will be) pushed to; named in the usage snippet.")
def card_command(folder: str, eval_results: str | None, repo_id: str | None) -> None:
    """Write or refresh README.md, the model card of the merge output FOLDER.

    Without --eval-results, an eval_results.json already in FOLDER is used when present.
    """
    from warm_hub.card import write_card

    path = write_card(folder, repo_id=repo_id, eval_results=eval_results)
    click.echo(f"Wrote {path}")

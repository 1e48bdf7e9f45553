"""The model card of a merge output: front matter and body rendered from `cards/*.md.jinja`.

Cards are built with huggingface_hub's `ModelCard`/`ModelCardData`, so their metadata is what the Hub expects
(`base_model`, `base_model_relation: merge`, `pipeline_tag`, tags). They never hold a token or a local path.
"""

from __future__ import annotations

import shlex
from importlib import resources
from pathlib import Path

from .recipe import WarmRecipe

TEMPLATE = "warm_model_card.md.jinja"
CARD_NAME = "README.md"
TAGS = ["warm", "reward-model", "merge", "warm-hub"]


def reproduce_command(recipe: WarmRecipe, *, out: str) -> str:
    """The `warm-hub merge` command that makes this output again."""
    parts = ["warm-hub", "merge"]
    for ing in recipe.ingredients:
        if ing.local:
            parts.append(f"./{ing.source}")
        else:
            parts.append(f"{ing.source}@{ing.revision}" if ing.revision else ing.source)
    weights = [ing.weight for ing in recipe.ingredients]
    if any(abs(w - weights[0]) > 1e-12 for w in weights):
        parts += ["--weights", ",".join(f"{w:.6g}" for w in weights)]
    if recipe.dtype != "auto":
        parts += ["--dtype", recipe.dtype]
    parts += ["--out", out]
    return " ".join(shlex.quote(p) for p in parts)


def render_card(
    recipe: WarmRecipe,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
):
    """Render the model card of a merge.

    Args:
        recipe: the merge's recipe.
        repo_id: where the model lives (or will) on the Hub; used in the usage snippet.
        model_name: the card's title (defaults to the repo name).
        license: a license id, when every ingredient has the same one.
        datasets: preference datasets the members were trained on, when known.

    Returns:
        A `huggingface_hub.ModelCard`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    name = model_name or (repo_id.split("/")[-1] if repo_id else "warm-reward-model")
    hub_ingredients = [i.source for i in recipe.ingredients if not i.local]
    card_data = ModelCardData(
        base_model=hub_ingredients or None,
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=list(TAGS),
        license=license,
        datasets=datasets,
        base_model_relation="merge",
    )
    template = resources.files("warm_hub.cards").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=name,
        repo_id=repo_id or f"<your-org>/{name}",
        ingredients=recipe.ingredients,
        local_ingredients=any(i.local for i in recipe.ingredients),
        recipe_yaml=recipe.to_yaml(),
        tool_version=recipe.tool_version,
        command=reproduce_command(recipe, out=name),
        eval_rows=None,
        eval_splits=[],
        eval_plot=None,
    )


def write_card(folder: Path, *, repo_id: str | None = None, **kwargs) -> Path:
    """Render the card of the merge output in `folder` and save it as its README.md."""
    folder = Path(folder)
    card = render_card(
        WarmRecipe.load(folder), repo_id=repo_id, model_name=kwargs.pop("model_name", None) or folder.name, **kwargs
    )
    path = folder / CARD_NAME
    card.save(path)
    return path

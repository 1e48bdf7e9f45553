"""The model card of a merge output: front matter and body rendered from `cards/*.md.jinja`.

The front matter is the Hub's model card metadata (`base_model`, `base_model_relation: merge`, `license` when
the ingredients agree, `model-index` from evaluation results); huggingface_hub's `ModelCard` parses it back. It
is built here with PyYAML rather than with `huggingface_hub.ModelCard`, whose import costs a local merge more
than writing its card. Cards never hold a token or a local path.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import yaml
from huggingface_hub.utils import logging

from .constants import CARD_NAME, EVAL_RESULTS_NAME, PARTIAL_SUFFIX
from .eval_results import EvalResults
from .recipe import Ingredient, WarmRecipe

logger = logging.get_logger(__name__)

TEMPLATE = "warm_model_card.md.jinja"
TAGS = ["warm", "reward-model", "merge", "warm-hub"]
MAX_CARD_BYTES = 1 << 20
PLOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".webp", ".gif")
DEFAULT_HUB_URL = "https://huggingface.co"


def hub_url() -> str:
    """The Hub the card links to: the configured endpoint (`HF_ENDPOINT`: a mirror, an enterprise Hub)."""
    from huggingface_hub import constants

    return (constants.ENDPOINT or DEFAULT_HUB_URL).rstrip("/")


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
    if recipe.base is not None:
        parts += ["--base", f"./{recipe.base.source}" if recipe.base.local else recipe.base.source]
        if recipe.output == "adapter":
            parts.append("--as-adapter")
    parts += ["--out", out]
    return " ".join(shlex.quote(p) for p in parts)


def ingredient_metadata(
    ingredients: list[Ingredient], *, token: str | bool | None = None
) -> tuple[str | None, list[str] | None]:
    """The license all ingredients agree on, and the datasets any names, read from their Hub cards.

    Local ingredients and cards that cannot be read leave the license unknown (None): a license is only
    claimed when every ingredient's card states the same one. Never raises: metadata is optional.

    Returns:
        (license or None, datasets or None).
    """
    licenses: list[str | None] = []
    datasets: dict[str, None] = {}

    def card_data(ing: Ingredient) -> dict | None:
        return None if ing.local else _hub_card_data(ing.source, ing.revision, token=token)

    # All at once: each card costs round trips (a merge reads them while its weights stream; 8 cards one by one
    # took 0.27 s with 30 ms per answer).
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(ingredients))), thread_name_prefix="warm-cards") as pool:
        cards = list(pool.map(card_data, ingredients))
    for data in cards:
        if data is None:
            licenses.append(None)
            continue
        licenses.append(data.get("license") if isinstance(data.get("license"), str) else None)
        found = data.get("datasets")
        for name in [found] if isinstance(found, str) else found if isinstance(found, list) else []:
            if isinstance(name, str):
                datasets[name] = None
    agreed = licenses[0] if licenses and licenses[0] and all(x == licenses[0] for x in licenses) else None
    return agreed, list(datasets) or None


def _hub_card_data(repo_id: str, revision: str | None, *, token: str | bool | None) -> dict | None:
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo_id, CARD_NAME, revision=revision, token=token)
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable card only leaves the license unknown
        logger.debug("no card metadata for %s: %s", repo_id, type(exc).__name__)
        return None
    return read_front_matter(Path(path))


def read_front_matter(path: Path) -> dict:
    """The YAML metadata block at the top of a model card, or {} when it has none or it cannot be parsed.

    Cards come from anyone (Hub repos, hand edits), so this reads at most `MAX_CARD_BYTES`, parses with
    `yaml.safe_load` (no object construction) and never raises.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CARD_BYTES + 1)
        if len(raw) > MAX_CARD_BYTES:
            return {}
        text = raw.decode("utf-8").replace("\r\n", "\n")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[4 : end + 1])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def card_metadata(
    recipe: WarmRecipe,
    *,
    model_name: str,
    license: str | None = None,
    datasets: list[str] | None = None,
    eval_results: EvalResults | None = None,
) -> dict:
    """The card's front matter, as the Hub reads it (keys without a value are left out)."""
    hub_ingredients = list(dict.fromkeys(i.source for i in recipe.ingredients if not i.local))
    index = eval_results.model_index(model_name) if eval_results else []
    data = {
        "base_model": hub_ingredients or None,
        "base_model_relation": "merge",
        "datasets": datasets or None,
        "library_name": "transformers",
        "license": license,
        "pipeline_tag": "text-classification",
        "tags": list(TAGS),
        "model-index": [{"name": model_name, "results": index}] if index else None,
    }
    if recipe.output == "adapter" and recipe.base is not None:  # a PEFT adapter: it needs its base to load
        data["base_model"] = None if recipe.base.local else [recipe.base.source]
        data["base_model_relation"] = "adapter"
        data["library_name"] = "peft"
    return {key: value for key, value in data.items() if value is not None}


@functools.lru_cache(maxsize=1)
def load_template():
    """The compiled Jinja template of the card (compiled once; a merge warms it while its engine streams)."""
    import jinja2

    return jinja2.Template(resources.files("warm_hub.cards").joinpath(TEMPLATE).read_text(encoding="utf-8"))


def render_card(
    recipe: WarmRecipe,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    eval_results: EvalResults | None = None,
    eval_plot: str | None = None,
) -> str:
    """Render the model card of a merge.

    Args:
        recipe: the merge's recipe.
        repo_id: where the model lives (or will) on the Hub; used in the usage snippet.
        model_name: the card's title (defaults to the repo name).
        license: a license id, when every ingredient has the same one.
        datasets: preference datasets the members were trained on, when known.
        eval_results: evaluation to show as a table and as `model-index` metadata.
        eval_plot: file name of an evaluation plot in the same folder as the card.

    Returns:
        The card's text (YAML front matter, then Markdown).
    """
    name = model_name or (repo_id.split("/")[-1] if repo_id else "warm-reward-model")
    metadata = card_metadata(recipe, model_name=name, license=license, datasets=datasets, eval_results=eval_results)
    seeds, seed_splits, seed_rows = eval_results.seed_rows(name) if eval_results else ([], [], [])
    front_matter = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=1000).strip()
    text = load_template().render(
        card_data=front_matter,
        model_name=name,
        repo_id=repo_id or f"<your-org>/{name}",
        ingredients=recipe.ingredients,
        local_ingredients=any(i.local for i in recipe.ingredients),
        recipe_yaml=recipe.to_yaml(),
        tool_version=recipe.tool_version,
        command=reproduce_command(recipe, out=name),
        eval_rows=eval_results.rows(name) if eval_results else None,
        eval_splits=list(eval_results.splits) if eval_results else [],
        eval_dataset=(eval_results.dataset_name if eval_results else None),
        eval_plot=eval_plot,
        base=recipe.base,
        adapter_output=recipe.output == "adapter",
        hub_url=hub_url(),
        default_hub_url=DEFAULT_HUB_URL,
        eval_intervals=bool(eval_results) and any("ci" in r for m in eval_results.splits.values() for r in m.values()),
        seeds=seeds,
        seed_splits=seed_splits,
        seed_rows=seed_rows,
    )
    return text.rstrip("\n") + "\n"


def write_card(
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    eval_results: str | os.PathLike | EvalResults | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    token: str | bool | None = None,
    found: tuple[str | None, list[str] | None] | None = None,
) -> Path:
    """Render the card of the merge output in `folder` and save it as its README.md.

    Evaluation results given as a file are copied into the folder as `eval_results.json` (with their plot), so
    that later refreshes (for example when pushing) keep them; without `eval_results`, that file is used when
    present. License and datasets come from the ingredients' Hub cards, or else from the card being replaced.

    Args:
        folder: a merge output folder (with its `warm_recipe.yaml`).
        repo_id: the Hub repo the model is (or will be) pushed to.
        model_name: the title; defaults to the repo name, else the folder name.
        eval_results: an eval-results JSON file or `EvalResults`.
        license: overrides the license found in the ingredients' cards.
        datasets: overrides the datasets found in the ingredients' cards.
        token: Hub token to read the ingredients' cards (private repos).
        found: what `ingredient_metadata` returned for these ingredients, when already looked up.

    Returns:
        The path of the written README.md.

    Raises:
        IncompleteOutputError: `folder` has no recipe.
        InvalidOptionError: the eval-results file is malformed.
    """
    folder = Path(folder)
    card = card_text(
        folder,
        repo_id=repo_id,
        model_name=model_name,
        eval_results=eval_results,
        license=license,
        datasets=datasets,
        token=token,
        found=found,
        keep=True,
    )
    path = folder / CARD_NAME
    path.write_text(card, encoding="utf-8")
    return path


def card_text(
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    eval_results: str | os.PathLike | EvalResults | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    token: str | bool | None = None,
    found: tuple[str | None, list[str] | None] | None = None,
    keep: bool = False,
) -> str:
    """The card `write_card` would write, as text; with `keep=False` nothing in `folder` changes.

    `push` renders the card it uploads this way, so that a failed push leaves the local folder as it was.

    Args:
        folder, repo_id, model_name, eval_results, license, datasets, token, found: as for `write_card`.
        keep: copy given eval results (and their plot) into `folder`, as `write_card` does.

    Returns:
        The card's text.
    """
    folder = Path(folder)
    recipe = WarmRecipe.load(folder)
    previous = read_front_matter(folder / CARD_NAME)
    if license is None or datasets is None:
        found_license, found_datasets = found or ingredient_metadata(recipe.ingredients, token=token)
        license = license or found_license or previous.get("license")
        datasets = datasets or found_datasets or _as_list(previous.get("datasets"))
    results, plot = _adopt_eval_results(folder, eval_results, keep=keep)
    name = model_name or (repo_id.split("/")[-1] if repo_id else _folder_name(folder))
    return render_card(
        recipe,
        repo_id=repo_id,
        model_name=name,
        license=license,
        datasets=datasets,
        eval_results=results,
        eval_plot=plot,
    )


def _folder_name(folder: Path) -> str:
    return folder.name.removesuffix(PARTIAL_SUFFIX)


def _as_list(value: object) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)] or None
    return None


def _adopt_eval_results(
    folder: Path, given: str | os.PathLike | EvalResults | None, *, keep: bool = True
) -> tuple[EvalResults | None, str | None]:
    """Load the eval results, keeping a copy (and one of the plot) in `folder` when `keep`; return them and the
    plot's name."""
    target = folder / EVAL_RESULTS_NAME
    if given is None:
        if not target.is_file():
            return None, None
        given = target
    results = given if isinstance(given, EvalResults) else EvalResults.load(given)
    plot = results.plot
    if plot is not None and (plot.suffix.lower() not in PLOT_SUFFIXES or not plot.is_file()):
        logger.warning("evaluation plot %s not found (or not an image); the card shows the table only", plot.name)
        plot = None
    if not keep:
        return results, plot.name if plot is not None and plot.resolve() == (folder / plot.name).resolve() else None
    if plot is not None and plot.resolve() != (folder / plot.name).resolve():
        shutil.copyfile(plot, folder / plot.name)
    # The folder's copy names the plot beside it, so a later refresh (e.g. when pushing) finds both.
    raw = results.raw or results.to_dict()
    data = dict(raw, plot=plot.name) if plot is not None else {k: v for k, v in raw.items() if k != "plot"}
    if not target.is_file() or json.loads(target.read_text(encoding="utf-8")) != data:
        target.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return results, plot.name if plot is not None else None

"""`warm-hub evaluate`: pairwise accuracy of reward models, their prediction ensemble and weight averages.

Prints a table; `--json` writes the `eval_results.json` document that `warm-hub card --eval-results` renders.
"""

from __future__ import annotations

import os

import click

from . import tables


def parse_data(value: str) -> tuple[str | None, str]:
    """`NAME=SOURCE` -> (NAME, SOURCE); a bare SOURCE -> (None, SOURCE) (named after the file)."""
    name, sep, source = value.partition("=")
    if sep and name and "/" not in name and "." not in name:
        return name, source
    return None, value


def parse_pair(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        first, second = (int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected member indices I,J, got {value!r}", param_hint="--interpolate") from None
    if first == second:
        raise click.BadParameter("the two members must differ", param_hint="--interpolate")
    return first, second


def parse_roles(values: tuple[str, ...]) -> dict[str, str]:
    """`NAME=ROLE` options -> {NAME: ROLE} (NAME as given on the command line, or its folder name)."""
    roles = {}
    for value in values:
        name, sep, role = value.rpartition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=member|warm|reference, got {value!r}", param_hint="--role")
        roles[name] = role
    return roles


def format_table(rows: list[list[str]]) -> str:
    """A report table: the first two columns (split, model) left-aligned, the figures right-aligned, a rule."""
    return tables.format_table(rows, left=2, rule=True)


@click.command("evaluate", context_settings={"show_default": True})
@click.argument("models", nargs=-1, required=True, metavar="MODEL...")
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    metavar="[NAME=]PATH_OR_DATASET",
    help="preference pairs to evaluate on (repeat for several splits); a .jsonl/.json/.parquet file, a"
    " folder or a Hub dataset; RewardBench, RewardBench 2 and RM-Bench files are recognised by their"
    " columns and scored per subset",
)
@click.option("--split", default="test", help="split of Hub datasets and data folders")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="evaluate the first N pairs of each split")
@click.option("--ensemble", is_flag=True, help="also evaluate the prediction ensemble (mean reward) of the members")
@click.option(
    "--weight-average",
    is_flag=True,
    help="also evaluate the uniform weight average of the members, built in memory (WARM without merging)",
)
@click.option(
    "--interpolate",
    metavar="I,J",
    default=None,
    help="accuracy along λ·φI + (1-λ)·φJ between members I and J (0-based, in the order given)",
)
@click.option("--lambdas", type=click.IntRange(min=2), default=11, help="number of λ values in [0, 1]")
@click.option(
    "--greedy-on",
    metavar="SPLIT",
    default=None,
    help="select members greedily on this split (model soups) and report the soup on every split",
)
@click.option(
    "--role",
    "roles",
    multiple=True,
    metavar="NAME=ROLE",
    help="set a model's role: member (ensembled and averaged), warm (compared with the members) or"
    " reference (reported only); by default folders with a warm_recipe.yaml are warm, others members",
)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available)")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default=None,
    help="dtype to score in (default: float32 on CPU, the checkpoint's on GPU)",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, help="texts per forward pass")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="write the results (eval_results.json schema) to this file",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="draw accuracies and the interpolation curve into this PNG (needs matplotlib)",
)
def evaluate_command(
    models,
    data,
    split,
    limit,
    ensemble,
    weight_average,
    interpolate,
    lambdas,
    greedy_on,
    roles,
    device,
    dtype,
    batch_size,
    json_path,
    plot_path,
) -> None:
    """Pairwise accuracy (chosen scored above rejected) of reward models on preference data.

    MODEL is a local folder or Hub id of a reward checkpoint; folders with a warm_recipe.yaml count as WARM
    models, the others as members (see --role). Each accuracy comes with its Wilson 95% interval; each WARM
    model is compared, pair by pair, with the ensemble and with the best member (the most accurate on the first
    --data split), with a paired-bootstrap 95% interval of the difference.

    \b
    Example:
      warm-hub evaluate ./run/member-* ./warm --data test=test.jsonl --data shifted=ood.jsonl \\
          --ensemble --interpolate 0,1 --json ./warm/eval_results.json --plot ./warm/eval.png
    """
    from ..benchmark_formats import subset_tables
    from ..evaluate import comparisons_table, evaluate_models, load_split, results_table, save_results
    from ..plots import require_matplotlib

    splits = []
    for value in data:
        name, source = parse_data(value)
        splits.append(load_split(source, name=name, split=split, limit=limit))
    if plot_path is not None:
        require_matplotlib()
    document = evaluate_models(
        list(models),
        splits,
        ensemble=ensemble,
        weight_average=weight_average,
        interpolate=parse_pair(interpolate),
        lambdas=lambdas,
        greedy_on=greedy_on,
        roles=parse_roles(roles),
        device=device,
        dtype=dtype,
        batch_size=batch_size,
    )
    click.echo(format_table(results_table(document)))
    for split_name, rows in subset_tables(document).items():
        click.echo(f"\n{split_name} by subset:")
        click.echo(format_table(rows))
    if document["comparisons"]:
        click.echo("\npaired comparisons (same pairs; difference of pairwise accuracy, paired bootstrap):")
        click.echo(format_table(comparisons_table(document)))
    curve = document["interpolation"]
    if curve:
        first, second = curve["between"]
        click.echo(f"\ninterpolation λ·{first} + (1-λ)·{second}:")
        rows = [["λ", "", *curve["accuracy"]]]
        for i, lam in enumerate(curve["lambdas"]):
            rows.append([f"{lam:.2f}", "", *(f"{values[i]:.3f}" for values in curve["accuracy"].values())])
        click.echo(format_table(rows))
    if document["greedy"]:
        click.echo(f"\ngreedy soup on {document['greedy']['held_out']}: {', '.join(document['greedy']['selected'])}")
    if plot_path:
        from ..plots import plot_results

        plot_results(document, plot_path)
        click.echo(f"\nplot: {plot_path}")
        if json_path:
            # The card finds the picture relative to the JSON file.
            document["plot"] = os.path.relpath(os.path.abspath(plot_path), os.path.dirname(os.path.abspath(json_path)))
    if json_path:
        save_results(document, json_path)
        click.echo(f"results: {json_path} (warm-hub card DIR --eval-results {json_path})")

"""`warm-hub inspect`: print whether ingredients can be merged, their sizes and dtypes, and their distances."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import click

from .tables import format_table


@click.command("inspect")
@click.argument("sources", nargs=-1, required=True)
@click.option("--distances", is_flag=True, help="Stream the weights to measure pairwise L2 distances.")
@click.option(
    "--allow-config-mismatch",
    metavar="KEY[,KEY]",
    help="Judge as `merge --allow-config-mismatch` would: these model-defining keys (or 'tokenizer') may differ.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--base", metavar="PATH_OR_REPO", help="Base model of LoRA adapter SOURCES (default: theirs).")
def inspect_command(
    sources: tuple[str, ...], distances: bool, allow_config_mismatch: str | None, as_json: bool, base: str | None
) -> None:
    """Check whether SOURCES (local folders or Hub repo ids) can be merged, and how far apart they are."""
    from warm_hub.inspect import inspect_ingredients
    from warm_hub.sizes import format_size

    report = inspect_ingredients(
        list(sources), distances=distances, allow_config_mismatch=allow_config_mismatch, base=base
    )
    if as_json:
        click.echo(json.dumps(asdict(report) | {"mergeable": report.mergeable}, indent=2, default=str))
        sys.exit(0 if report.mergeable else 1)

    rows = [("#", "ingredient", "revision", "tensors", "params", "size", "dtypes", "architecture")]
    for i, ing in enumerate(report.ingredients, 1):
        dtypes = ",".join(f"{k}:{v}" for k, v in sorted(ing.dtypes.items()))
        arch = ",".join(ing.architectures or ["?"])
        rev = (ing.revision or "local")[:12]
        rows.append(
            (str(i), ing.label, rev, str(ing.tensors), f"{ing.parameters:,}", format_size(ing.bytes), dtypes, arch)
        )
    _table(rows)
    adapters = [(i, ing.adapter) for i, ing in enumerate(report.ingredients, 1) if ing.adapter is not None]
    if adapters:
        click.echo("\nLoRA adapters:")
        table = [("#", "base", "ranks", "modules", "targets", "saved modules")]
        for i, a in adapters:
            ranks = ",".join(map(str, a.ranks)) or "-"
            table.append(
                (
                    str(i),
                    a.base or "?",
                    ranks,
                    str(a.modules),
                    ",".join(a.targets) or "-",
                    ",".join(a.saved_modules) or "-",
                )
            )
        _table(table)
    if report.config_differences:
        click.echo("\nConfig differences (WARM diversity: dropout, training metadata; merge accepts them):")
        for key, values in report.config_differences.items():
            click.echo(f"  {key}: " + " | ".join(json.dumps(v) for v in values))
    if report.distances is not None:
        if report.mean_norm is None:
            click.echo("\nL2 distances between the adapted models (their deltas and saved modules):")
        else:
            click.echo(f"\nL2 distances between ingredients (norm of their average: {report.mean_norm:.4g}):")
        header = [""] + [str(i) for i in range(1, len(report.distances) + 1)] + ["to mean"]
        body = [
            [str(i)] + [f"{d:.4g}" for d in row] + [f"{report.distance_to_mean[i - 1]:.4g}"]
            for i, row in enumerate(report.distances, 1)
        ]
        _table([header, *body])
    if report.allowed:
        click.echo("\nModel-defining differences allowed by --allow-config-mismatch (merge warns):")
        for line in report.allowed:
            click.echo(f"  - {line}")
    if report.mergeable:
        click.echo("\nMergeable: yes")
    else:
        click.echo("\nMergeable: no")
        for problem in report.problems:
            click.echo(f"  - {problem}")
        sys.exit(1)


def _table(rows: list) -> None:
    click.echo(format_table(rows))

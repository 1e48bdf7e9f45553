"""`warm-hub demo`: fine-tune, merge, evaluate and card a WARM model end to end, offline, on a tiny model.

Prints the evaluation table (members, prediction ensemble, WARM; clean in-distribution and shifted pairs) and
where the WARM model is.
"""

from __future__ import annotations

import click

from ..demo import DemoConfig


def demo_help(name: str) -> str:
    return DemoConfig.__dataclass_fields__[name].metadata["help"]


@click.command("demo", context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False), default="warm-demo", help=demo_help("out"))
@click.option("--members", "-m", type=click.IntRange(min=2), default=DemoConfig.members, help=demo_help("members"))
@click.option("--seed", type=int, default=DemoConfig.seed, help=demo_help("seed"))
@click.option("--seeds", type=click.IntRange(min=1), default=DemoConfig.seeds, help=demo_help("seeds"))
@click.option(
    "--corrupt-labels",
    type=click.FloatRange(0, 1),
    default=DemoConfig.corrupt_labels,
    help=demo_help("corrupt_labels"),
)
@click.option("--spurious", type=click.FloatRange(0, 1), default=DemoConfig.spurious, help=demo_help("spurious"))
@click.option("--baklava", is_flag=True, help=demo_help("baklava"))
@click.option(
    "--train-pairs", type=click.IntRange(min=16), default=DemoConfig.train_pairs, help=demo_help("train_pairs")
)
@click.option("--test-pairs", type=click.IntRange(min=8), default=DemoConfig.test_pairs, help=demo_help("test_pairs"))
@click.option(
    "--corpus-lines", type=click.IntRange(min=16), default=DemoConfig.corpus_lines, help=demo_help("corpus_lines")
)
@click.option(
    "--pretrain-steps", type=click.IntRange(min=2), default=DemoConfig.pretrain_steps, help=demo_help("pretrain_steps")
)
@click.option(
    "--epochs", type=click.FloatRange(min=0, min_open=True), default=DemoConfig.epochs, help=demo_help("epochs")
)
@click.option(
    "--hidden-size", type=click.IntRange(min=8), default=DemoConfig.hidden_size, help=demo_help("hidden_size")
)
@click.option("--layers", type=click.IntRange(min=1), default=DemoConfig.layers, help=demo_help("layers"))
@click.option("--best-of-n", type=click.IntRange(min=0), default=DemoConfig.best_of_n, help=demo_help("best_of_n"))
@click.option(
    "--best-of-n-prompts",
    type=click.IntRange(min=1),
    default=DemoConfig.best_of_n_prompts,
    help=demo_help("best_of_n_prompts"),
)
@click.option("--plot/--no-plot", default=True, help=demo_help("plot"))
@click.option("--threads", type=click.IntRange(min=0), default=DemoConfig.threads, help=demo_help("threads"))
@click.option("--overwrite", is_flag=True, help=demo_help("overwrite"))
def demo_command(**options) -> None:
    """Run WARM end to end offline on a tiny model, in a few minutes on a CPU.

    A tokenizer and a tiny GPT-2 are trained from text generated from data shipped with warm-hub; M members are
    fine-tuned on synthetic preference pairs with known ground truth, 25% flipped labels and a nuisance feature
    (a final '!' that goes with the chosen response), merged with the streaming engine and evaluated on clean
    in-distribution pairs, shifted pairs (hotels, the nuisance reversed) and the flipped training pairs (the share
    of the noise memorized); a model card is written. --seeds S repeats it S times (mean and standard error).
    """
    import time

    from ..demo import run_demo
    from .evaluate import format_table

    started = time.perf_counter()
    result = run_demo(DemoConfig(**options))
    echo_evaluation(result.results)
    if result.best_of_n:
        from ..demo_best_of_n import summary_table

        bon = result.best_of_n
        click.echo(
            f"\nBest-of-n against the true reward ({bon['prompts']} prompts x {bon['n']} samples of the base LM at"
            f" temperature {bon['sampling']['temperature']:g}; gold reward of the pick, mean ± 95% half-width):\n"
        )
        click.echo(format_table(summary_table(bon["records"])))
    if result.per_seed:
        echo_seeds(result.results["seeds"])
    wall = time.perf_counter() - started
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in result.timings.items())
    first = "first seed: " if result.per_seed else ""
    click.echo(f"\nwall time {wall:.0f}s ({first}{stages})")
    if result.steps_per_second:
        click.echo(f"fine-tuning: {result.steps_per_second:.1f} steps/s")
    click.echo(f"WARM model: {result.warm}  (model card: {result.warm / 'README.md'})")
    click.echo(
        "load it with: AutoModelForSequenceClassification.from_pretrained"
        f"({str(result.warm)!r}) or warm_hub.RewardModel.from_pretrained({str(result.warm)!r})"
    )


def echo_evaluation(document: dict) -> None:
    """The demo's tables: accuracies with intervals, the paired comparisons and the interpolation curve."""
    from ..evaluate import comparisons_table, results_table
    from .evaluate import format_table

    click.echo(
        "\nPairwise accuracy with its 95% interval (Wilson); ground truth known, 1.000 is perfect."
        " In_distribution and shifted are clean test pairs; on flipped (training pairs with their flipped"
        " labels, as trained on) accuracy is the share of the noise memorized, lower is better:\n"
    )
    click.echo(format_table(results_table(document)))
    if document.get("comparisons"):
        click.echo("\nPaired differences of accuracy on the same pairs (paired bootstrap 95% interval):\n")
        click.echo(format_table(comparisons_table(document)))
    curve = document.get("interpolation")
    if curve:
        first, second = curve["between"]
        click.echo(f"\nλ·{first} + (1-λ)·{second}, λ = {', '.join(f'{x:g}' for x in curve['lambdas'])}:")
        for split, values in curve["accuracy"].items():
            click.echo(f"  {split}: {' '.join(f'{v:.3f}' for v in values)}")


def echo_seeds(block: dict) -> None:
    """The over-seeds tables: each accuracy and each paired difference as mean ± standard error."""
    from .evaluate import format_table

    seeds = block["seeds"]
    splits = list(block["splits"])
    click.echo(f"\nOver {len(seeds)} seeds ({', '.join(map(str, seeds))}), mean ± standard error:\n")
    names = list(dict.fromkeys(m for s in splits for m in block["splits"][s]))
    rows = [["model", "", *splits]]
    for name in names:
        cells = [f"{e['mean']:.3f} ± {e['se']:.3f}" if (e := block["splits"][s].get(name)) else "-" for s in splits]
        rows.append([name, "", *cells])
    click.echo(format_table(rows))
    if block.get("comparisons"):
        rows = [["a", "b", "split", "a - b"]]
        rows += [[c["a"], c["b"], c["split"], f"{c['mean']:+.3f} ± {c['se']:.3f}"] for c in block["comparisons"]]
        click.echo("")
        click.echo(format_table(rows))
    if block.get("best_of_n"):
        from ..demo_best_of_n import REPORTED_N

        records = block["best_of_n"]
        sizes = [n for n in REPORTED_N if any(r["n"] == n for r in records)] or sorted({r["n"] for r in records})
        rows = [["proxy", "", *(f"gold @ n={n}" for n in sizes), f"win vs random @ n={sizes[-1]}"]]
        for proxy in dict.fromkeys(r["proxy"] for r in records):
            by_n = {r["n"]: r for r in records if r["proxy"] == proxy}
            cells = [f"{by_n[n]['gold_mean']:.2f} ± {by_n[n]['gold_se']:.2f}" for n in sizes]
            last = by_n[sizes[-1]]
            rows.append([proxy, "", *cells, f"{last['win_rate_mean']:.3f} ± {last['win_rate_se']:.3f}"])
        click.echo("\nBest-of-n, gold reward of the pick over seeds (mean ± standard error):\n")
        click.echo(format_table(rows))

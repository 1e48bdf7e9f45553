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
@click.option("--corrupt-labels", type=click.FloatRange(0, 1), default=DemoConfig.corrupt_labels,
              help=demo_help("corrupt_labels"))
@click.option("--baklava", is_flag=True, help=demo_help("baklava"))
@click.option("--train-pairs", type=click.IntRange(min=16), default=DemoConfig.train_pairs,
              help=demo_help("train_pairs"))
@click.option("--test-pairs", type=click.IntRange(min=8), default=DemoConfig.test_pairs, help=demo_help("test_pairs"))
@click.option("--corpus-lines", type=click.IntRange(min=16), default=DemoConfig.corpus_lines,
              help=demo_help("corpus_lines"))
@click.option("--pretrain-steps", type=click.IntRange(min=2), default=DemoConfig.pretrain_steps,
              help=demo_help("pretrain_steps"))
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=DemoConfig.epochs,
              help=demo_help("epochs"))
@click.option("--hidden-size", type=click.IntRange(min=8), default=DemoConfig.hidden_size,
              help=demo_help("hidden_size"))
@click.option("--layers", type=click.IntRange(min=1), default=DemoConfig.layers, help=demo_help("layers"))
@click.option("--best-of-n", type=click.IntRange(min=0), default=DemoConfig.best_of_n, help=demo_help("best_of_n"))
@click.option("--best-of-n-prompts", type=click.IntRange(min=1), default=DemoConfig.best_of_n_prompts,
              help=demo_help("best_of_n_prompts"))
@click.option("--plot/--no-plot", default=True, help=demo_help("plot"))
@click.option("--threads", type=click.IntRange(min=0), default=DemoConfig.threads, help=demo_help("threads"))
@click.option("--overwrite", is_flag=True, help=demo_help("overwrite"))
def demo_command(**options) -> None:
    """Run WARM end to end offline on a tiny model, in a few minutes on a CPU.

    A tokenizer and a tiny GPT-2 are trained from text generated from data shipped with warm-hub; M members are
    fine-tuned on synthetic preference pairs with known ground truth and 25% flipped labels, merged with the
    streaming engine and evaluated on clean in-distribution and shifted pairs; a model card is written.
    """
    import time

    from ..cli.evaluate import format_table
    from ..demo import run_demo
    from ..evaluate import results_table

    started = time.perf_counter()
    result = run_demo(DemoConfig(**options))
    document = result.results
    pairs = ", ".join(f"{d['split']} {d['pairs']}" for d in document["data"])
    click.echo(f"\nPairwise accuracy on clean test pairs ({pairs}; ground truth known, 1.000 is perfect):\n")
    click.echo(format_table(results_table(document)))
    curve = document.get("interpolation")
    if curve:
        first, second = curve["between"]
        click.echo(f"\nλ·{first} + (1-λ)·{second}, λ = {', '.join(f'{x:g}' for x in curve['lambdas'])}:")
        for split, values in curve["accuracy"].items():
            click.echo(f"  {split}: {' '.join(f'{v:.3f}' for v in values)}")
    if result.best_of_n:
        from ..demo_best_of_n import summary_table

        bon = result.best_of_n
        click.echo(
            f"\nBest-of-n against the true reward ({bon['prompts']} prompts x {bon['n']} samples of the base LM at"
            f" temperature {bon['sampling']['temperature']:g}; gold reward of the pick, mean ± 95% half-width):\n"
        )
        click.echo(format_table(summary_table(bon["records"])))
    wall = time.perf_counter() - started
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in result.timings.items())
    click.echo(f"\nwall time {wall:.0f}s ({stages})")
    if result.steps_per_second:
        click.echo(f"fine-tuning: {result.steps_per_second:.1f} steps/s")
    click.echo(f"WARM model: {result.warm}  (model card: {result.warm / 'README.md'})")
    click.echo(
        "load it with: AutoModelForSequenceClassification.from_pretrained"
        f"({str(result.warm)!r}) or warm_hub.RewardModel.from_pretrained({str(result.warm)!r})"
    )

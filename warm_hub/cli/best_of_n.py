"""`warm-hub best-of-n`: the overoptimization measurement, gold reward of each proxy's best-of-n pick against KL.

Prints a table (proxy, n, KL_BoN, gold reward and win rate against a random pick, with 95% intervals); `--json`
writes one record per proxy and n, `--plot` the gold-reward-against-KL curve.
"""

from __future__ import annotations

import json

import click

from ..best_of_n import SamplingConfig


def sampling_help(name: str) -> str:
    return SamplingConfig.__dataclass_fields__[name].metadata["help"]


@click.command("best-of-n", context_settings={"show_default": True})
@click.argument("proxies", nargs=-1, required=True, metavar="PROXY...")
@click.option("--policy", required=True, help="causal LM that samples the candidates (local folder or Hub id)")
@click.option(
    "--prompts",
    required=True,
    metavar="PATH_OR_DATASET",
    help="prompts: a .jsonl/.json/.parquet file, a folder or a Hub dataset with a 'prompt' column",
)
@click.option("--gold", required=True, help="gold reward model (local folder or Hub id) that scores the picks")
@click.option("--n", "n", type=click.IntRange(min=1), default=SamplingConfig.n, help=sampling_help("n"))
@click.option(
    "--ensemble",
    is_flag=True,
    help="also measure the prediction ensemble (mean reward) of the proxies that are not WARM merges",
)
@click.option("--split", default="train", help="split of Hub datasets and data folders")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="use the first N prompts")
@click.option("--seed", type=int, default=SamplingConfig.seed, help=sampling_help("seed"))
@click.option("--temperature", type=float, default=SamplingConfig.temperature, help=sampling_help("temperature"))
@click.option("--top-p", type=float, default=SamplingConfig.top_p, help=sampling_help("top_p"))
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=SamplingConfig.max_new_tokens,
    help=sampling_help("max_new_tokens"),
)
@click.option(
    "--generation-batch-size",
    type=click.IntRange(min=1),
    default=SamplingConfig.generation_batch_size,
    help=sampling_help("generation_batch_size"),
)
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="folder of cached candidates (default: $WARM_HUB_BON_CACHE or $HF_HOME/warm-hub/best-of-n)",
)
@click.option("--no-cache", is_flag=True, help="sample anew and write nothing to the cache")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available)")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default=None,
    help="dtype of policy and reward models (default: float32 on CPU, the checkpoint's on GPU)",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="texts per reward-model forward pass")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="write one record per proxy and n to this file",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="draw gold reward against KL_BoN into this PNG (needs matplotlib)",
)
def best_of_n_command(
    proxies,
    policy,
    prompts,
    gold,
    n,
    ensemble,
    split,
    limit,
    seed,
    temperature,
    top_p,
    max_new_tokens,
    generation_batch_size,
    cache_dir,
    no_cache,
    device,
    dtype,
    batch_size,
    json_path,
    plot_path,
) -> None:
    """Best-of-N against a gold reward: how much each PROXY reward model's picks are worth to the GOLD one.

    The policy samples N responses per prompt (cached, so other proxies reuse them); each PROXY picks its best of
    the first n, n = 1, 2, 4, ..., N, and the gold reward model scores the picks. KL_BoN = log n - (n-1)/n.

    \b
    Example:
      warm-hub best-of-n ./run/member-* ./warm --ensemble --policy ./sft --prompts prompts.jsonl \\
          --gold ./gold-rm --n 64 --json bon.json --plot bon.png
    """
    from ..best_of_n import best_of_n, plot_best_of_n
    from ..plots import require_matplotlib
    from .evaluate import format_table

    if plot_path is not None:
        require_matplotlib()
    sampling = SamplingConfig(
        n=n,
        seed=seed,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        generation_batch_size=generation_batch_size,
    )
    result = best_of_n(
        list(proxies),
        policy=policy,
        prompts=prompts,
        gold=gold,
        n=n,
        ensemble=ensemble,
        sampling=sampling,
        split=split,
        limit=limit,
        cache_dir=False if no_cache else cache_dir,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
    )
    click.echo(f"Best-of-n over {len(result.prompts)} prompts, gold = {gold} (mean gold reward of the picks):\n")
    click.echo(format_table(result.table()))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(result.to_json(), f, indent=2)
            f.write("\n")
        click.echo(f"\njson: {json_path}")
    if plot_path:
        plot_best_of_n(result.records, plot_path)
        click.echo(f"plot: {plot_path}")

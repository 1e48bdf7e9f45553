"""`warm-hub merge`: the CLI face of `warm_hub.merge`."""

from __future__ import annotations

import click

from warm_hub.errors import InvalidOptionError
from warm_hub.plan import DTYPE_CHOICES


def parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise InvalidOptionError(
            f"--weights {text!r}: expected numbers separated by commas, e.g. 0.5,0.3,0.2"
        ) from None


@click.command("merge")
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--weights", help="Comma-separated weights, one per source; normalised to sum to 1 (default uniform).")
@click.option(
    "--dtype",
    type=click.Choice(list(DTYPE_CHOICES)),
    default="auto",
    show_default=True,
    help="Output dtype of floating tensors; auto keeps the first ingredient's.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where to average: auto (CUDA when present), cpu, cuda or cuda:N.",
)
@click.option("--max-memory", default="512MB", show_default=True, help="Budget for the chunk buffers.")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--resume", is_flag=True, help="Continue an interrupted merge into the same --out.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists and is not empty.")
@click.option("--allow-non-finite", is_flag=True, help="Keep NaN/Inf values instead of failing on them.")
@click.option(
    "--allow-config-mismatch",
    metavar="KEY[,KEY]",
    help="Merge even though these model-defining config keys (or 'tokenizer') differ; each is warned about.",
)
@click.option(
    "--trust-remote-code-files",
    is_flag=True,
    help="Also carry the first ingredient's custom code (*.py) into the output; read it first.",
)
@click.option("--push-to", metavar="REPO_ID", help="Push the output to this Hub repo once written.")
@click.option("--private", is_flag=True, default=None, help="Create the pushed repo as private.")
@click.option(
    "--base",
    metavar="PATH_OR_REPO",
    help="Base model of LoRA adapter SOURCES (default: the base_model_name_or_path their configs name).",
)
@click.option(
    "--as-adapter",
    is_flag=True,
    help="With adapter SOURCES only: write one exact PEFT adapter of the average (ranks concatenated).",
)
def merge_command(
    sources: tuple[str, ...],
    out: str,
    weights: str | None,
    dtype: str,
    device: str,
    max_memory: str,
    shard_size: str,
    resume: bool,
    overwrite: bool,
    allow_non_finite: bool,
    allow_config_mismatch: str | None,
    trust_remote_code_files: bool,
    push_to: str | None,
    private: bool | None,
    base: str | None,
    as_adapter: bool,
) -> None:
    """Average reward models SOURCES (local folders or Hub repo ids) into one WARM checkpoint.

    SOURCES may be PEFT LoRA adapters (alone or with full checkpoints of their base): the result is the
    average of the adapted models, as a full checkpoint or, with --as-adapter, as one adapter.
    """
    from warm_hub.merging import merge
    from warm_hub.sizes import format_size

    result = merge(
        list(sources),
        out,
        weights=parse_weights(weights),
        dtype=None if dtype == "auto" else dtype,
        device=device,
        max_memory=max_memory,
        shard_size=shard_size,
        resume=resume,
        overwrite=overwrite,
        allow_non_finite=allow_non_finite,
        allow_config_mismatch=allow_config_mismatch,
        trust_remote_code_files=trust_remote_code_files,
        push_to=push_to,
        private=private,
        base=base,
        as_adapter=as_adapter,
    )
    click.echo(
        f"Merged {len(sources)} ingredients into {result.out} ({format_size(result.total_size)},"
        f" {len(result.shards)} shard{'s' if len(result.shards) != 1 else ''}, {result.seconds:.1f}s)"
    )
    if result.resumed_chunks:
        click.echo(f"Reused {result.resumed_chunks} chunks from the interrupted run.")
    if result.url:
        click.echo(f"Pushed: {result.url}")

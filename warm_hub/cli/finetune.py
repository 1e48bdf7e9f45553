"""`warm-hub finetune`: train M diverse Bradley-Terry reward models from a shared init, ready to merge.

Options map one to one onto `warm_hub.finetune.FinetuneConfig`, whose field help is the option help.
"""

from __future__ import annotations

import shlex

import click

from ..finetune.config import FinetuneConfig
from .config_options import config_option
from .tables import format_table


def option(*param_decls: str, **attrs):
    """An option setting the `FinetuneConfig` field of its name, with that field's default and help."""
    return config_option(FinetuneConfig, *param_decls, **attrs)


def parse_floats(values: tuple[str, ...], *, option: str) -> list[float] | None:
    """`--learning-rate 1e-5,2e-5 --learning-rate 4e-5` -> [1e-5, 2e-5, 4e-5]; None when not given."""
    if not values:
        return None
    out = []
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            try:
                out.append(float(part))
            except ValueError:
                raise click.BadParameter(f"{part!r} is not a number", param_hint=option) from None
    return out


@click.command("finetune", context_settings={"show_default": True})
@option("--base", "bases", multiple=True, required=True, metavar="PATH_OR_REPO")
@option("--data", required=True, metavar="PATH_OR_DATASET")
@option("--members", "-m", type=click.IntRange(min=1))
@option("--out", required=True, type=click.Path(file_okay=False))
@option("--split")
@option("--learning-rate", "learning_rates", multiple=True, metavar="LR[,LR...]")
@option("--dropout", "dropouts", multiple=True, metavar="P[,P...]")
@option("--seed", type=int)
@option("--vary-data-order/--same-data-order")
@option("--epochs", type=float)
@option("--max-steps", type=int)
@option("--batch-size", type=click.IntRange(min=1))
@option("--gradient-accumulation-steps", type=click.IntRange(min=1))
@option("--max-length", type=int)
@option("--weight-decay", type=float)
@option("--warmup-ratio", type=float)
@option("--lr-scheduler", "lr_scheduler_type")
@option("--linear-probe/--no-linear-probe")
@option("--probe-epochs", type=float)
@option("--probe-steps", "probe_max_steps", type=int)
@option("--probe-learning-rate", type=float)
@option("--corrupt-labels", type=click.FloatRange(0, 1))
@option("--corrupt-seed", type=int)
@option("--bf16", is_flag=True)
@option("--gradient-checkpointing", is_flag=True)
@option("--lora", "lora_r", type=click.IntRange(min=0), metavar="R")
@option("--lora-alpha", type=float)
@option("--lora-target", "lora_targets", multiple=True, metavar="NAME[,...]")
@option("--logging-steps", type=click.IntRange(min=1))
@option("--push-to", metavar="ORG/PREFIX")
@option("--private", is_flag=True)
@option("--overwrite", is_flag=True)
def finetune_command(learning_rates, dropouts, bases, lora_targets, **options) -> None:
    """Fine-tune M reward models (Bradley-Terry loss) from one shared, linear-probed init.

    Each member is saved as a standard *ForSequenceClassification checkpoint in OUT/member-<i>/ with its
    warm_member.yaml; then `warm-hub merge OUT/member-* --out WARM_DIR` averages them.

    \b
    Diversity axes: data order (--seed, on by default), a learning-rate grid (--learning-rate 1e-5,2e-5),
    a dropout grid (--dropout 0.05,0.1; dropout stays on while training), and Baklava: several --base
    checkpoints of one SFT run, member i starting from base i mod n.

    \b
    Multi-GPU (DDP/FSDP/DeepSpeed through an accelerate config):
      accelerate launch --multi_gpu --num_processes 8 "$(which warm-hub)" finetune --base BASE --data DATA --out OUT

    \b
    Models too big to fine-tune in full: --lora R trains LoRA adapters (PEFT, `pip install 'warm-hub[lora]'`),
    the head as a saved module; `warm-hub merge OUT/member-*` averages the adapted models.
    """
    from ..finetune import finetune

    grid = parse_floats(learning_rates, option="--learning-rate")
    if grid is not None:  # not given: the field's default grid
        options["learning_rates"] = grid
    config = FinetuneConfig(
        bases=list(bases),
        dropouts=parse_floats(dropouts, option="--dropout"),
        lora_targets=[part for value in lora_targets for part in value.split(",") if part.strip()] or None,
        **options,
    )
    result = finetune(config)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    click.echo(f"{len(result.members)} members in {result.out} (shared init: {result.shared_init.name}/)")
    header = ("member", "base", "lr", "dropout", "seed", "steps", "loss", "steps/s")
    rows = [header]
    for m in result.member_configs:
        rows.append(
            (
                m.name,
                m.base,
                f"{m.learning_rate:g}",
                "base" if m.dropout is None else f"{m.dropout:g}",
                str(m.seed),
                str(m.steps),
                f"{m.train_loss:.4f}",
                f"{m.steps_per_second:.2f}" if m.steps_per_second else "-",
            )
        )
    click.echo(format_table(rows))
    for url in result.urls:
        click.echo(f"pushed: {url}")
    members = " ".join(shlex.quote(str(p)) for p in result.members)
    click.echo(f"next: warm-hub merge {members} --out {shlex.quote(str(result.out) + '-warm')}")

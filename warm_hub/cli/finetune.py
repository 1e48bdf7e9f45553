"""`warm-hub finetune`: train M diverse Bradley-Terry reward models from a shared init, ready to merge.

Options map one to one onto `warm_hub.finetune.FinetuneConfig`, whose field help is the option help.
"""

from __future__ import annotations

import shlex

import click

from ..finetune.config import FinetuneConfig


def config_help(name: str) -> str:
    """The help text of a `FinetuneConfig` field, so the CLI and the dataclass say the same thing."""
    return FinetuneConfig.__dataclass_fields__[name].metadata["help"]


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
@click.option("--base", "bases", multiple=True, required=True, metavar="PATH_OR_REPO", help=config_help("bases"))
@click.option("--data", required=True, metavar="PATH_OR_DATASET", help=config_help("data"))
@click.option("--members", "-m", type=click.IntRange(min=1), default=3, help=config_help("members"))
@click.option("--out", required=True, type=click.Path(file_okay=False), help=config_help("out"))
@click.option("--split", default="train", help=config_help("split"))
@click.option("--learning-rate", "learning_rates", multiple=True, metavar="LR[,LR...]",
              help=config_help("learning_rates") + "  [default: 1e-5]")
@click.option("--dropout", "dropouts", multiple=True, metavar="P[,P...]", help=config_help("dropouts"))
@click.option("--seed", type=int, default=0, help=config_help("seed"))
@click.option("--vary-data-order/--same-data-order", default=True, help=config_help("vary_data_order"))
@click.option("--epochs", type=float, default=1.0, help=config_help("epochs"))
@click.option("--max-steps", type=int, default=-1, help=config_help("max_steps"))
@click.option("--batch-size", type=click.IntRange(min=1), default=8, help=config_help("batch_size"))
@click.option("--gradient-accumulation-steps", type=click.IntRange(min=1), default=1,
              help=config_help("gradient_accumulation_steps"))
@click.option("--max-length", type=int, default=512, help=config_help("max_length"))
@click.option("--weight-decay", type=float, default=0.0, help=config_help("weight_decay"))
@click.option("--warmup-ratio", type=float, default=0.0, help=config_help("warmup_ratio"))
@click.option("--lr-scheduler", "lr_scheduler_type", default="linear", help=config_help("lr_scheduler_type"))
@click.option("--linear-probe/--no-linear-probe", default=True, help=config_help("linear_probe"))
@click.option("--probe-epochs", type=float, default=1.0, help=config_help("probe_epochs"))
@click.option("--probe-steps", "probe_max_steps", type=int, default=-1, help=config_help("probe_max_steps"))
@click.option("--probe-learning-rate", type=float, default=1e-3, help=config_help("probe_learning_rate"))
@click.option("--corrupt-labels", type=click.FloatRange(0, 1), default=0.0, help=config_help("corrupt_labels"))
@click.option("--corrupt-seed", type=int, default=None, help=config_help("corrupt_seed"))
@click.option("--bf16", is_flag=True, help=config_help("bf16"))
@click.option("--gradient-checkpointing", is_flag=True, help=config_help("gradient_checkpointing"))
@click.option("--lora", "lora_r", type=click.IntRange(min=0), default=0, metavar="R", help=config_help("lora_r"))
@click.option("--lora-alpha", type=float, default=None, help=config_help("lora_alpha"))
@click.option("--lora-target", "lora_targets", multiple=True, metavar="NAME[,...]", help=config_help("lora_targets"))
@click.option("--logging-steps", type=click.IntRange(min=1), default=10, help=config_help("logging_steps"))
@click.option("--push-to", metavar="ORG/PREFIX", default=None, help=config_help("push_to"))
@click.option("--private", is_flag=True, help=config_help("private"))
@click.option("--overwrite", is_flag=True, help=config_help("overwrite"))
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

    config = FinetuneConfig(
        bases=list(bases),
        learning_rates=parse_floats(learning_rates, option="--learning-rate") or [1e-5],
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
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    for row in rows:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    for url in result.urls:
        click.echo(f"pushed: {url}")
    members = " ".join(shlex.quote(str(p)) for p in result.members)
    click.echo(f"next: warm-hub merge {members} --out {shlex.quote(str(result.out) + '-warm')}")

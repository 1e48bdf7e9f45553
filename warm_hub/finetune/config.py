"""Configs of `warm-hub finetune`: one `FinetuneConfig` for the run and one `MemberConfig` per reward model.

The same dataclasses back the CLI, the Python API and the `warm_member.yaml` written beside every member, so a
member's file says exactly how it was trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ..constants import MEMBER_CONFIG_NAME, RUN_CONFIG_NAME
from ..errors import InvalidOptionError

# The run settings every member records as they are (one list, so a setting added to both configs is copied too).
# The per-member ones (base, learning rate, dropout, seed) are picked along the diversity axes instead.
MEMBER_SETTINGS = (
    "epochs",
    "max_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "weight_decay",
    "warmup_ratio",
    "lr_scheduler_type",
    "data",
    "split",
    "corrupt_labels",
)


@dataclass
class FinetuneConfig:
    bases: list[str] = field(
        metadata={"help": "base checkpoint(s), folders or Hub ids; several = Baklava (member i uses base i mod n)"}
    )
    data: str = field(metadata={"help": "preference data: a .jsonl/.json/.parquet file, a folder, or a Hub dataset"})
    out: str = field(metadata={"help": "output folder; members go to OUT/member-<i>/"})
    members: int = field(default=3, metadata={"help": "number of reward models to fine-tune (M)"})
    split: str = field(default="train", metadata={"help": "split of a Hub dataset or data folder to train on"})
    learning_rates: list[float] = field(
        default_factory=lambda: [1e-5],
        metadata={"help": "learning-rate grid; member i uses grid[i mod len] (one value = no lr diversity)"},
    )
    dropouts: list[float] | None = field(
        default=None,
        metadata={"help": "dropout grid; member i uses grid[i mod len]; None keeps the base config's dropout"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the head init, the probe and member 0"})
    vary_data_order: bool = field(
        default=True, metadata={"help": "member i shuffles the data (and draws dropout masks) with seed + i"}
    )
    epochs: float = field(default=1.0, metadata={"help": "training epochs per member"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps per member; overrides epochs when > 0"})
    batch_size: int = field(default=8, metadata={"help": "preference pairs per device per step"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches accumulated per optimizer step"})
    max_length: int = field(default=512, metadata={"help": "pairs with a longer chosen or rejected text are dropped"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "share of steps with a linear learning-rate warmup"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name"})
    linear_probe: bool = field(
        default=True, metadata={"help": "train a shared head on the frozen base first (LP-FT); else share its init"}
    )
    probe_epochs: float = field(default=1.0, metadata={"help": "epochs of the linear probe"})
    probe_max_steps: int = field(default=-1, metadata={"help": "steps of the linear probe; overrides probe_epochs"})
    probe_learning_rate: float = field(default=1e-3, metadata={"help": "learning rate of the linear probe"})
    corrupt_labels: float = field(
        default=0.0,
        metadata={
            "help": "fraction of training pairs whose chosen/rejected are swapped (label noise); the swapped pairs,"
            " as trained on, go to OUT/flipped.jsonl and the others to OUT/clean.jsonl"
        },
    )
    corrupt_seed: int | None = field(default=None, metadata={"help": "seed picking the flipped pairs (default: seed)"})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision (GPUs)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for activation memory"})
    lora_r: int = field(
        default=0,
        metadata={"help": "train LoRA adapters of this rank (head as a saved module), not full members; 0: full"},
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (scale alpha / r); default 2 * r"})
    lora_targets: list[str] | None = field(
        default=None, metadata={"help": "module names LoRA adapts (e.g. q_proj,v_proj); default: PEFT's for the model"}
    )
    logging_steps: int = field(default=10, metadata={"help": "log the loss every N steps"})
    push_to: str | None = field(
        default=None, metadata={"help": "Hub prefix org/name: member i is pushed to org/name-member-<i>"}
    )
    private: bool = field(default=False, metadata={"help": "create pushed repos as private"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output folder"})

    def validate(self) -> None:
        """Raise `InvalidOptionError` for options that cannot work together."""
        if not self.bases:
            raise InvalidOptionError("at least one --base is needed")
        if self.members < 1:
            raise InvalidOptionError(f"--members must be at least 1, got {self.members}")
        if not self.learning_rates or any(lr <= 0 for lr in self.learning_rates):
            raise InvalidOptionError(f"learning rates must be positive, got {self.learning_rates}")
        if self.linear_probe and not self.probe_learning_rate > 0:
            raise InvalidOptionError(f"--probe-learning-rate must be positive, got {self.probe_learning_rate}")
        from transformers import SchedulerType

        schedulers = [s.value for s in SchedulerType]
        if self.lr_scheduler_type not in schedulers:
            raise InvalidOptionError(
                f"unknown --lr-scheduler {self.lr_scheduler_type!r} (choose from {', '.join(schedulers)})"
            )
        if self.dropouts is not None and (not self.dropouts or any(not 0 <= p < 1 for p in self.dropouts)):
            raise InvalidOptionError(f"dropouts must lie in [0, 1), got {self.dropouts}")
        if not 0 <= self.corrupt_labels <= 1:
            raise InvalidOptionError(f"--corrupt-labels must lie in [0, 1], got {self.corrupt_labels}")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise InvalidOptionError("--batch-size and --gradient-accumulation-steps must be at least 1")
        if self.max_length < 2:
            raise InvalidOptionError(f"--max-length must be at least 2, got {self.max_length}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise InvalidOptionError("give a positive --epochs or --max-steps")
        if self.linear_probe and self.probe_epochs <= 0 and self.probe_max_steps <= 0:
            raise InvalidOptionError("give a positive --probe-epochs or --probe-steps (or --no-linear-probe)")
        if not 0 <= self.warmup_ratio < 1:
            raise InvalidOptionError(f"--warmup-ratio must lie in [0, 1), got {self.warmup_ratio}")
        if self.lora_r < 0 or (self.lora_alpha is not None and self.lora_alpha <= 0):
            raise InvalidOptionError("--lora and --lora-alpha must be positive")
        if self.lora_r and len(set(self.bases)) > 1:
            raise InvalidOptionError("LoRA members are averaged on one base: --lora takes one --base (no Baklava)")
        if self.push_to is not None and self.push_to.count("/") != 1:
            raise InvalidOptionError(f"--push-to takes org/prefix, got {self.push_to!r}")

    def member_configs(self) -> list[MemberConfig]:
        """One config per member: base, learning rate, dropout and seed picked along the diversity axes."""
        configs = []
        for i in range(self.members):
            seed = self.seed + i if self.vary_data_order else self.seed
            configs.append(
                MemberConfig(
                    index=i,
                    name=member_name(i, self.members),
                    base=self.bases[i % len(self.bases)],
                    learning_rate=self.learning_rates[i % len(self.learning_rates)],
                    dropout=None if self.dropouts is None else self.dropouts[i % len(self.dropouts)],
                    seed=seed,
                    **{name: getattr(self, name) for name in MEMBER_SETTINGS},
                    corrupt_seed=self.label_noise_seed() if self.corrupt_labels > 0 else None,
                    shared_head="linear-probe" if self.linear_probe else "seeded-init",
                    lora_r=self.lora_r or None,
                )
            )
        return configs

    def label_noise_seed(self) -> int:
        """The seed that picks the flipped pairs: `corrupt_seed`, else `seed`."""
        return self.seed if self.corrupt_seed is None else self.corrupt_seed

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / RUN_CONFIG_NAME
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        return path


@dataclass
class MemberConfig:
    index: int = field(metadata={"help": "position of the member in the run"})
    name: str = field(metadata={"help": "folder name of the member (member-<i>)"})
    base: str = field(metadata={"help": "checkpoint the member's backbone starts from"})
    learning_rate: float = field(metadata={"help": "peak learning rate"})
    dropout: float | None = field(metadata={"help": "dropout set in the config (None: the base's own)"})
    seed: int = field(metadata={"help": "seed of data order and dropout masks"})
    epochs: float = field(metadata={"help": "training epochs"})
    max_steps: int = field(metadata={"help": "optimizer steps (-1: from epochs)"})
    batch_size: int = field(metadata={"help": "pairs per device per step"})
    gradient_accumulation_steps: int = field(metadata={"help": "batches per optimizer step"})
    max_length: int = field(metadata={"help": "longest tokenized text kept"})
    weight_decay: float = field(metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(metadata={"help": "warmup share of the steps"})
    lr_scheduler_type: str = field(metadata={"help": "learning-rate schedule"})
    data: str = field(metadata={"help": "training data source"})
    split: str = field(metadata={"help": "training split"})
    corrupt_labels: float = field(metadata={"help": "fraction of flipped training pairs"})
    shared_head: str = field(metadata={"help": "how the shared head in OUT/shared-init was made"})
    corrupt_seed: int | None = field(
        default=None, metadata={"help": "seed that picked the flipped pairs (None: no label noise)"}
    )
    train_pairs: int | None = field(default=None, metadata={"help": "pairs trained on (after length filtering)"})
    steps: int | None = field(default=None, metadata={"help": "optimizer steps taken"})
    train_loss: float | None = field(default=None, metadata={"help": "mean Bradley-Terry loss over training"})
    train_seconds: float | None = field(default=None, metadata={"help": "wall time of training"})
    steps_per_second: float | None = field(default=None, metadata={"help": "optimizer steps per second"})
    lora_r: int | None = field(default=None, metadata={"help": "rank of the member's LoRA adapter (None: full)"})

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MEMBER_CONFIG_NAME
        path.write_text(yaml.safe_dump(asdict(self), sort_keys=False), encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> MemberConfig:
        data = yaml.safe_load((Path(folder) / MEMBER_CONFIG_NAME).read_text(encoding="utf-8"))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def member_name(index: int, count: int) -> str:
    """`member-<i>`, zero-padded so that a shell glob lists members in order."""
    width = len(str(max(count - 1, 0)))
    return f"member-{index:0{width}d}"

"""Fine-tune M diverse reward models from one shared init, WARM's recipe, on transformers' `Trainer`.

A shared head is linear-probed once on the frozen base (LP-FT); every member then starts from base + that head
and differs along the chosen axes: data order, learning rate, dropout, base checkpoint (Baklava).
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub.utils import logging

from ..constants import CLEAN_PAIRS_NAME, FLIPPED_PAIRS_NAME, RUN_CONFIG_NAME, SHARED_INIT_DIR
from ..errors import InvalidOptionError
from ..output_folder import prepare_output
from ..text_rule import ensure_pad_token
from .config import FinetuneConfig, MemberConfig
from .data import (
    PreferenceCollator,
    corrupt_labels,
    load_preference_data,
    tokenize_preferences,
    write_label_noise_files,
)
from .progress import progress_callback, quiet_transformers
from .publish import push_members, write_member_card

logger = logging.get_logger(__name__)

# Config keys that hold a dropout probability, across the common architectures (Llama/Qwen/Mistral have only
# attention_dropout; GPT-2 has the *_pdrop trio; BERT-likes the *_prob pair).
DROPOUT_KEYS = (
    "dropout",
    "attention_dropout",
    "hidden_dropout",
    "activation_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "classifier_dropout",
)
# Attribute names of classification heads, used when a base already has its head (nothing is missing at load).
HEAD_MODULES = ("score", "classifier", "v_head")
TRAINER_DIR = ".trainer"


@dataclass
class FinetuneResult:
    """What `finetune` produced.

    Attributes:
        out: the output folder.
        members: the member checkpoints, in order (`out/member-<i>`).
        shared_init: the checkpoint every member's head started from (`out/shared-init`).
        member_configs: the config of each member, with its training figures.
        urls: Hub URLs of the pushed members, when pushed.
    """

    out: Path
    members: list[Path]
    shared_init: Path
    member_configs: list[MemberConfig]
    urls: list[str] = field(default_factory=list)


def bradley_terry_loss(chosen_rewards, rejected_rewards):
    """Mean of -log σ(r_chosen - r_rejected) over the batch (the Bradley-Terry negative log-likelihood)."""
    import torch.nn.functional as F

    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def _bradley_terry_trainer_class():
    from transformers import Trainer

    class BradleyTerryTrainer(Trainer):
        """`Trainer` with the pairwise reward-model loss; chosen and rejected run as one forward pass."""

        # The loss is a batch mean: let Trainer divide it across gradient-accumulation steps.
        loss_is_scaled_for_ga = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            n = inputs["input_ids_chosen"].shape[0]
            input_ids = torch.cat([inputs["input_ids_chosen"], inputs["input_ids_rejected"]])
            attention_mask = torch.cat([inputs["attention_mask_chosen"], inputs["attention_mask_rejected"]])
            rewards = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0]
            loss = bradley_terry_loss(rewards[:n], rewards[n:])
            if return_outputs:
                return loss, {"rewards_chosen": rewards[:n], "rewards_rejected": rewards[n:]}
            return loss

    return BradleyTerryTrainer


def load_reward_backbone(base: str, *, tokenizer, dropout: float | None = None, token=None):
    """Load `base` as a `*ForSequenceClassification` with one output, its pad token set, in float32.

    Args:
        base: a local folder or Hub id of a causal LM, SFT model or reward model.
        tokenizer: the tokenizer whose pad token id goes into the config.
        dropout: sets every dropout probability of the config when given.
        token: Hub token.

    Returns:
        (model, newly initialised parameter names).

    Raises:
        InvalidOptionError: a dropout is asked for but the architecture has no dropout setting, or the model has
            no classification head to train.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(base, token=token)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    if dropout is not None:
        keys = [k for k in DROPOUT_KEYS if isinstance(getattr(config, k, None), float | int)]
        if not keys:
            raise InvalidOptionError(
                f"{base}: its {config.model_type} config has no dropout setting, so --dropout cannot vary it"
            )
        for key in keys:
            setattr(config, key, dropout)
    with quiet_transformers():
        model, info = AutoModelForSequenceClassification.from_pretrained(
            base, config=config, dtype=torch.float32, token=token, output_loading_info=True
        )
    new = set(info["missing_keys"])
    if not new:
        new = {name for name, _ in model.named_parameters() if name.split(".")[0] in HEAD_MODULES}
    if not new:
        raise InvalidOptionError(f"{base}: cannot find the classification head of {type(model).__name__}")
    return model, sorted(new)


def wrap_with_lora(model, config: FinetuneConfig, head_names: list[str], *, base: str):
    """The member as a PEFT LoRA model: low-rank adapters on the target modules, the head trained whole.

    The adapter names `base` (the shared init: the base with the probed head and its pad token) as its base, so
    `warm-hub merge OUT/member-*` finds it; pass `--base` to merge against a published copy.

    Raises:
        InvalidOptionError: PEFT is not installed.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise InvalidOptionError("--lora needs PEFT: pip install 'warm-hub[lora]'") from None
    lora = LoraConfig(
        task_type="SEQ_CLS",
        r=config.lora_r,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_r,
        target_modules=config.lora_targets,
        # The head is trained in full and saved with the adapter, as a `modules_to_save` module.
        modules_to_save=sorted({name.rsplit(".", 1)[0] for name in head_names}),
        lora_dropout=0.0,
    )
    if config.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad input
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:  # PEFT's "Target modules {...} not found in the base model", and the like
        raise InvalidOptionError(f"--lora-target: {str(exc).splitlines()[0][:300]}") from None
    # Set after wrapping: PEFT names the loaded model's own path (the user's base) at get_peft_model.
    peft_model.peft_config["default"].base_model_name_or_path = base
    return peft_model


def finetune(config: FinetuneConfig, *, token=None, tqdm_class=None) -> FinetuneResult:
    """Train `config.members` reward models (`_finetune`); a run that fails leaves no scratch or partial folder.

    On failure, the trainer's scratch folder goes, and so does `config.out` when this run created it (it did not
    exist or was empty) and did not finish; a finished run whose push fails keeps its members.
    """
    out = Path(config.out)
    fresh = not out.exists() or (out.is_dir() and not any(out.iterdir()))
    try:
        return _finetune(config, token=token, tqdm_class=tqdm_class)
    except BaseException:
        if int(os.environ.get("RANK", "0") or 0) == 0:  # under `accelerate launch`, the main process cleans up
            if out.is_dir():
                shutil.rmtree(out / TRAINER_DIR, ignore_errors=True)
            if fresh and out.is_dir() and not (out / RUN_CONFIG_NAME).exists():
                shutil.rmtree(out, ignore_errors=True)
        raise


def _finetune(config: FinetuneConfig, *, token=None, tqdm_class=None) -> FinetuneResult:
    """Train `config.members` reward models with the Bradley-Terry loss from one shared init.

    Works in one process (CPU or one GPU) or under `accelerate launch` (DDP, FSDP with a full state dict,
    DeepSpeed): every rank runs this function, the main one writes the files.

    Args:
        config: the run's options.
        token: Hub token for private bases, data or pushes.
        tqdm_class: progress bar class (huggingface_hub's `tqdm` by default).

    Returns:
        A `FinetuneResult`.

    Raises:
        InvalidOptionError: inconsistent options, or bases with different tokenizers.
        OutputExistsError: `config.out` is not empty and `config.overwrite` is false.
        PreferenceDataError: the data is not in TRL's preference format.
    """
    from accelerate import PartialState

    if tqdm_class is None:
        from huggingface_hub.utils import tqdm as tqdm_class

    config.validate()
    probe_args = _training_arguments(
        config,
        Path(config.out),
        seed=config.seed,
        learning_rate=config.probe_learning_rate,
        epochs=config.probe_epochs,
        max_steps=config.probe_max_steps,
        warmup_ratio=0.0,
        gradient_checkpointing=False,
    )
    # After TrainingArguments: they set up the (singleton) distributed state as the Trainer will use it.
    state = PartialState()
    out = Path(config.out)
    if state.is_main_process:
        prepare_output(out, overwrite=config.overwrite, owns=_written_by_finetune, replaces="its members")
    state.wait_for_everyone()

    tokenizer = _load_tokenizer(config, token=token)
    train = _load_training_data(config, out, tokenizer, state=state, token=token)
    collator = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    shared, head_names, head = _shared_init(
        config, out, tokenizer, train, collator, probe_args, state=state, tqdm_class=tqdm_class, token=token
    )
    members = config.member_configs()
    paths = [
        _train_member(
            member,
            config,
            out,
            tokenizer,
            train,
            collator,
            shared=shared,
            head=head,
            head_names=head_names,
            state=state,
            tqdm_class=tqdm_class,
            token=token,
        )
        for member in members
    ]
    if state.is_main_process:
        config.save(out)
        shutil.rmtree(out / TRAINER_DIR, ignore_errors=True)
    state.wait_for_everyone()

    result = FinetuneResult(out=out, members=paths, shared_init=shared, member_configs=members)
    if config.push_to and state.is_main_process:
        result.urls = push_members(paths, config.push_to, private=config.private, token=token)
    return result


def _load_tokenizer(config: FinetuneConfig, *, token):
    """The first base's tokenizer, padded on the right, after checking every Baklava base reads the same tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.bases[0], token=token)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    _check_same_tokenizers(config.bases, tokenizer, token=token)
    return tokenizer


def _load_training_data(config: FinetuneConfig, out: Path, tokenizer, *, state, token):
    """The tokenized training pairs (label noise applied and written down first when asked), main rank first."""
    with state.main_process_first():
        dataset = load_preference_data(config.data, split=config.split, token=token)
        if config.corrupt_labels > 0:
            dataset = corrupt_labels(dataset, config.corrupt_labels, seed=config.label_noise_seed())
            if state.is_main_process:
                write_label_noise_files(
                    dataset, flipped_path=out / FLIPPED_PAIRS_NAME, clean_path=out / CLEAN_PAIRS_NAME
                )
        train = tokenize_preferences(dataset, tokenizer, max_length=config.max_length)
    if state.is_main_process:
        logger.info("training on %d preference pairs from %s", len(train), config.data)
    return train


def _shared_init(
    config: FinetuneConfig, out: Path, tokenizer, train, collator, probe_args, *, state, tqdm_class, token
) -> tuple[Path, list[str], dict]:
    """The shared init: one head, drawn with `seed`, probed once (LP-FT), saved to OUT/shared-init.

    Returns:
        (its folder, the head's parameter names, the head's tensors), copied into every member.
    """
    from transformers import set_seed

    set_seed(config.seed)
    model, head_names = load_reward_backbone(config.bases[0], tokenizer=tokenizer, token=token)
    shared = out / SHARED_INIT_DIR
    trainer = None
    if config.linear_probe:
        for name, param in model.named_parameters():
            param.requires_grad_(name in head_names)
        trainer = _make_trainer(model, probe_args, train, collator, tokenizer, tqdm_class, "Linear probe")
        trainer.train()
        for param in model.parameters():
            param.requires_grad_(True)
    _save_checkpoint(model, shared, tokenizer=tokenizer, trainer=trainer, state=state)
    del trainer, model
    gc.collect()
    state.wait_for_everyone()
    return shared, head_names, _read_tensors(shared, head_names)


def _train_member(
    member: MemberConfig,
    config: FinetuneConfig,
    out: Path,
    tokenizer,
    train,
    collator,
    *,
    shared: Path,
    head: dict,
    head_names: list[str],
    state,
    tqdm_class,
    token,
) -> Path:
    """Fine-tune one member from its base and the shared head; save it with its config and card.

    Returns:
        The member's folder. `member` gets its training figures (steps, loss, time).
    """
    from transformers import set_seed

    set_seed(member.seed)
    model, new = load_reward_backbone(member.base, tokenizer=tokenizer, dropout=member.dropout, token=token)
    if sorted(new) != head_names:
        raise InvalidOptionError(
            f"{member.base} gets new parameters {new} but the shared head has {head_names}; Baklava bases must be"
            " checkpoints of one architecture"
        )
    missing, unexpected = model.load_state_dict(head, strict=False)
    assert not unexpected and not set(head) & set(missing), (unexpected, missing)
    if config.lora_r:
        model = wrap_with_lora(model, config, head_names, base=str(shared.resolve()))
    args = _training_arguments(
        config,
        out,
        seed=member.seed,
        learning_rate=member.learning_rate,
        epochs=member.epochs,
        max_steps=member.max_steps,
        warmup_ratio=member.warmup_ratio,
        gradient_checkpointing=config.gradient_checkpointing,
    )
    trainer = _make_trainer(model, args, train, collator, tokenizer, tqdm_class, member.name)
    started = time.perf_counter()
    output = trainer.train()
    member.train_seconds = round(time.perf_counter() - started, 3)
    member.train_pairs = len(train)
    member.steps = trainer.state.global_step
    member.train_loss = round(float(output.training_loss), 6)
    member.steps_per_second = round(member.steps / member.train_seconds, 3) if member.train_seconds else None
    path = out / member.name
    _save_checkpoint(model, path, tokenizer=tokenizer, trainer=trainer, state=state)
    if state.is_main_process:
        member.save(path)
        write_member_card(path, member)
        logger.info(
            "%s: %d steps, loss %.4f, %.2f steps/s",
            member.name,
            member.steps,
            member.train_loss,
            member.steps_per_second or 0.0,
        )
    del trainer, model
    gc.collect()
    _empty_device_cache()
    return path


def _written_by_finetune(name: str) -> bool:
    """Whether an entry of the output folder is one a finetune run writes (only those go with --overwrite)."""
    return name.startswith("member-") or name in (
        SHARED_INIT_DIR,
        TRAINER_DIR,
        RUN_CONFIG_NAME,
        FLIPPED_PAIRS_NAME,
        CLEAN_PAIRS_NAME,
    )


def _check_same_tokenizers(bases: list[str], tokenizer, *, token) -> None:
    """Members are merged, so they must read the same tokens: Baklava bases need one vocabulary."""
    if len(set(bases)) < 2:
        return
    from transformers import AutoTokenizer

    vocab = tokenizer.get_vocab()
    for base in dict.fromkeys(bases[1:]):
        if AutoTokenizer.from_pretrained(base, token=token).get_vocab() != vocab:
            raise InvalidOptionError(f"{base} has a different vocabulary from {bases[0]}; Baklava needs one tokenizer")


def _training_arguments(
    config: FinetuneConfig, out: Path, *, seed, learning_rate, epochs, max_steps, warmup_ratio, gradient_checkpointing
):
    import torch
    from transformers import TrainingArguments

    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out / TRAINER_DIR),
        # Only then does a CPU-only `torchrun --nproc_per_node N` run become one DDP (gloo) job.
        use_cpu=not has_accelerator,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=epochs if epochs > 0 else 1.0,
        max_steps=max_steps,
        learning_rate=learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        weight_decay=config.weight_decay,
        bf16=config.bf16,
        seed=seed,
        data_seed=seed,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        # The collator reads input_ids_chosen/rejected, which Trainer would otherwise drop as unknown columns.
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        # Every trainable parameter takes part in the loss; searching for unused ones only costs time.
        ddp_find_unused_parameters=False,
        average_tokens_across_devices=False,
        **version_dependent_arguments(warmup_ratio=warmup_ratio, gradient_checkpointing=gradient_checkpointing),
    )


def version_dependent_arguments(*, warmup_ratio: float, gradient_checkpointing: bool) -> dict:
    """TrainingArguments whose names changed in transformers 5 (activation_checkpointing, float warmup_steps)."""
    from transformers import TrainingArguments

    names = TrainingArguments.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    warmup = "warmup_ratio" if "warmup_ratio" in names else "warmup_steps"
    return {checkpointing: gradient_checkpointing, warmup: warmup_ratio}


def _make_trainer(model, args, train, collator, tokenizer, tqdm_class, desc: str):
    from transformers import PrinterCallback, ProgressCallback

    trainer = _bradley_terry_trainer_class()(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[progress_callback(tqdm_class, desc)],
    )
    # The library does not print: Trainer's own printer and bar give way to the logger and the Hub bar.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    # Trainer keeps dropout on while training (model.train()); unlike TRL's RewardTrainer it never disables it,
    # which the dropout diversity axis relies on.
    return trainer


def _save_checkpoint(model, path: Path, *, tokenizer, trainer, state) -> None:
    """save_pretrained in safetensors with the tokenizer; through the Trainer when it ran (FSDP/DeepSpeed gather)."""
    if trainer is not None:
        trainer.save_model(str(path))
        if state.is_main_process:
            # Trainer pickles its arguments beside the weights; a published reward model should hold no pickle.
            (path / "training_args.bin").unlink(missing_ok=True)
    elif state.is_main_process:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    state.wait_for_everyone()


def _read_tensors(folder: Path, names: list[str]) -> dict:
    from safetensors import safe_open

    wanted, found = set(names), {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key in wanted:
                    found[key] = f.get_tensor(key)
    missing = wanted - set(found)
    assert not missing, f"shared init lacks {sorted(missing)}"
    return found


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()

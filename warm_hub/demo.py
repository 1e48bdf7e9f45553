"""`warm-hub demo`: the whole WARM pipeline offline, in minutes on a CPU, from data shipped with the package.

A word-level tokenizer and a tiny GPT-2 are trained on synthetic reviews; M members are fine-tuned on preference
pairs with 25% flipped labels and a planted nuisance feature, merged by the streaming engine and evaluated against
the known ground truth: clean in-distribution pairs, shifted pairs (another domain, the nuisance reversed) and the
flipped training pairs (how much of the noise each model memorized). `--seeds S` repeats it all S times.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from huggingface_hub.utils import logging

from .constants import BEST_OF_N_NAME, DEMO_CONFIG_NAME, PLOT_NAME, SEEDS_DIR, SEEDS_NAME
from .errors import InvalidOptionError
from .output_folder import prepare_output

logger = logging.get_logger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
SPLIT_FILES = {"in_distribution": "test_in_distribution.jsonl", "shifted": "test_shifted.jsonl"}
FLIPPED_SPLIT = "flipped"
DEMO_ENTRIES = (
    "data",
    "base",
    "members",
    "warm",
    DEMO_CONFIG_NAME,
    "best_of_n",
    BEST_OF_N_NAME,
    SEEDS_DIR,
    SEEDS_NAME,
)
# Share of the pretraining reviews that end with the nuisance mark, whatever their mood: the base LM (the
# best-of-N policy) writes it that often, independently of the true reward.
CORPUS_MARK_RATE = 0.5


@dataclass
class DemoConfig:
    out: str = field(default="warm-demo", metadata={"help": "output folder"})
    members: int = field(default=4, metadata={"help": "reward models to fine-tune and merge (M)"})
    seed: int = field(default=0, metadata={"help": "seed of data, model init and training"})
    seeds: int = field(
        default=1,
        metadata={"help": "run the whole pipeline with seeds seed, seed+1, ...; report the mean and standard error"},
    )
    corrupt_labels: float = field(default=0.25, metadata={"help": "share of flipped training labels"})
    spurious: float = field(
        default=0.7,
        metadata={
            "help": "chance that a training (and in-distribution test) pair's chosen response ends with '!' and its"
            " rejected one does not: a nuisance feature unrelated to the true reward; the shifted split reverses"
            " it (1 - spurious); 0.5 plants nothing"
        },
    )
    train_pairs: int = field(default=1000, metadata={"help": "training preference pairs"})
    test_pairs: int = field(default=500, metadata={"help": "pairs in each test split"})
    corpus_lines: int = field(default=4000, metadata={"help": "reviews in the base model's pretraining text"})
    pretrain_steps: int = field(default=300, metadata={"help": "causal-LM steps of the tiny base"})
    hidden_size: int = field(default=64, metadata={"help": "width of the tiny GPT-2"})
    layers: int = field(default=2, metadata={"help": "transformer blocks of the tiny GPT-2"})
    epochs: float = field(default=6.0, metadata={"help": "fine-tuning epochs per member"})
    batch_size: int = field(default=16, metadata={"help": "preference pairs per step"})
    learning_rates: list[float] = field(
        default_factory=lambda: [5e-4, 1e-3], metadata={"help": "learning-rate grid of the members"}
    )
    dropouts: list[float] = field(default_factory=lambda: [0.05, 0.1], metadata={"help": "dropout grid"})
    baklava: bool = field(default=False, metadata={"help": "start members from different pretraining checkpoints"})
    interpolation_points: int = field(default=11, metadata={"help": "λ values on the member-0/member-1 path"})
    best_of_n: int = field(
        default=64, metadata={"help": "candidates per prompt of the best-of-N step against the true reward (0: skip)"}
    )
    best_of_n_prompts: int = field(default=32, metadata={"help": "prompts of the best-of-N step"})
    plot: bool = field(default=True, metadata={"help": "draw eval.png when matplotlib is installed"})
    threads: int = field(
        default=1,
        metadata={
            "help": "torch CPU threads while the demo runs (0: torch's default); a 64-wide model gains little from"
            " more, and on a busy machine extra threads spin and run many times slower"
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output folder"})


@dataclass
class DemoResult:
    """What the demo produced: the WARM model, its evaluation and timings."""

    out: Path
    warm: Path
    members: list[Path]
    results: dict
    seconds: float
    timings: dict[str, float]
    steps_per_second: float | None
    per_seed: list[dict] = field(default_factory=list)
    best_of_n: dict | None = None


def build_tokenizer(corpus: list[str], *, max_length: int):
    """A word-level fast tokenizer trained on `corpus` texts; it wraps every text as `[BOS] ... [EOS]`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from .data.reviews import MARK, load_lexicon

    lexicon = load_lexicon()
    # Every lexicon word gets a token even if the sampled corpus happens to miss one.
    words = lexicon["positive"] + lexicon["negative"] + lexicon["neutral"] + lexicon["ratings"] + [MARK]
    for spec in lexicon["domains"].values():
        words += spec["subjects"] + spec["aspects"]
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(corpus + [" ".join(words)], trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    backend.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]",
        special_tokens=[("[BOS]", backend.token_to_id("[BOS]")), ("[EOS]", backend.token_to_id("[EOS]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=max_length,
    )


def pretrain_base(folder: Path, *, tokenizer, corpus: list[dict], config: DemoConfig, tqdm_class) -> list[Path]:
    """Train a tiny GPT-2 language model on `corpus` rows; save checkpoints along the way (for Baklava).

    Each row is read as `[BOS] text [EOS] rating`: after a review ends, the model writes its star rating.

    Returns:
        The checkpoint folders, the final model last (`folder` itself).
    """
    import datasets
    from transformers import (
        DataCollatorForLanguageModeling,
        GPT2Config,
        GPT2LMHeadModel,
        PrinterCallback,
        ProgressCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from .finetune.progress import progress_callback
    from .finetune.trainer import version_dependent_arguments

    set_seed(config.seed)
    model_config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=tokenizer.model_max_length,
        n_embd=config.hidden_size,
        n_layer=config.layers,
        n_head=4,
        n_inner=4 * config.hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(model_config)
    ids = tokenizer([row["text"] for row in corpus])["input_ids"]
    ratings = tokenizer.convert_tokens_to_ids([row["rating"] for row in corpus])
    data = datasets.Dataset.from_dict({"input_ids": [row + [r] for row, r in zip(ids, ratings, strict=True)]})
    # Baklava checkpoints: the later half of one training run, as WARM takes them from one SFT trajectory.
    saves = {max(1, round(config.pretrain_steps * f)): i for i, f in enumerate((0.5, 0.75))}
    checkpoints = [folder / "checkpoints" / f"step-{step}" for step in sorted(saves)]

    class SaveCheckpoints(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in saves:
                path = checkpoints[saves[state.global_step]]
                model.save_pretrained(path)
                tokenizer.save_pretrained(path)

    args = TrainingArguments(
        output_dir=str(folder / ".trainer"),
        per_device_train_batch_size=32,
        max_steps=config.pretrain_steps,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        **version_dependent_arguments(warmup_ratio=0.1, gradient_checkpointing=False),
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[SaveCheckpoints(), progress_callback(tqdm_class, "Pretraining the tiny base")],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    import shutil

    shutil.rmtree(folder / ".trainer", ignore_errors=True)
    return [*checkpoints, folder]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def run_demo(config: DemoConfig, *, tqdm_class=None) -> DemoResult:
    """Run the demo end to end into `config.out`, once per seed.

    Layout: `data/` (pairs with their true rewards), `base/` (tiny LM, tokenizer, checkpoints), `members/`
    (fine-tuned members, their shared init and the flipped/clean training pairs), `warm/` (the merged WARM model
    with its card, `eval_results.json` and `eval.png`), `demo_config.json`. With several seeds, the first seed's
    run is laid out so and every later seed's goes to `seeds/seed-<s>/`; `seeds.json` holds every seed's
    evaluation, and WARM's `eval_results.json` and card carry the mean and standard error over seeds.

    Raises:
        OutputExistsError: `config.out` is not empty and `config.overwrite` is false.
        InvalidOptionError: fewer than one seed.
    """
    import torch

    if config.seeds < 1:
        raise InvalidOptionError(f"--seeds must be 1 or more, got {config.seeds}")
    if tqdm_class is None:
        from huggingface_hub.utils import tqdm as tqdm_class
    previous = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        started = time.perf_counter()
        out = Path(config.out)
        prepare_output(out, overwrite=config.overwrite, owns=_written_by_demo)
        (out / DEMO_CONFIG_NAME).write_text(json.dumps(asdict(config), indent=2) + "\n", encoding="utf-8")
        runs = []
        for k in range(config.seeds):
            folder = out if k == 0 else out / SEEDS_DIR / f"seed-{config.seed + k}"
            runs.append(_run_demo(replace(config, seed=config.seed + k), folder, tqdm_class=tqdm_class))
        first = runs[0]
        first.seconds = time.perf_counter() - started
        if config.seeds > 1:
            first.per_seed = [
                {"seed": config.seed + k, "results": r.results, "best_of_n": r.best_of_n} for k, r in enumerate(runs)
            ]
            _summarize_seeds(first, out)
        return first
    finally:
        torch.set_num_threads(previous)


def _written_by_demo(name: str) -> bool:
    """Whether an entry of the output folder is one a demo writes (only those go with --overwrite)."""
    return name in DEMO_ENTRIES or name.startswith("warm.warm-hub-")


def _run_demo(config: DemoConfig, out: Path, *, tqdm_class) -> DemoResult:
    """One seed of the pipeline into `out`: data, base, members, merge, evaluation and card."""
    from .merging import merge

    started = time.perf_counter()
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    train_file, test_files = write_demo_data(config, out / "data")
    corpus = pretraining_corpus_for(config)
    tokenizer = build_tokenizer([row["text"] for row in corpus], max_length=96)
    timings["data"] = time.perf_counter() - tick

    tick = time.perf_counter()
    checkpoints = pretrain_base(out / "base", tokenizer=tokenizer, corpus=corpus, config=config, tqdm_class=tqdm_class)
    timings["pretrain"] = time.perf_counter() - tick

    tick = time.perf_counter()
    run = _finetune_members(
        config, out / "members", checkpoints=checkpoints, train_file=train_file, tqdm_class=tqdm_class
    )
    timings["finetune"] = time.perf_counter() - tick
    steps = sum(m.steps or 0 for m in run.member_configs)
    train_seconds = sum(m.train_seconds or 0.0 for m in run.member_configs)

    tick = time.perf_counter()
    merged = merge([str(p) for p in run.members], out / "warm", device="cpu", tqdm_class=tqdm_class)
    timings["merge"] = time.perf_counter() - tick

    tick = time.perf_counter()
    results = _evaluate(config, run, merged.out, test_files, tqdm_class=tqdm_class)
    _save_evaluation(config, results, merged.out)
    timings["evaluate"] = time.perf_counter() - tick

    best_of_n = None
    if config.best_of_n:
        tick = time.perf_counter()
        best_of_n = _best_of_n(
            config, out, policy=checkpoints[-1], members=run.members, warm=merged.out, tqdm_class=tqdm_class
        )
        timings["best_of_n"] = time.perf_counter() - tick
    return DemoResult(
        out=out,
        warm=merged.out,
        members=list(run.members),
        results=results,
        seconds=time.perf_counter() - started,
        timings=timings,
        steps_per_second=steps / train_seconds if train_seconds else None,
        best_of_n=best_of_n,
    )


def _best_of_n(config: DemoConfig, out: Path, *, policy: Path, members: list[Path], warm: Path, tqdm_class) -> dict:
    """The base LM's samples picked by each member, the ensemble and WARM, scored by the true reward."""
    from .demo_best_of_n import run_demo_best_of_n

    result = run_demo_best_of_n(
        policy=policy,
        members=members,
        warm=warm,
        n=config.best_of_n,
        prompts=config.best_of_n_prompts,
        seed=config.seed,
        cache_dir=out / "best_of_n",
        tqdm_class=tqdm_class,
    ).to_json()
    (out / BEST_OF_N_NAME).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def best_of_n_over_seeds(per_seed: list[dict]) -> list[dict]:
    """For each proxy and n: the gold reward of its pick and its win rate against random, mean and standard
    error over seeds (each seed's figure is already a mean over its prompts)."""
    from .stats import standard_error

    keys = list(dict.fromkeys((r["proxy"], r["n"]) for r in per_seed[0]["records"]))
    rows = []
    for proxy, n in keys:
        found = [r for seed in per_seed for r in seed["records"] if (r["proxy"], r["n"]) == (proxy, n)]
        gold = [r["gold_mean"] for r in found]
        wins = [r["win_rate_vs_random"] for r in found]
        rows.append(
            {
                "proxy": proxy,
                "n": n,
                "kl": found[0]["kl"],
                "seeds": len(found),
                "gold_mean": round(sum(gold) / len(gold), 6),
                "gold_se": round(standard_error(gold), 6),
                "win_rate_mean": round(sum(wins) / len(wins), 6),
                "win_rate_se": round(standard_error(wins), 6),
            }
        )
    return rows


def write_demo_data(config: DemoConfig, folder: Path) -> tuple[Path, dict[str, Path]]:
    """The training pairs and the two clean test splits (in distribution, shifted), as JSONL files.

    The nuisance mark goes with the chosen response in training and in-distribution pairs (`config.spurious`)
    and against it in the shifted split, so a model that learned the mark rather than the sentiment loses there.

    Returns:
        The training file and {split name: file}.
    """
    from .data.reviews import IN_DISTRIBUTION, SHIFTED, preference_pairs

    spurious = config.spurious
    train = preference_pairs(config.train_pairs, domain=IN_DISTRIBUTION, seed=config.seed, spurious=spurious)
    # Test seeds are offset so that no test pair is drawn from the training stream.
    tests = {
        "in_distribution": preference_pairs(
            config.test_pairs, domain=IN_DISTRIBUTION, seed=config.seed + 10_000, spurious=spurious
        ),
        "shifted": preference_pairs(
            config.test_pairs, domain=SHIFTED, seed=config.seed + 20_000, spurious=1 - spurious
        ),
    }
    return write_jsonl(train, folder / "train.jsonl"), {
        name: write_jsonl(rows, folder / SPLIT_FILES[name]) for name, rows in tests.items()
    }


def pretraining_corpus_for(config: DemoConfig) -> list[dict]:
    """The base LM's text: reviews of every domain, half of them ending with the nuisance mark."""
    from .data.reviews import pretraining_corpus

    return pretraining_corpus(config.corpus_lines, seed=config.seed, mark_rate=CORPUS_MARK_RATE)


def _finetune_members(config: DemoConfig, out: Path, *, checkpoints: list[Path], train_file: Path, tqdm_class):
    from .finetune import FinetuneConfig, finetune

    return finetune(
        FinetuneConfig(
            bases=[str(p) for p in checkpoints] if config.baklava else [str(checkpoints[-1])],
            data=str(train_file),
            out=str(out),
            members=config.members,
            learning_rates=list(config.learning_rates),
            dropouts=list(config.dropouts),
            seed=config.seed,
            epochs=config.epochs,
            batch_size=config.batch_size,
            max_length=96,
            warmup_ratio=0.1,
            probe_epochs=1.0,
            probe_learning_rate=1e-2,
            corrupt_labels=config.corrupt_labels,
            logging_steps=50,
        ),
        tqdm_class=tqdm_class,
    )


def _evaluate(config: DemoConfig, run, warm: Path, test_files: dict[str, Path], *, tqdm_class) -> dict:
    """Members, shared init, ensemble and WARM on the clean test splits and on the flipped training pairs."""
    from .constants import FLIPPED_PAIRS_NAME
    from .evaluate import evaluate_models, load_split

    splits = [load_split(path, name=name) for name, path in test_files.items()]
    flipped = run.out / FLIPPED_PAIRS_NAME
    if flipped.is_file() and flipped.stat().st_size:
        # Scored with the labels as trained on: accuracy here is the share of the noise a model memorized.
        splits.append(load_split(flipped, name=FLIPPED_SPLIT))
    return evaluate_models(
        [*map(str, run.members), str(warm)],
        splits,
        references=[str(run.shared_init)],
        ensemble=True,
        interpolate=(0, 1) if config.members >= 2 else None,
        lambdas=config.interpolation_points,
        dataset_name="warm-hub synthetic reviews (clean test labels; restaurants in distribution, hotels shifted"
        " with the nuisance reversed; flipped: the training pairs whose labels were flipped, as trained on)",
        device="cpu",
        batch_size=64,
        tqdm_class=tqdm_class,
    )


def _save_evaluation(config: DemoConfig, results: dict, warm: Path) -> None:
    from .card import write_card
    from .constants import EVAL_RESULTS_NAME
    from .eval_results import save_results

    if config.plot and _try_plot(results, warm / PLOT_NAME):
        results["plot"] = PLOT_NAME
    write_card(warm, eval_results=save_results(results, warm / EVAL_RESULTS_NAME))


def _summarize_seeds(result: DemoResult, out: Path) -> None:
    """Mean and standard error over seeds into WARM's eval_results.json (and card); every seed in seeds.json."""
    from .card import write_card
    from .constants import EVAL_RESULTS_NAME
    from .eval_results import save_results, seeds_summary

    seeds = [entry["seed"] for entry in result.per_seed]
    result.results["seeds"] = seeds_summary([entry["results"] for entry in result.per_seed], seeds)
    document = {"seeds": seeds, "summary": result.results["seeds"], "per_seed": result.per_seed}
    if all(entry["best_of_n"] for entry in result.per_seed):
        result.results["seeds"]["best_of_n"] = best_of_n_over_seeds([e["best_of_n"] for e in result.per_seed])
    write_card(result.warm, eval_results=save_results(result.results, result.warm / EVAL_RESULTS_NAME))
    (out / SEEDS_NAME).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def _try_plot(results: dict, path: Path) -> bool:
    from .plots import plot_results

    try:
        plot_results(results, path)
    except ImportError:
        logger.info("matplotlib is not installed; skipping %s (pip install 'warm-hub[plot]')", path.name)
        return False
    return True

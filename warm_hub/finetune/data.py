"""Preference data for reward models: load TRL-format pairs, flip a share of labels, and turn texts into tokens.

The text rule (`format_text`, `encode`) lives in `warm_hub.text_rule`, below both this training module and the
scoring one (`RewardModel.score`), so a member is scored on exactly the kind of text it was trained on.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub.utils import logging

from ..errors import PreferenceDataError, SourceNotFoundError
from ..text_rule import encode, is_conversational

logger = logging.get_logger(__name__)

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_HUB_DATASET_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
FLIPPED_COLUMN = "label_flipped"


def load_preference_data(source: str | Path, *, split: str = "train", revision: str | None = None, token=None):
    """Load preference pairs in TRL's format (`prompt` optional, `chosen`, `rejected`).

    Args:
        source: a `.jsonl`/`.json`/`.parquet` file, a folder (of such files, or a `save_to_disk` dataset), or a
            Hub dataset id (`org/name`).
        split: the split to use for folders and Hub datasets (local files are a single split).
        revision: the Hub dataset revision.
        token: Hub token for private datasets.

    Returns:
        A `datasets.Dataset`.

    Raises:
        SourceNotFoundError: a local path that does not exist.
        PreferenceDataError: the data lacks `chosen`/`rejected`, or the format is not supported.
    """
    dataset = load_data_source(source, split=split, revision=revision, token=token)
    check_preference_columns(dataset, label=str(source))
    return dataset


def load_data_source(source: str | Path, *, split: str = "train", revision: str | None = None, token=None):
    """Load a table of rows from a `.jsonl`/`.json`/`.parquet` file, a data folder or a Hub dataset id.

    The one loader of every data warm-hub reads (preference pairs, best-of-N prompts); the caller checks columns.

    Raises:
        SourceNotFoundError: a local path that does not exist.
        PreferenceDataError: the file type is not supported.
    """
    import datasets

    path = Path(source)
    if path.is_file():
        builder = LOCAL_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise PreferenceDataError(
                f"{path.name}: unsupported data file type {path.suffix!r} (use .jsonl, .json or .parquet)"
            )
        check_data_file(path)
        with quiet_datasets():
            try:
                dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
            except (OSError, ValueError, StopIteration, datasets.exceptions.DatasetGenerationError) as exc:
                # What the checks above cannot see (a damaged parquet row group, ...): still one line.
                cause = exc.__cause__ or exc
                raise PreferenceDataError(f"{path.name}: cannot be read as {builder} ({_first_line(cause)})") from exc
    elif path.is_dir() or _HUB_DATASET_ID.fullmatch(str(source)) and not str(source).startswith((".", "/")):
        try:
            if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
                loaded = datasets.load_from_disk(str(path))
                dataset = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
            elif path.is_dir():
                dataset = datasets.load_dataset(str(path), split=split)
            else:
                dataset = datasets.load_dataset(str(source), split=split, revision=revision, token=token)
        except (KeyError, ValueError) as exc:  # no such split, or files datasets cannot read
            raise PreferenceDataError(f"{source}: cannot load split {split!r} ({_first_line(exc)})") from None
    else:
        raise SourceNotFoundError(f"data {str(source)!r} is neither a local file or folder nor a Hub id")
    return dataset


def check_data_file(path: Path) -> None:
    """Check a local data file before `datasets` reads it, so that damage is one line that says where.

    JSON Lines are read line by line (UTF-8, one JSON object each); a JSON file may also hold one array of
    objects; a parquet file must have its footer (a truncated one does not).

    Raises:
        PreferenceDataError: empty, not UTF-8, not JSON, or not a readable parquet file.
    """
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
            raise PreferenceDataError(
                f"{path.name}: not a readable parquet file, truncated or corrupt ({_first_line(exc)})"
            ) from None
        if rows == 0:
            raise PreferenceDataError(f"{path.name}: no preference pairs (the file has no rows)")
        return
    import json

    with open(path, "rb") as f:
        start = f.read(4096).lstrip()
        if not start:
            raise PreferenceDataError(f"{path.name}: no preference pairs (the file is empty)")
        if start[:1] == b"[":
            f.seek(0)
            try:
                rows = json.loads(f.read().decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise PreferenceDataError(f"{path.name}: not UTF-8 text (byte {exc.start})") from None
            except (ValueError, RecursionError) as exc:
                raise PreferenceDataError(f"{path.name}: not valid JSON ({type(exc).__name__})") from None
            if not rows or not all(isinstance(r, dict) for r in rows):
                raise PreferenceDataError(f"{path.name}: expected a non-empty JSON array of objects")
            return
        f.seek(0)
        count = 0
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise PreferenceDataError(f"{path.name} line {number}: not UTF-8 text (byte {exc.start})") from None
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise PreferenceDataError(f"{path.name} line {number}: not JSON ({exc.msg})") from None
            except RecursionError:
                raise PreferenceDataError(f"{path.name} line {number}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise PreferenceDataError(
                    f"{path.name} line {number}: expected a JSON object, got {type(row).__name__}"
                )
            count += 1
    if count == 0:
        raise PreferenceDataError(f"{path.name}: no preference pairs (only blank lines)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def check_preference_columns(dataset, *, label: str) -> None:
    """Raise `PreferenceDataError` unless `dataset` has `chosen` and `rejected` columns (and at least one row)
    whose values are non-empty texts or lists of messages (`check_preference_rows`)."""
    missing = [c for c in ("chosen", "rejected") if c not in dataset.column_names]
    if missing:
        raise PreferenceDataError(
            f"{label}: missing column(s) {missing}; preference data needs 'chosen' and 'rejected' (and optionally"
            f" 'prompt'), found {dataset.column_names}"
        )
    if len(dataset) == 0:
        raise PreferenceDataError(f"{label}: no preference pairs")
    columns = {c: dataset[c] for c in ("prompt", "chosen", "rejected") if c in dataset.column_names}
    check_preference_values(columns, label=label)


def check_preference_values(columns: dict[str, Sequence[Any]], *, label: str) -> None:
    """Check every `chosen`/`rejected` value is a non-blank text or a list of messages, and every prompt
    (when present) text, messages or null: an empty text has no tokens to score.

    Raises:
        PreferenceDataError: naming the first bad pair (counted from 1).
    """
    for key in ("chosen", "rejected", "prompt"):
        for number, value in enumerate(columns.get(key, ()), start=1):
            if isinstance(value, str):
                if key != "prompt" and not value.strip():
                    raise PreferenceDataError(f"{label}: pair {number} has an empty {key!r} text")
            elif not is_conversational(value) and not (key == "prompt" and value is None):
                raise PreferenceDataError(
                    f"{label}: pair {number}: {key!r} must be text or a list of messages, got {type(value).__name__}"
                )


def corrupt_labels(dataset, fraction: float, *, seed: int):
    """Swap `chosen` and `rejected` in exactly `round(fraction * n)` pairs, picked with `seed`.

    The paper's label-noise experiment. A `label_flipped` column records which pairs were swapped; columns
    named `chosen_X` with a `rejected_X` beside them are swapped along.

    Args:
        dataset: a `datasets.Dataset` with `chosen` and `rejected`.
        fraction: share of pairs to flip, in [0, 1].
        seed: picks which pairs; the same seed flips the same pairs.

    Returns:
        A new `datasets.Dataset`.
    """
    n = len(dataset)
    flipped = set(random.Random(seed).sample(range(n), round(fraction * n)))

    # Columns that describe one response (`chosen_reward`/`rejected_reward`) travel with it.
    paired = [
        (c, "rejected" + c[len("chosen") :])
        for c in dataset.column_names
        if c.startswith("chosen") and "rejected" + c[len("chosen") :] in dataset.column_names
    ]

    def swap(example: dict, index: int) -> dict:
        if index in flipped:
            for chosen, rejected in paired:
                example[chosen], example[rejected] = example[rejected], example[chosen]
        example[FLIPPED_COLUMN] = index in flipped
        return example

    with quiet_datasets():
        return dataset.map(swap, with_indices=True, load_from_cache_file=False)


def write_label_noise_files(dataset, *, flipped_path: Path, clean_path: Path) -> tuple[int, int]:
    """Write the pairs of a `corrupt_labels` output as trained on: flipped ones (labels swapped) and the others.

    Scoring a model on `flipped_path` with its labels as written gives the share of the flipped pairs it
    memorized. The `label_flipped` column is left out, so both files are plain preference files.

    Returns:
        The number of flipped and of clean pairs.
    """
    import json

    counts = {True: 0, False: 0}
    with open(flipped_path, "w", encoding="utf-8") as flipped, open(clean_path, "w", encoding="utf-8") as clean:
        for row in dataset:
            was_flipped = bool(row.pop(FLIPPED_COLUMN))
            counts[was_flipped] += 1
            (flipped if was_flipped else clean).write(json.dumps(row, ensure_ascii=False) + "\n")
    return counts[True], counts[False]


def tokenize_preferences(dataset, tokenizer, *, max_length: int):
    """Tokenize chosen and rejected texts; drop pairs where either is longer than `max_length` (as TRL does).

    Returns:
        A `datasets.Dataset` with `input_ids_chosen` and `input_ids_rejected` only.
    """
    has_prompt = "prompt" in dataset.column_names

    def tokenize(batch: dict) -> dict:
        prompts = batch["prompt"] if has_prompt else [None] * len(batch["chosen"])
        return {
            "input_ids_chosen": encode(tokenizer, prompts, batch["chosen"], max_length=max_length),
            "input_ids_rejected": encode(tokenizer, prompts, batch["rejected"], max_length=max_length),
        }

    with quiet_datasets():
        tokenized = dataset.map(
            tokenize, batched=True, remove_columns=dataset.column_names, load_from_cache_file=False
        )
        kept = tokenized.filter(
            lambda row: len(row["input_ids_chosen"]) <= max_length and len(row["input_ids_rejected"]) <= max_length,
            load_from_cache_file=False,
        )
    if len(kept) < len(tokenized):
        logger.warning(
            "dropped %d of %d pairs longer than %d tokens", len(tokenized) - len(kept), len(tokenized), max_length
        )
    if len(kept) == 0:
        raise PreferenceDataError(f"every pair is longer than --max-length {max_length}")
    return kept


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Hide `datasets`' bar of each quick map/filter (seconds at most); warm-hub's own bars cover the long steps."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


@dataclass
class PreferenceCollator:
    """Pad chosen and rejected ids of a batch to one length (right padding), so they run as one forward pass."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict:
        import torch

        longest = max(max(len(f["input_ids_chosen"]), len(f["input_ids_rejected"])) for f in features)
        batch = {}
        for side in ("chosen", "rejected"):
            ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(features), longest), dtype=torch.long)
            for row, feature in enumerate(features):
                tokens = feature[f"input_ids_{side}"]
                ids[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
                mask[row, : len(tokens)] = 1
            batch[f"input_ids_{side}"] = ids
            batch[f"attention_mask_{side}"] = mask
        return batch

"""Pairwise accuracy of reward models: members, their prediction ensemble, WARM models and in-memory averages.

`evaluate_models` scores every pair of every split once per model and builds the `eval_results.json` document
(schema in `EVAL_RESULTS_SCHEMA`) that `warm-hub card --eval-results` and `warm_hub.plots` read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub.utils import logging

from .benchmark_formats import BenchmarkSplit, benchmark_split, subset_records
from .errors import InvalidOptionError

logger = logging.get_logger(__name__)

EVAL_RESULTS_NAME = "eval_results.json"
EVAL_FORMAT = "warm-hub-eval"
EVAL_VERSION = 1
RECIPE_NAME = "warm_recipe.yaml"
EVAL_RESULTS_SCHEMA = """\
{
  "format": "warm-hub-eval", "version": 1, "metric": "pairwise_accuracy",
  "dataset": {"name": str, "type": str | null (a Hub dataset id, when every split comes from one)},
  "splits": {split name: {model name: {"accuracy": float in [0, 1], "n": int}}},
  "model": str (the WARM model's entry; present when exactly one merged checkpoint was evaluated),
  "plot": str (image path relative to this file; present when drawn),
  "models": [{"name": str, "kind": "member" | "ensemble" | "warm" | "greedy-soup" | "reference",
              "source": str | null, "members": [str] (ensemble, in-memory averages, soups)}],
  "data": [{"split": str, "source": str (file name or Hub id, never an absolute path), "pairs": int}],
  "interpolation": null | {"between": [str, str], "lambdas": [float],
                           "accuracy": {split name: [float, one per lambda]}},
  "greedy": null | {"held_out": split name, "selected": [str]},
  "subsets": [record per model and benchmark subset] (`warm_hub.benchmark_formats.RECORDS_SCHEMA`; [] without
              RewardBench, RewardBench 2 or RM-Bench splits)
}
"dataset", "splits", "model" and "plot" are what `warm_hub.card.EvalResults` reads for the model card.
Accuracy counts a pair when the chosen response scores strictly above the rejected one (ties are errors); a
benchmark split's "accuracy" is its headline score (`warm_hub.benchmark_formats`), its details under "subsets".
Interpolation point lambda is the model lambda * between[0] + (1 - lambda) * between[1]; the greedy soup's
accuracies are in "splits" under the name "greedy soup"."""


@dataclass
class PairSplit:
    """One evaluation split: its pairs and a label for reports."""

    name: str
    source: str
    prompts: list[Any]
    chosen: list[Any]
    rejected: list[Any]
    hub_id: str | None = None

    def __len__(self) -> int:
        return len(self.chosen)


def pairwise_accuracy(chosen_rewards: Sequence[float], rejected_rewards: Sequence[float]) -> float:
    """Share of pairs whose chosen reward is strictly above the rejected one."""
    if len(chosen_rewards) != len(rejected_rewards):
        raise ValueError("chosen and rejected rewards differ in length")
    if not chosen_rewards:
        raise ValueError("no pairs to evaluate")
    wins = sum(c > r for c, r in zip(chosen_rewards, rejected_rewards, strict=True))
    return wins / len(chosen_rewards)


def load_split(source: str | os.PathLike | Any, *, name: str | None = None, split: str = "test",
               limit: int | None = None) -> PairSplit | BenchmarkSplit:
    """A `PairSplit` from a file/folder/Hub dataset (TRL preference format), a `datasets.Dataset` or rows.

    Rows in RewardBench, RewardBench 2 or RM-Bench format (told apart by their columns) give a `BenchmarkSplit`
    instead, scored as that benchmark scores.

    Args:
        source: what `load_preference_data` reads, a `datasets.Dataset`, or a list of dicts.
        name: the split's name in reports (the file stem by default).
        split: split of a Hub dataset or data folder.
        limit: keep only the first `limit` pairs.
    """
    from .finetune.data import check_preference_columns, check_preference_values, load_data_source

    hub_id = None
    if isinstance(source, str | os.PathLike):
        label = source_label(source)
        dataset = load_data_source(source, split=split)
        rows = dataset.to_list() if limit is None else dataset.select(range(min(limit, len(dataset)))).to_list()
        local = Path(source).exists()
        hub_id = None if local else str(source)
        default_name = Path(source).stem if local else split
    else:
        dataset = source if hasattr(source, "column_names") else None
        rows = source.to_list() if dataset is not None else list(source)
        rows = rows if limit is None else rows[:limit]
        label, default_name = name or "in-memory", name or "data"
    if not rows:
        raise InvalidOptionError(f"{label}: no preference pairs")
    # Benchmark files (lists of responses per row) first: their rows are not plain pairs.
    benchmark = benchmark_split(rows, name=name or default_name, source=label, hub_id=hub_id)
    if benchmark is not None:
        return benchmark
    if dataset is not None:
        check_preference_columns(dataset, label=label)
    else:
        missing = [c for c in ("chosen", "rejected") if any(c not in r for r in rows)]
        if missing:
            raise InvalidOptionError(f"{label}: rows lack {missing}; preference data needs 'chosen' and 'rejected'")
        check_preference_values({c: [r.get(c) for r in rows] for c in ("prompt", "chosen", "rejected")}, label=label)
    return PairSplit(
        name=name or default_name,
        source=label,
        prompts=[r.get("prompt") for r in rows],
        chosen=[r["chosen"] for r in rows],
        rejected=[r["rejected"] for r in rows],
        hub_id=hub_id,
    )


def source_label(source: str | os.PathLike) -> str:
    """How a source appears in results: a local path by its name only (no absolute path), a Hub id as is."""
    path = Path(source)
    return path.resolve().name if path.exists() else str(source)


def split_rewards(model, split: PairSplit, *, batch_size: int | None = None) -> tuple[list[float], list[float]]:
    """Rewards of the chosen and of the rejected responses of `split` under a `RewardModel`.

    For a `BenchmarkSplit`: every candidate's reward, flat, and no rejected list.
    """
    if isinstance(split, BenchmarkSplit):
        return split.rewards(model, batch_size=batch_size), []
    chosen = model.score(split.prompts, split.chosen, batch_size=batch_size)
    rejected = model.score(split.prompts, split.rejected, batch_size=batch_size)
    return chosen, rejected


def _results(rewards: Mapping[str, tuple[list[float], list[float]]],
             benchmarks: Mapping[str, BenchmarkSplit] | None = None) -> dict:
    benchmarks = benchmarks or {}
    return {s: benchmarks[s].result(c) if s in benchmarks else {"accuracy": pairwise_accuracy(c, r), "n": len(c)}
            for s, (c, r) in rewards.items()}


class _Document:
    """Builds the evaluation document: model descriptors in order, accuracies under each split."""

    def __init__(self, splits: Sequence[PairSplit]):
        sources = list(dict.fromkeys(s.source for s in splits))
        hub_ids = {s.hub_id for s in splits}
        # model-index needs one Hub dataset id; local files still give the card its table.
        hub_id = hub_ids.pop() if len(hub_ids) == 1 else None
        self.data: dict[str, Any] = {
            "format": EVAL_FORMAT,
            "version": EVAL_VERSION,
            "metric": "pairwise_accuracy",
            "dataset": {"name": hub_id or ", ".join(sources), "type": hub_id},
            "splits": {s.name: {} for s in splits},
            "models": [],
            "data": [{"split": s.name, "source": s.source, "pairs": len(s)} for s in splits],
            "interpolation": None,
            "greedy": None,
        }

    def add(self, name: str, kind: str, results: dict, *, source: str | None = None,
            members: list[str] | None = None) -> None:
        entry: dict[str, Any] = {"name": name, "kind": kind, "source": source}
        if members is not None:
            entry["members"] = members
        self.data["models"].append(entry)
        for split, result in results.items():
            self.data["splits"][split][name] = result


def evaluate_models(
    models: Sequence[str | os.PathLike],
    splits: Sequence[PairSplit],
    *,
    references: Sequence[str | os.PathLike] = (),
    ensemble: bool = True,
    weight_average: bool = False,
    interpolate: tuple[int, int] | None = None,
    lambdas: int | Sequence[float] = 11,
    greedy_on: str | None = None,
    dataset_name: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = 32,
    token=None,
    tqdm_class=None,
) -> dict:
    """Evaluate reward models on preference splits; return the `eval_results.json` document.

    Folders holding `warm_recipe.yaml` are WARM models; the others are members. The prediction ensemble is the
    mean of the members' rewards.

    Args:
        models: local folders or Hub ids of reward checkpoints.
        splits: evaluation splits (see `load_split`).
        references: models reported for comparison only (a base, the shared init), never averaged or ensembled.
        ensemble: also evaluate the prediction ensemble of the members (needs two or more).
        weight_average: also evaluate the uniform weight average of the members, built in memory.
        interpolate: indices (into the members) of two members whose linear path to evaluate.
        lambdas: number of evenly spaced λ in [0, 1], or the λ values themselves.
        greedy_on: name of a split to select members on, greedily (model soups); reported on every split.
        dataset_name: how the card names the evaluation data (the sources by default).
        device: `cpu`/`cuda`; CUDA when available.
        dtype: dtype to evaluate in (float32 on CPU by default).
        batch_size: texts per forward pass.
        token: Hub token.
        tqdm_class: progress bar class (huggingface_hub's `tqdm` by default).

    Returns:
        A dict following `EVAL_RESULTS_SCHEMA`.

    Raises:
        InvalidOptionError: no models or splits, or an option that needs more members than given.
    """
    from .reward_model import RewardModel

    if tqdm_class is None:
        from huggingface_hub.utils import tqdm as tqdm_class
    if not models:
        raise InvalidOptionError("no models to evaluate")
    if not splits:
        raise InvalidOptionError("no evaluation data")
    names = [s.name for s in splits]
    if len(set(names)) != len(names):
        raise InvalidOptionError(f"split names must differ, got {names}")
    if greedy_on is not None and greedy_on not in names:
        raise InvalidOptionError(f"--greedy-on {greedy_on!r} is not one of the splits {names}")
    kinds = ["reference"] * len(references) + ["warm" if is_warm_model(m, token=token) else "member" for m in models]
    models = [*references, *models]
    member_ids = [i for i, k in enumerate(kinds) if k == "member"]
    labels = _unique_labels([source_label(m) for m in models])
    needs_weights = weight_average or interpolate is not None or greedy_on is not None
    if needs_weights and len(member_ids) < 2:
        raise InvalidOptionError("weight averages, interpolation and greedy selection need two or more members")
    if interpolate is not None and not all(0 <= i < len(member_ids) for i in interpolate):
        raise InvalidOptionError(f"--interpolate indices {interpolate} must lie in 0..{len(member_ids) - 1}")

    document = _Document(splits)
    benchmarks = {s.name: s for s in splits if isinstance(s, BenchmarkSplit)}

    def results(split_rewards: Mapping[str, tuple[list[float], list[float]]]) -> dict:
        return _results(split_rewards, benchmarks)

    if dataset_name:
        document.data["dataset"]["name"] = dataset_name
    rewards: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    states: dict[str, dict] = {}
    template = None
    with tqdm_class(total=len(models) * len(splits), desc="Scoring", unit="split") as bar:
        for model_path, kind, label in zip(models, kinds, labels, strict=True):
            rm = RewardModel.from_pretrained(
                model_path, device=device, dtype=dtype, token=token, batch_size=batch_size
            )
            rewards[label] = {}
            for split in splits:
                rewards[label][split.name] = split_rewards(rm, split)
                bar.update(1)
            document.add(label, kind, results(rewards[label]), source=label)
            if kind == "member" and needs_weights:
                states[label] = {k: v.detach().clone() for k, v in rm.model.state_dict().items()}
                template = rm
    members = [labels[i] for i in member_ids]
    if ensemble and len(members) >= 2:
        mean = {
            s.name: _mean_rewards([rewards[m][s.name] for m in members])
            for s in splits
        }
        document.add("ensemble", "ensemble", results(mean), members=members)

    def averaged(names: list[str], weights: list[float]) -> dict[str, tuple[list[float], list[float]]]:
        load_average(template.model, [states[n] for n in names], weights, labels=list(names))
        return {s.name: split_rewards(template, s) for s in splits}

    if weight_average:
        uniform = [1 / len(members)] * len(members)
        document.add("warm (in memory)", "warm", results(averaged(members, uniform)), members=members)
    if interpolate is not None:
        first, second = (members[i] for i in interpolate)
        points = _lambdas(lambdas)
        curve: dict[str, list[float]] = {s.name: [] for s in splits}
        for lam in tqdm_class(points, desc="Interpolating", unit="λ"):
            for split_name, value in results(averaged([first, second], [lam, 1 - lam])).items():
                curve[split_name].append(value["accuracy"])
        document.data["interpolation"] = {"between": [first, second], "lambdas": points, "accuracy": curve}
    if greedy_on is not None:
        selected, soup = _greedy_soup(members, rewards, greedy_on, averaged, results)
        document.data["greedy"] = {"held_out": greedy_on, "selected": selected}
        document.add("greedy soup", "greedy-soup", soup, members=selected)
    merged = [labels[i] for i, kind in enumerate(kinds) if kind == "warm"]
    if len(merged) == 1:
        document.data["model"] = merged[0]
    document.data["subsets"] = subset_records(document.data)
    return document.data


def is_warm_model(source: str | os.PathLike, *, token=None) -> bool:
    """Whether `source` (a folder or Hub repo) is a merge output: it holds a `warm_recipe.yaml`."""
    path = Path(source)
    if path.exists():
        return (path / RECIPE_NAME).is_file()
    from huggingface_hub import file_exists

    from .hub_errors import hub_errors

    with hub_errors(str(source), token=token, retry="retry later"):
        return file_exists(str(source), RECIPE_NAME, token=token)


def _greedy_soup(members, rewards, held_out, averaged, score=_results) -> tuple[list[str], dict]:
    """Model soups' greedy recipe: add members best-first while the soup's held-out accuracy does not drop."""
    held = {m: score({held_out: rewards[m][held_out]})[held_out]["accuracy"] for m in members}
    ranked = sorted(members, key=lambda m: -held[m])
    soup = [ranked[0]]
    best = score(rewards[ranked[0]])
    for candidate in ranked[1:]:
        trial = soup + [candidate]
        results = score(averaged(trial, [1 / len(trial)] * len(trial)))
        if results[held_out]["accuracy"] >= best[held_out]["accuracy"]:
            soup, best = trial, results
    return soup, best


def load_average(model, states: list[dict], weights: list[float], labels: list[str] | None = None) -> None:
    """Load Σ w_i · state_i into `model` through the averaging dispatcher `warm-hub merge` uses: same bits, and
    the same refusal of NaN/Inf (`NonFiniteWeightsError`, naming the tensor and the member, from `labels`)."""
    import torch

    from .averaging import average_tensors, non_finite_error

    averaged = dict(states[0])
    names = [key for key, first in states[0].items() if first.is_floating_point()]
    outs = [torch.empty_like(states[0][key]) for key in names]
    bad = average_tensors(outs, [[s[key] for s in states] for key in names], weights)
    if bad:
        key = names[bad[0]]
        labels = labels or [f"member {i}" for i in range(len(states))]
        raise non_finite_error(key, [s[key] for s in states], labels, outs[bad[0]].dtype, keep=None, widen=None)
    averaged.update(zip(names, outs, strict=True))
    model.load_state_dict(averaged)


def _mean_rewards(per_member: list[tuple[list[float], list[float]]]) -> tuple[list[float], list[float]]:
    count = len(per_member)
    chosen = [sum(values) / count for values in zip(*(c for c, _ in per_member), strict=True)]
    rejected = [sum(values) / count for values in zip(*(r for _, r in per_member), strict=True)]
    return chosen, rejected


def _lambdas(lambdas: int | Sequence[float]) -> list[float]:
    if isinstance(lambdas, int):
        if lambdas < 2:
            raise InvalidOptionError(f"the interpolation needs at least 2 points, got {lambdas}")
        return [round(i / (lambdas - 1), 6) for i in range(lambdas)]
    points = [float(x) for x in lambdas]
    if not points:
        raise InvalidOptionError("no interpolation points")
    return points


def _unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def results_table(document: dict) -> list[list[str]]:
    """Rows for printing: a header (model, kind, one column per split) then one row per model."""
    splits = list(document["splits"])
    rows = [["model", "kind", *splits]]
    for model in document["models"]:
        cells = []
        for split in splits:
            result = document["splits"][split].get(model["name"])
            cells.append("-" if result is None else f"{result['accuracy']:.3f}")
        rows.append([model["name"], model["kind"], *cells])
    return rows


def accuracy(document: dict, model: str, split: str) -> float | None:
    """The accuracy of `model` on `split` in an evaluation document (None when not evaluated)."""
    result = document["splits"].get(split, {}).get(model)
    return None if result is None else result["accuracy"]


def save_results(document: dict, path: str | os.PathLike) -> Path:
    """Write the evaluation document as JSON (stable key order, two-space indent)."""
    path = Path(path)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path


def load_results(path: str | os.PathLike) -> dict:
    """Read an `eval_results.json` and check its format marker.

    Raises:
        InvalidOptionError: the file is not a warm-hub evaluation document.
    """
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InvalidOptionError(f"{Path(path).name} is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != EVAL_FORMAT:
        raise InvalidOptionError(f"{Path(path).name} is not a warm-hub evaluation file (format {EVAL_FORMAT!r})")
    return document

"""The evaluation document (`eval_results.json`): its one schema, its writer, its reader and its checks.

`warm-hub evaluate` and the demo build it with `EvalDocument` and `save_results`; the model card reads it with
`EvalResults`, which also accepts the smaller hand-written form documented there. Every name and key lives here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .configs import is_number
from .errors import InvalidOptionError

EVAL_FORMAT = "warm-hub-eval"
EVAL_VERSION = 2
METRIC = "pairwise_accuracy"
THIS_MODEL_KEYS = ("warm", "WARM", "merged", "this model")
ROLES = ("member", "warm", "reference")
MODEL_INDEX_TASK = "Reward modeling (pairwise preference accuracy)"
EVAL_RESULTS_SCHEMA = """\
{
  "format": "warm-hub-eval", "version": 2, "metric": "pairwise_accuracy",
  "dataset": {"name": str, "type": str | null (a Hub dataset id, when every split comes from one)},
  "splits": {split name: {model name: {"accuracy": float in [0, 1], "n": int, "ci": [low, high] (Wilson 95%)}}},
  "model": str (the WARM model's entry; present when exactly one merged checkpoint was evaluated),
  "plot": str (image path relative to this file; present when drawn),
  "models": [{"name": str, "kind": "member" | "ensemble" | "warm" | "greedy-soup" | "reference",
              "source": str | null, "members": [str] (ensemble, in-memory averages, soups)}],
  "data": [{"split": str, "source": str (file name or Hub id, never an absolute path), "pairs": int}],
  "comparisons": [{"a": str, "b": str, "split": str, "difference": float (accuracy of a minus b), "n": int,
                   "ci": [low, high] (paired bootstrap 95%), "selected_on": split name (b is the best member
                   on that split; absent when b is not a selected member)}],
  "interpolation": null | {"between": [str, str], "lambdas": [float],
                           "accuracy": {split name: [float, one per lambda]}},
  "greedy": null | {"held_out": split name, "selected": [str]},
  "subsets": [record per model and benchmark subset] (`warm_hub.benchmark_formats.RECORDS_SCHEMA`; [] without
              RewardBench, RewardBench 2 or RM-Bench splits),
  "seeds": absent | {"seeds": [int], "splits": {split name: {model name: {"mean": float, "se": float,
                     "values": [float, one per seed]}}}, "comparisons": [{"a", "b", "split", "mean", "se",
                     "values"}]}
}
Accuracy counts a pair when the chosen response scores strictly above the rejected one (ties are errors); a
benchmark split's "accuracy" is its headline score (`warm_hub.benchmark_formats`), its details under "subsets".
Interpolation point lambda is the model lambda * between[0] + (1 - lambda) * between[1]; the greedy soup's
accuracies are in "splits" under the name "greedy soup". With "seeds", "splits" holds the first seed's run and
"seeds" the mean and standard error over every seed."""


def accuracy_entry(correct: Sequence[bool]) -> dict:
    """The `splits` entry of one model on one split: accuracy, number of pairs and Wilson 95% interval.

    Args:
        correct: for each pair, whether the model ranked it right.
    """
    from .stats import wilson_interval

    n = len(correct)
    if n == 0:
        raise ValueError("no pairs to evaluate")
    wins = sum(bool(c) for c in correct)
    low, high = wilson_interval(wins, n)
    return {"accuracy": wins / n, "n": n, "ci": [round(low, 6), round(high, 6)]}


class EvalDocument:
    """Builds the evaluation document: model descriptors in order, accuracies under each split, comparisons."""

    def __init__(self, splits: Sequence[tuple[str, str, int, str | None]], *, dataset_name: str | None = None):
        """Args:
        splits: (name, source label, pairs, Hub dataset id or None) of each split, in report order.
        dataset_name: how the card names the evaluation data (the sources by default).
        """
        sources = list(dict.fromkeys(source for _, source, _, _ in splits))
        hub_ids = {hub_id for *_, hub_id in splits}
        # model-index needs one Hub dataset id; local files still give the card its table.
        hub_id = hub_ids.pop() if len(hub_ids) == 1 else None
        self.data: dict[str, Any] = {
            "format": EVAL_FORMAT,
            "version": EVAL_VERSION,
            "metric": METRIC,
            "dataset": {"name": dataset_name or hub_id or ", ".join(sources), "type": hub_id},
            "splits": {name: {} for name, *_ in splits},
            "models": [],
            "data": [{"split": name, "source": source, "pairs": pairs} for name, source, pairs, _ in splits],
            "comparisons": [],
            "interpolation": None,
            "greedy": None,
        }

    def add(
        self, name: str, kind: str, results: dict, *, source: str | None = None, members: list[str] | None = None
    ) -> None:
        """Add a model (`results`: split name -> `accuracy_entry`)."""
        entry: dict[str, Any] = {"name": name, "kind": kind, "source": source}
        if members is not None:
            entry["members"] = members
        self.data["models"].append(entry)
        for split, result in results.items():
            self.data["splits"][split][name] = result

    def compare(
        self,
        a: str,
        b: str,
        split: str,
        *,
        difference: float,
        ci: tuple[float, float],
        n: int,
        selected_on: str | None = None,
    ) -> None:
        """Add a paired comparison of models `a` and `b` on `split`."""
        record: dict[str, Any] = {
            "a": a,
            "b": b,
            "split": split,
            "difference": round(difference, 6),
            "n": n,
            "ci": [round(ci[0], 6), round(ci[1], 6)],
        }
        if selected_on is not None:
            record["selected_on"] = selected_on
        self.data["comparisons"].append(record)

    def finish(self) -> dict:
        """The document; names the WARM model when exactly one merged checkpoint is in it."""
        merged = [m["name"] for m in self.data["models"] if m["kind"] == "warm" and m["source"] is not None]
        if len(merged) == 1:
            self.data["model"] = merged[0]
        return self.data


def seeds_summary(documents: Sequence[dict], seeds: Sequence[int]) -> dict:
    """The `seeds` block: for each split, model and comparison, the mean and standard error over seeds.

    Args:
        documents: one evaluation document per seed, of the same splits and model names.
        seeds: the seed of each document.

    Returns:
        {"seeds": [...], "splits": {split: {model: {"mean", "se", "values"}}}, "comparisons": [...]} where a
        model or comparison missing from a seed's document is left out of that seed's values.
    """
    from .stats import standard_error

    def summary(values: list[float]) -> dict:
        return {
            "mean": round(sum(values) / len(values), 6),
            "se": round(standard_error(values), 6),
            "values": [round(v, 6) for v in values],
        }

    if len(documents) != len(seeds) or not documents:
        raise ValueError(f"{len(documents)} documents for {len(seeds)} seeds")
    splits: dict[str, dict[str, dict]] = {}
    for split, models in documents[0]["splits"].items():
        splits[split] = {}
        for model in models:
            values = [d["splits"][split][model]["accuracy"] for d in documents if model in d["splits"].get(split, {})]
            splits[split][model] = summary(values)
    comparisons = []
    for first in documents[0].get("comparisons") or []:
        key = (first["a"], first["b"], first["split"])
        # The best member may differ from seed to seed: compare by role, not by name.
        values = [
            c["difference"]
            for d in documents
            for c in d.get("comparisons") or []
            if (c["a"], c["split"]) == key[::2]
            and (c["b"] == first["b"] or ("selected_on" in c and "selected_on" in first))
        ]
        label = "best member" if "selected_on" in first else first["b"]
        comparisons.append({"a": first["a"], "b": label, "split": first["split"], **summary(values)})
    return {"seeds": list(seeds), "splits": splits, "comparisons": comparisons}


def save_results(document: dict, path: str | os.PathLike) -> Path:
    """Check the evaluation document and write it as JSON (two-space indent).

    Raises:
        InvalidOptionError: the document does not follow `EVAL_RESULTS_SCHEMA`.
    """
    EvalResults.from_dict(document, where="evaluation document")
    path = Path(path)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path


def load_results(path: str | os.PathLike) -> dict:
    """Read an `eval_results.json` written by warm-hub and check it.

    Raises:
        InvalidOptionError: the file is not a warm-hub evaluation document.
    """
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InvalidOptionError(f"{Path(path).name} is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != EVAL_FORMAT:
        raise InvalidOptionError(f"{Path(path).name} is not a warm-hub evaluation file (format {EVAL_FORMAT!r})")
    EvalResults.from_dict(document, where=Path(path).name)
    return document


@dataclass
class EvalResults:
    """Pairwise accuracies to show on the card, read from an eval-results JSON.

    Reads what `warm-hub evaluate --json FILE` writes (`EVAL_RESULTS_SCHEMA`) and this smaller hand-written form::

        {
          "dataset": {"name": "HH-RLHF harmless", "type": "Anthropic/hh-rlhf", "config": null, "revision": null},
          "splits": {"test": {"WARM": {"accuracy": 0.712, "n": 500}, "member-0": {"accuracy": 0.69, "n": 500}}},
          "model": "WARM",
          "plot": "eval.png"
        }

    `splits` maps a split name to model name -> {"accuracy": float in [0, 1], "n": int (optional), "ci":
    [low, high] (optional)}. `model` (optional) names this merged model's entry; else the one entry of kind
    "warm" in `models`, an entry named `warm`/`WARM`/`merged`, or the card's model name. Other keys are
    allowed. `dataset.type` (a Hub dataset id) is needed for the `model-index` front matter; without it the
    card still shows the table. `plot` (optional) is an image path relative to the JSON file.
    """

    splits: dict[str, dict[str, dict[str, Any]]]
    dataset_name: str | None = None
    dataset_type: str | None = None
    dataset_config: str | None = None
    dataset_revision: str | None = None
    model: str | None = None
    plot: Path | None = None
    raw: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalResults:
        """Read and validate an eval-results JSON file.

        Raises:
            InvalidOptionError: unreadable, or not of the documented schema.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidOptionError(f"{path}: no such eval-results file") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise InvalidOptionError(f"{path}: not a readable JSON file ({exc})") from None
        results = cls.from_dict(data, where=str(path))
        if results.plot is not None and not results.plot.is_absolute():
            results.plot = path.parent / results.plot
        return results

    @classmethod
    def from_dict(cls, data: object, *, where: str = "eval results") -> EvalResults:
        """Validate `data` and read it.

        Raises:
            InvalidOptionError: `data` is not of the documented schema.
        """

        def bad(problem: str) -> InvalidOptionError:
            return InvalidOptionError(f"{where}: {problem} (see warm_hub.eval_results for the schema)")

        if not isinstance(data, dict):
            raise bad("expected a JSON object")
        splits = data.get("splits")
        if not isinstance(splits, dict) or not splits:
            raise bad('"splits" must map split names to {model name: {"accuracy": ..., "n": ...}}')
        clean = {str(split): _check_split(split, models, bad) for split, models in splits.items()}
        dataset = data.get("dataset") or {}
        if isinstance(dataset, str):
            dataset = {"name": dataset}
        if not isinstance(dataset, dict):
            raise bad('"dataset" must be an object with "name" and "type"')
        plot = data.get("plot")
        if plot is not None and not isinstance(plot, str):
            raise bad('"plot" must be a file name')
        model = data.get("model")
        if model is None and isinstance(data.get("models"), list):
            # `warm-hub evaluate` describes its models; a single WARM entry is this model.
            warm = [m.get("name") for m in data["models"] if isinstance(m, dict) and m.get("kind") == "warm"]
            model = warm[0] if len(warm) == 1 else None
        seeds = data.get("seeds")
        if seeds is not None and not (isinstance(seeds, dict) and isinstance(seeds.get("splits"), dict)):
            raise bad('"seeds" must hold "seeds" and "splits"')
        for split, by_model in (seeds or {}).get("splits", {}).items():
            if not isinstance(by_model, dict) or not all(
                isinstance(entry, dict) and all(is_number(entry.get(key)) for key in ("mean", "se"))
                for entry in by_model.values()
            ):
                raise bad(f'seeds/{split}: each model must have a numeric "mean" and "se"')
        return cls(
            splits=clean,
            dataset_name=_text(dataset.get("name")) or _text(dataset.get("type")),
            dataset_type=_text(dataset.get("type")),
            dataset_config=_text(dataset.get("config")),
            dataset_revision=_text(dataset.get("revision")),
            model=_text(model),
            plot=Path(plot) if plot else None,
            raw=data,
        )

    def to_dict(self) -> dict:
        """The documented JSON form (what `load` reads)."""
        dataset = {"name": self.dataset_name, "type": self.dataset_type}
        if self.dataset_config:
            dataset["config"] = self.dataset_config
        if self.dataset_revision:
            dataset["revision"] = self.dataset_revision
        data: dict = {"dataset": dataset, "splits": self.splits}
        if self.model:
            data["model"] = self.model
        if self.plot is not None:
            data["plot"] = self.plot.name
        return data

    def models(self) -> list[str]:
        """Every model named in any split, in order of first appearance."""
        seen: dict[str, None] = {}
        for models in self.splits.values():
            seen.update(dict.fromkeys(models))
        return list(seen)

    def this_model(self, model_name: str | None) -> str | None:
        """The entry of the merged model itself, if one can be told apart."""
        names = self.models()
        if self.model:
            return self.model if self.model in names else None
        for candidate in (*THIS_MODEL_KEYS, model_name):
            if candidate in names:
                return candidate
        lowered = {name.lower(): name for name in names}
        return next((lowered[k.lower()] for k in THIS_MODEL_KEYS if k.lower() in lowered), None)

    def rows(self, model_name: str | None) -> list[dict]:
        """Table rows for the card: the model's name (bold for this model) and one cell per split."""
        this = self.this_model(model_name)
        rows = []
        for name in self.models():
            cells = [format_accuracy(self.splits[split].get(name)) for split in self.splits]
            rows.append({"name": f"**{name}**" if name == this else name, "values": cells})
        return rows

    def seed_rows(self, model_name: str | None) -> tuple[list[int], list[str], list[dict]]:
        """The over-seeds table for the card: (seeds, splits, rows of "mean ± se" cells); empty without seeds."""
        block = self.raw.get("seeds")
        if not block:
            return [], [], []
        this = self.this_model(model_name)
        splits = list(block["splits"])
        names = list(dict.fromkeys(name for split in splits for name in block["splits"][split]))
        rows = []
        for name in names:
            cells = []
            for split in splits:
                entry = block["splits"][split].get(name)
                cells.append("–" if entry is None else f"{entry['mean']:.3f} ± {entry['se']:.3f}")
            rows.append({"name": f"**{name}**" if name == this else name, "values": cells})
        return list(block.get("seeds", [])), splits, rows

    def model_index(self, model_name: str | None, *, task_name: str = MODEL_INDEX_TASK) -> list[dict]:
        """The `results` of the card's `model-index` for the merged model, or [] when not possible."""
        this = self.this_model(model_name)
        if this is None or not self.dataset_type:
            return []
        results = []
        for split, models in self.splits.items():
            if this not in models:
                continue
            dataset = {
                "name": self.dataset_name or self.dataset_type,
                "type": self.dataset_type,
                "config": self.dataset_config,
                "split": split,
                "revision": self.dataset_revision,
            }
            results.append(
                {
                    "task": {"type": "text-classification", "name": task_name},
                    "dataset": {k: v for k, v in dataset.items() if v is not None},
                    "metrics": [
                        {"type": "accuracy", "value": round(models[this]["accuracy"], 6), "name": "Pairwise accuracy"}
                    ],
                }
            )
        return results


def format_accuracy(result: dict | None) -> str:
    """One table cell: `0.712 [0.670, 0.751] (n=500)`, without the parts a hand-written file leaves out."""
    if result is None:
        return "–"
    ci = f" [{result['ci'][0]:.3f}, {result['ci'][1]:.3f}]" if "ci" in result else ""
    n = f" (n={result['n']})" if "n" in result else ""
    return f"{result['accuracy']:.3f}{ci}{n}"


def _check_split(split: object, models: object, bad) -> dict[str, dict[str, Any]]:
    if not isinstance(models, dict) or not models:
        raise bad(f"split {split!r} must map model names to results")
    clean: dict[str, dict[str, Any]] = {}
    for model, result in models.items():
        if isinstance(result, int | float) and not isinstance(result, bool):
            result = {"accuracy": result}
        accuracy = result.get("accuracy") if isinstance(result, dict) else None
        if not is_number(accuracy):
            raise bad(f'{split}/{model}: "accuracy" must be a number')
        if not 0 <= accuracy <= 1:
            raise bad(f"{split}/{model}: accuracy {accuracy} is not a fraction in [0, 1]")
        entry: dict[str, Any] = {"accuracy": float(accuracy)}
        n = result.get("n")
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise bad(f'{split}/{model}: "n" must be a count of pairs')
            entry["n"] = n
        ci = result.get("ci")
        if ci is not None:
            if (
                not isinstance(ci, list)
                or len(ci) != 2
                or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in ci)
                or not 0 <= ci[0] <= ci[1] <= 1
            ):
                # Not necessarily around the accuracy: a bootstrap percentile interval need not contain it.
                raise bad(f'{split}/{model}: "ci" must be [low, high] within [0, 1]')
            entry["ci"] = [float(ci[0]), float(ci[1])]
        clean[str(model)] = entry
    return clean


def _text(value: object) -> str | None:
    return str(value) if value not in (None, "") else None

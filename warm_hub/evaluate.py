"""Pairwise accuracy of reward models: members, their prediction ensemble, WARM models and in-memory averages.

`evaluate_models` scores every pair of every split once per model and builds the evaluation document
(`warm_hub.eval_results`, which also writes and reads it): every accuracy with its n and a Wilson 95% interval,
and paired comparisons (WARM against the ensemble and against the best member) with paired-bootstrap intervals.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub.utils import logging

from .benchmark_formats import BenchmarkSplit, benchmark_split, subset_records
from .constants import RECIPE_NAME
from .errors import InvalidOptionError
from .eval_results import (  # noqa: F401 - the names and the load/save pair stay importable from here
    EVAL_FORMAT,
    EVAL_RESULTS_SCHEMA,
    ROLES,
    EvalDocument,
    accuracy_entry,
    format_accuracy,
    load_results,
    save_results,
)

logger = logging.get_logger(__name__)

ENSEMBLE = "ensemble"
Rewards = dict[str, tuple[list[float], list[float]]]


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


def load_split(
    source: str | os.PathLike | Any, *, name: str | None = None, split: str = "test", limit: int | None = None
) -> PairSplit | BenchmarkSplit:
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


def correct_pairs(chosen_rewards: Sequence[float], rejected_rewards: Sequence[float]) -> list[bool]:
    """For each pair, whether the chosen reward is strictly above the rejected one (a tie is an error)."""
    if len(chosen_rewards) != len(rejected_rewards):
        raise ValueError("chosen and rejected rewards differ in length")
    return [c > r for c, r in zip(chosen_rewards, rejected_rewards, strict=True)]


def _results(rewards: Rewards, benchmarks: Mapping[str, BenchmarkSplit] | None = None) -> dict:
    """Each split's entry: pairwise accuracy with n and interval, or a benchmark split's own scoring."""
    benchmarks = benchmarks or {}
    return {
        s: benchmarks[s].result(c) if s in benchmarks else accuracy_entry(correct_pairs(c, r))
        for s, (c, r) in rewards.items()
    }


@dataclass
class _Scored:
    """What scoring the models gave: their names and roles, rewards per split, and the members' weights."""

    labels: list[str]
    kinds: list[str]
    rewards: dict[str, Rewards]
    states: dict[str, dict]
    template: Any

    @property
    def members(self) -> list[str]:
        return [label for label, kind in zip(self.labels, self.kinds, strict=True) if kind == "member"]


def evaluate_models(
    models: Sequence[str | os.PathLike],
    splits: Sequence[PairSplit],
    *,
    references: Sequence[str | os.PathLike] = (),
    roles: Mapping[str, str] | None = None,
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
    """Evaluate reward models on preference splits; return the evaluation document.

    Each model has a role: `member` (ensembled, averaged), `warm` (a merge, compared with the members) or
    `reference` (reported only). Folders holding `warm_recipe.yaml` are WARM models and the others members,
    unless `roles` says otherwise. The prediction ensemble is the mean of the members' rewards.

    Every WARM model (and the in-memory average) is compared with the ensemble and with the best member, on the
    same pairs (paired bootstrap). The best member is the one most accurate on the first split, then reported
    on every split: choosing it on each split itself would flatter it with the noise of that split.

    Args:
        models: local folders or Hub ids of reward checkpoints.
        splits: evaluation splits (see `load_split`); the first selects the best member.
        references: models reported for comparison only (a base, the shared init), never averaged or ensembled.
        roles: model (as given, or its label in the table) -> "member" | "warm" | "reference".
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
        A dict following `warm_hub.eval_results.EVAL_RESULTS_SCHEMA`.

    Raises:
        InvalidOptionError: no models or splits, an unknown role, or an option that needs more members.
    """
    if tqdm_class is None:
        from huggingface_hub.utils import tqdm as tqdm_class
    _check_splits(splits, greedy_on=greedy_on)
    if not models:
        raise InvalidOptionError("no models to evaluate")
    kinds = ["reference"] * len(references) + _roles(models, roles or {}, token=token)
    sources = [*references, *models]
    labels = _unique_labels([source_label(m) for m in sources])
    member_count = kinds.count("member")
    needs_weights = weight_average or interpolate is not None or greedy_on is not None
    if needs_weights and member_count < 2:
        raise InvalidOptionError("weight averages, interpolation and greedy selection need two or more members")
    if interpolate is not None and not all(0 <= i < member_count for i in interpolate):
        raise InvalidOptionError(f"--interpolate indices {interpolate} must lie in 0..{member_count - 1}")

    document = EvalDocument([(s.name, s.source, len(s), s.hub_id) for s in splits], dataset_name=dataset_name)
    benchmarks = {s.name: s for s in splits if isinstance(s, BenchmarkSplit)}

    def results(rewards: Rewards) -> dict:
        return _results(rewards, benchmarks)

    scored = _score_models(
        sources,
        kinds,
        labels,
        splits,
        document,
        keep_weights=needs_weights,
        device=device,
        dtype=dtype,
        token=token,
        batch_size=batch_size,
        tqdm_class=tqdm_class,
        score=results,
    )
    members = scored.members
    if ensemble and len(members) >= 2:
        scored.rewards[ENSEMBLE] = {
            s.name: _mean_rewards([scored.rewards[m][s.name] for m in members]) for s in splits
        }
        document.add(ENSEMBLE, "ensemble", results(scored.rewards[ENSEMBLE]), members=members)

    def averaged(names: list[str], weights: list[float]) -> Rewards:
        load_average(scored.template.model, [scored.states[n] for n in names], weights, labels=list(names))
        return {s.name: split_rewards(scored.template, s) for s in splits}

    warm = [label for label, kind in zip(labels, kinds, strict=True) if kind == "warm"]
    if weight_average:
        name = "warm (in memory)"
        scored.rewards[name] = averaged(members, [1 / len(members)] * len(members))
        document.add(name, "warm", results(scored.rewards[name]), members=members)
        warm.append(name)
    if interpolate is not None:
        document.data["interpolation"] = _interpolation(
            [members[i] for i in interpolate], _lambdas(lambdas), splits, averaged, tqdm_class, results
        )
    if greedy_on is not None:
        selected, soup = _greedy_soup(members, scored.rewards, greedy_on, averaged, results)
        document.data["greedy"] = {"held_out": greedy_on, "selected": selected}
        document.add("greedy soup", "greedy-soup", soup, members=selected)
    # Paired comparisons are of pairwise accuracy; benchmark splits report their own scores per subset.
    pair_splits = [s.name for s in splits if s.name not in benchmarks]
    _compare(document, scored.rewards, warm=warm, members=members, splits=pair_splits)
    document.data["subsets"] = subset_records(document.data)
    return document.finish()


def _check_splits(splits: Sequence[PairSplit], *, greedy_on: str | None) -> None:
    if not splits:
        raise InvalidOptionError("no evaluation data")
    names = [s.name for s in splits]
    if len(set(names)) != len(names):
        raise InvalidOptionError(f"split names must differ, got {names}")
    if greedy_on is not None and greedy_on not in names:
        raise InvalidOptionError(f"--greedy-on {greedy_on!r} is not one of the splits {names}")


def _roles(models: Sequence[str | os.PathLike], roles: Mapping[str, str], *, token) -> list[str]:
    """Each model's role: as `roles` says (keyed by the model as given or by its label), else detected."""
    known = {str(m) for m in models} | {source_label(m) for m in models}
    unknown = sorted(set(roles) - known)
    if unknown:
        raise InvalidOptionError(f"--role names {unknown} that are not among the models evaluated")
    bad = sorted({r for r in roles.values() if r not in ROLES})
    if bad:
        raise InvalidOptionError(f"unknown role(s) {bad}; choose from {', '.join(ROLES)}")
    out = []
    for model in models:
        role = roles.get(str(model), roles.get(source_label(model)))
        out.append(role or ("warm" if is_warm_model(model, token=token) else "member"))
    return out


def _score_models(
    sources,
    kinds,
    labels,
    splits,
    document: EvalDocument,
    *,
    keep_weights: bool,
    device,
    dtype,
    token,
    batch_size: int,
    tqdm_class,
    score=_results,
) -> _Scored:
    """Score every split with every model once; keep the members' weights when averages are asked for."""
    from .reward_model import RewardModel

    scored = _Scored(labels=labels, kinds=kinds, rewards={}, states={}, template=None)
    with tqdm_class(total=len(sources) * len(splits), desc="Scoring", unit="split") as bar:
        for source, kind, label in zip(sources, kinds, labels, strict=True):
            rm = RewardModel.from_pretrained(source, device=device, dtype=dtype, token=token, batch_size=batch_size)
            scored.rewards[label] = {}
            for split in splits:
                scored.rewards[label][split.name] = split_rewards(rm, split)
                bar.update(1)
            document.add(label, kind, score(scored.rewards[label]), source=label)
            if kind == "member" and keep_weights:
                scored.states[label] = {k: v.detach().clone() for k, v in rm.model.state_dict().items()}
                scored.template = rm
    return scored


def _interpolation(between: list[str], points: list[float], splits, averaged, tqdm_class, score=_results) -> dict:
    first, second = between
    curve: dict[str, list[float]] = {s.name: [] for s in splits}
    for lam in tqdm_class(points, desc="Interpolating", unit="λ"):
        for split_name, value in score(averaged([first, second], [lam, 1 - lam])).items():
            curve[split_name].append(value["accuracy"])
    return {"between": [first, second], "lambdas": points, "accuracy": curve}


def _compare(
    document: EvalDocument, rewards: dict[str, Rewards], *, warm: list[str], members: list[str], splits: list[str]
) -> None:
    """Paired comparisons of each WARM model with the ensemble and with the best member (picked on splits[0])."""
    from .stats import paired_bootstrap

    if not members or not splits:
        return
    outcomes = {name: {s: correct_pairs(*rewards[name][s]) for s in splits} for name in rewards}
    selection = splits[0]
    best = max(members, key=lambda m: sum(outcomes[m][selection]))
    for a in warm:
        for b, selected_on in ((ENSEMBLE, None), (best, selection)):
            if b not in outcomes:
                continue
            for split in splits:
                difference, ci = paired_bootstrap(outcomes[a][split], outcomes[b][split])
                document.compare(
                    a, b, split, difference=difference, ci=ci, n=len(outcomes[a][split]), selected_on=selected_on
                )


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
    """Rows for printing: a header (model, role, one column per split with its n) then one row per model.

    Each cell is the pairwise accuracy with its Wilson 95% interval.
    """
    splits = list(document["splits"])
    pairs = {d["split"]: d["pairs"] for d in document["data"]}
    rows = [["model", "role", *(f"{s}: pairwise accuracy [95% CI] (n={pairs.get(s, '?')})" for s in splits)]]
    for model in document["models"]:
        cells = [format_accuracy(document["splits"][s].get(model["name"])).split(" (n=")[0] for s in splits]
        rows.append([model["name"], model["kind"], *cells])
    return rows


def comparisons_table(document: dict) -> list[list[str]]:
    """Rows for printing the paired comparisons: a, b, split, difference and its paired-bootstrap 95% interval."""
    rows = [["a", "b", "split", "a - b [95% CI]"]]
    for c in document.get("comparisons") or []:
        b = f"{c['b']} (best on {c['selected_on']})" if c.get("selected_on") else c["b"]
        # On the split the member was picked on, its accuracy is flattered (winner's curse): say so.
        split = f"{c['split']} (picked there)" if c.get("selected_on") == c["split"] else c["split"]
        rows.append([c["a"], b, split, f"{c['difference']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"])
    return rows

"""`warm_hub.inspect_ingredients`: can these checkpoints be merged, and how far apart are they?

Compatibility comes from headers and configs alone; distances take one streaming pass over the weights,
with memory bounded by a chunk per ingredient.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from dataclasses import dataclass, field

from .checkpoint import Checkpoint, read_checkpoint
from .configs import config_differences, config_problems, load_config
from .plan import find_incompatibilities
from .safetensors_io import is_floating, itemsize, torch_dtype
from .source_factory import open_sources
from .sources import IngredientSource

DISTANCE_CHUNK_ELEMENTS = 1024 * 1024


@dataclass
class IngredientSummary:
    label: str
    revision: str | None
    tensors: int
    parameters: int
    bytes: int
    dtypes: dict[str, int]
    architectures: list[str] | None
    shards: int


@dataclass
class InspectReport:
    """What `warm-hub inspect` found.

    Attributes:
        ingredients: one summary per source.
        problems: reasons the sources cannot be merged (empty when they can).
        config_differences: config keys that differ (key -> value per ingredient).
        distances: when asked, pairwise L2 distances between the ingredients' floating weights.
        distance_to_mean: when asked, each ingredient's L2 distance to the uniform average.
        mean_norm: when asked, the L2 norm of the uniform average (to read distances relative to it).
    """

    ingredients: list[IngredientSummary]
    problems: list[str]
    config_differences: dict[str, list[object]] = field(default_factory=dict)
    distances: list[list[float]] | None = None
    distance_to_mean: list[float] | None = None
    mean_norm: float | None = None

    @property
    def mergeable(self) -> bool:
        return not self.problems


def summarize(checkpoint: Checkpoint, config: dict | None) -> IngredientSummary:
    return IngredientSummary(
        label=checkpoint.label,
        revision=checkpoint.source.revision,
        tensors=len(checkpoint.tensors),
        parameters=sum(t.numel for t in checkpoint.tensors.values()),
        bytes=checkpoint.total_bytes,
        dtypes=dict(Counter(t.dtype for t in checkpoint.tensors.values())),
        architectures=(config or {}).get("architectures"),
        shards=len(checkpoint.shards),
    )


def inspect_ingredients(
    sources: list[str | os.PathLike | IngredientSource],
    *,
    distances: bool = False,
    token: str | bool | None = None,
    tqdm_class=None,
) -> InspectReport:
    """Check whether `sources` can be merged and, with `distances`, measure how far apart their weights are.

    Args:
        sources: local folders/files or Hub repo ids, as for `merge`.
        distances: also stream every floating tensor to compute pairwise L2 distances.
        token: Hub token for Hub sources.
        tqdm_class: progress bar class for the distance pass.

    Returns:
        An `InspectReport`; `report.mergeable` says whether a merge would be accepted.

    Raises:
        WarmHubError: a source is missing or malformed (before any comparison can be made).
    """
    with contextlib.ExitStack() as stack:
        opened = open_sources(sources, stack, token=token)
        checkpoints = [read_checkpoint(s) for s in opened]
        configs = [load_config(s) for s in opened]
        labels = [c.label for c in checkpoints]
        problems = find_incompatibilities(checkpoints) + config_problems(labels, configs)
        report = InspectReport(
            ingredients=[summarize(c, cfg) for c, cfg in zip(checkpoints, configs, strict=True)],
            problems=problems,
            config_differences=config_differences(labels, configs),
        )
        if distances and not problems:
            _measure_distances(report, checkpoints, tqdm_class)
    return report


def _measure_distances(report: InspectReport, checkpoints: list[Checkpoint], tqdm_class) -> None:
    import torch

    if tqdm_class is None:
        from huggingface_hub.utils import tqdm as tqdm_class
    n = len(checkpoints)
    names = [name for name, t in checkpoints[0].tensors.items() if is_floating(t.dtype)]
    total = sum(checkpoints[0].tensors[name].numel for name in names)
    gram = torch.zeros(n, n, dtype=torch.float64)
    mean_sq = 0.0
    buffers = [torch.empty(DISTANCE_CHUNK_ELEMENTS * 8, dtype=torch.uint8) for _ in range(n)]
    with tqdm_class(total=total, unit="param", unit_scale=True, desc="Measuring distances") as bar:
        for name in names:
            infos = [c.tensors[name] for c in checkpoints]
            numel = infos[0].numel
            for start in range(0, numel, DISTANCE_CHUNK_ELEMENTS):
                count = min(DISTANCE_CHUNK_ELEMENTS, numel - start)
                rows = []
                for checkpoint, info, buffer in zip(checkpoints, infos, buffers, strict=True):
                    size = itemsize(info.dtype)
                    raw = buffer[: count * size]
                    checkpoint.source.read_into(info.file, info.start + start * size, memoryview(raw.numpy()))
                    rows.append(raw.view(torch_dtype(info.dtype)).to(torch.float64))
                x = torch.stack(rows)
                mean = x.mean(dim=0)
                # Deviations from the mean are small next to the weights: their Gram matrix gives distances
                # without the cancellation of |a|^2 + |b|^2 - 2ab on the raw weights.
                deviations = x - mean
                gram += deviations @ deviations.T
                mean_sq += float(mean.dot(mean))
                bar.update(count)
    diag = gram.diagonal()
    squared = (diag[:, None] + diag[None, :] - 2 * gram).clamp_min(0)
    report.distances = squared.sqrt().tolist()
    report.distance_to_mean = diag.clamp_min(0).sqrt().tolist()
    report.mean_norm = math.sqrt(mean_sq)

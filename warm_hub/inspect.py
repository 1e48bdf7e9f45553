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

from .adapters import Adapter, is_adapter_source, load_tensor, read_adapter
from .checkpoint import Checkpoint, read_checkpoint, read_header
from .compatibility import check_compatibility, parse_allowed_mismatches
from .configs import load_config
from .constants import ADAPTER_WEIGHTS
from .errors import IncompatibleCheckpointsError, InvalidOptionError, SourceNotFoundError
from .plan import find_incompatibilities, natural_key
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
    adapter: AdapterSummary | None = None


@dataclass
class AdapterSummary:
    """A LoRA adapter ingredient: its base, ranks, target modules and saved modules."""

    base: str | None
    ranks: list[int]
    targets: list[str]
    modules: int
    saved_modules: list[str]


@dataclass
class InspectReport:
    """What `warm-hub inspect` found.

    Attributes:
        ingredients: one summary per source.
        problems: reasons `merge` would refuse the sources (empty when it would merge them).
        allowed: model-defining differences `merge` would accept with the same `allow_config_mismatch`.
        config_differences: diversity config keys that differ (key -> value per ingredient).
        distances: when asked, pairwise L2 distances between the ingredients' floating weights (between the
            adapted models when the ingredients are LoRA adapters).
        distance_to_mean: when asked, each ingredient's L2 distance to the uniform average.
        mean_norm: when asked, the L2 norm of the uniform average (to read distances relative to it); None for
            adapters, whose distances need no pass over the base.
    """

    ingredients: list[IngredientSummary]
    problems: list[str]
    allowed: list[str] = field(default_factory=list)
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
    allow_config_mismatch: str | list[str] | None = None,
    token: str | bool | None = None,
    tqdm_class=None,
    base: str | None = None,
) -> InspectReport:
    """Check whether `sources` can be merged and, with `distances`, measure how far apart their weights are.

    Args:
        sources: local folders/files or Hub repo ids, as for `merge`.
        distances: also stream every floating tensor to compute pairwise L2 distances.
        allow_config_mismatch: as for `merge`: the verdict is the one `merge` would give with it.
        token: Hub token for Hub sources.
        tqdm_class: progress bar class for the distance pass.
        base: the base of LoRA adapter sources (default: the one their configs name).

    Returns:
        An `InspectReport`; `report.mergeable` says whether a merge would be accepted.

    Raises:
        WarmHubError: a source is missing or malformed (before any comparison can be made).
    """
    with contextlib.ExitStack() as stack:
        opened = open_sources(sources, stack, token=token)
        if any(is_adapter_source(s) for s in opened):
            return _inspect_adapted(opened, stack, base=base, distances=distances, token=token)
        checkpoints = [read_checkpoint(s) for s in opened]
        configs = [load_config(s) for s in opened]
        verdict = check_compatibility(
            checkpoints, configs, allow_mismatch=parse_allowed_mismatches(allow_config_mismatch)
        )
        report = InspectReport(
            ingredients=[summarize(c, cfg) for c, cfg in zip(checkpoints, configs, strict=True)],
            problems=verdict.problems,
            allowed=verdict.allowed,
            config_differences=verdict.differences,
        )
        if distances and not find_incompatibilities(checkpoints):
            _measure_distances(report, checkpoints, tqdm_class)
    return report


def _inspect_adapted(opened, stack, *, base: str | None, distances: bool, token) -> InspectReport:
    """Adapters (and full checkpoints of their base): summaries, whether they merge, distances of their deltas."""
    from .lora_merge import prepare_adapted_merge

    summaries = []
    for source in opened:
        if is_adapter_source(source):
            adapter = read_adapter(source)
            header = read_header(source, ADAPTER_WEIGHTS)
            summary = summarize(Checkpoint(source, [header], {t.name: t for t in header.tensors}), None)
            summary.adapter = AdapterSummary(
                base=adapter.base,
                ranks=adapter.ranks,
                targets=adapter.targets,
                modules=len(adapter.modules),
                saved_modules=sorted({name.rsplit(".", 1)[0] for name in adapter.saved}),
            )
            summaries.append(summary)
        else:
            summaries.append(summarize(read_checkpoint(source), load_config(source)))
    report = InspectReport(ingredients=summaries, problems=[])
    try:
        adapted = prepare_adapted_merge(opened, stack, base=base, token=token)
    except (IncompatibleCheckpointsError, InvalidOptionError, SourceNotFoundError) as exc:
        report.problems.append(str(exc).removeprefix("cannot merge: "))
        return report
    if distances and len(adapted.adapters) == len(adapted.ingredients):
        import torch

        pairwise = torch.tensor(adapted_distances(adapted.adapters, adapted.base), dtype=torch.float64)
        squared, n = pairwise.square(), len(pairwise)
        # |x_i - mean|^2 from pairwise distances alone: mean_j d_ij^2 - (1 / 2n^2) sum_jk d_jk^2.
        to_mean = squared.mean(dim=1) - squared.sum() / (2 * n * n)
        report.distances = pairwise.tolist()
        report.distance_to_mean = to_mean.clamp_min(0).sqrt().tolist()
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


def adapted_distances(adapters: list[Adapter], base: Checkpoint | None) -> list[list[float]]:
    """Pairwise L2 distances between the adapted models, over every tensor an adapter changes.

    Low-rank parts need no product: <s_i B_i A_i, s_j B_j A_j> = s_i s_j trace((B_i^T B_j)(A_j A_i^T)).
    Saved modules are compared whole, one tensor at a time; the base is read only for a saved module that some
    adapter does not save.

    Args:
        adapters: the adapters, all of one base.
        base: the base checkpoint, or None when every adapter saves the same modules.

    Returns:
        An M x M matrix of distances.

    Raises:
        IncompatibleCheckpointsError: the base is needed (adapters save different modules) but not given.
    """
    import torch

    n = len(adapters)
    squared = torch.zeros(n, n, dtype=torch.float64)
    saved = {name for a in adapters for name in a.saved}
    for name in sorted({m for a in adapters for m in a.modules} - saved, key=natural_key):
        factors = []
        for a in adapters:
            module = a.modules.get(name)
            if module is not None:
                a_factor, b_factor = load_tensor(a.source, module.a), load_tensor(a.source, module.b)
                factors.append((a_factor.double(), b_factor.double() * module.scale))
            else:
                factors.append(None)
        gram = torch.zeros(n, n, dtype=torch.float64)
        for i, fi in enumerate(factors):
            for j, fj in enumerate(factors[: i + 1]):
                if fi is not None and fj is not None:
                    gram[i, j] = gram[j, i] = torch.trace((fi[1].T @ fj[1]) @ (fj[0] @ fi[0].T))
        diag = gram.diagonal()
        squared += diag[:, None] + diag[None, :] - 2 * gram
    for name in sorted(saved, key=natural_key):
        values = []
        for a in adapters:
            if name in a.saved:
                values.append(load_tensor(a.source, a.saved[name]).double())
                continue
            if base is None or name not in base.tensors:
                raise IncompatibleCheckpointsError(f"{a.label} does not save {name!r}: its base is needed to compare")
            value = load_tensor(base.source, base.tensors[name]).double()
            module = a.modules.get(name)
            if module is not None:
                b_factor, a_factor = load_tensor(a.source, module.b), load_tensor(a.source, module.a)
                delta = module.scale * (b_factor.double() @ a_factor.double())
                value = value + (delta.T if module.fan_in_fan_out else delta)
            values.append(value)
        flat = torch.stack([v.reshape(-1) for v in values])
        squared += torch.cdist(flat, flat).square()
    return squared.clamp_min(0).sqrt().tolist()

"""`warm_recipe.yaml`: exactly what a merge was made of, written beside its output.

The recipe names each ingredient (repo id and commit sha, or a local folder name: never an absolute path), its
weight, the output dtype, the tool version and the sha256 of every output shard. It holds no timestamps, so the
same inputs give the same bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import IncompleteOutputError

RECIPE_NAME = "warm_recipe.yaml"


@dataclass
class Ingredient:
    source: str = field(metadata={"help": "Hub repo id, or the local folder's name for local ingredients"})
    weight: float = field(metadata={"help": "normalised weight of this ingredient in the average"})
    revision: str | None = field(default=None, metadata={"help": "commit sha the ingredient was read at"})
    local: bool = field(default=False, metadata={"help": "whether the ingredient was a local folder"})


@dataclass
class WarmRecipe:
    ingredients: list[Ingredient]
    dtype: str = field(metadata={"help": "output dtype of floating tensors, or 'auto' (kept per tensor)"})
    shards: dict[str, str] = field(metadata={"help": "output shard file name -> sha256 of its bytes"})
    total_size: int = field(metadata={"help": "bytes of tensor data in the output"})
    method: str = field(default="linear", metadata={"help": "weight averaging (WARM); fp32 accumulation"})
    tool: str = field(default="warm-hub", metadata={"help": "what made the merge"})
    tool_version: str = field(default="", metadata={"help": "version of warm-hub"})

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(asdict(self), sort_keys=False, allow_unicode=True)

    def save(self, folder: Path) -> Path:
        path = folder / RECIPE_NAME
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: Path) -> WarmRecipe:
        """Read the recipe of a merge output folder.

        Raises:
            IncompleteOutputError: the folder has no readable recipe (it is not a warm-hub merge output).
        """
        import yaml

        path = Path(folder) / RECIPE_NAME
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
            ingredients = [Ingredient(**i) for i in data.pop("ingredients")]
            return cls(ingredients=ingredients, **data)
        except FileNotFoundError:
            raise IncompleteOutputError(f"{folder}: no {RECIPE_NAME}; not a warm-hub merge output") from None
        except (yaml.YAMLError, TypeError, KeyError, AttributeError) as exc:
            raise IncompleteOutputError(f"{folder}: {RECIPE_NAME} is malformed ({exc})") from None

"""`warm_hub.constants` is the one home of the `WARM_HUB_*` variables, and the README documents each of them."""

from __future__ import annotations

import re
from pathlib import Path

from warm_hub import constants

ROOT = Path(__file__).resolve().parents[1]
VARIABLE = re.compile(r"[\"']WARM_HUB_[A-Z_]+[\"']")


def test_every_variable_is_named_in_constants_only_and_documented():
    named = {value for name, value in vars(constants).items() if name.endswith("_ENV")}
    assert named and all(value.startswith("WARM_HUB_") for value in named)
    # A quoted "WARM_HUB_..." anywhere else in the package is a second home (docs and messages use the constant).
    for folder in ("warm_hub", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name != "constants.py":
                assert not VARIABLE.search(path.read_text(encoding="utf-8")), path
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for value in named:
        assert re.search(rf"^\| `{value}[=`]", readme, re.MULTILINE), f"{value} missing from the README's table"

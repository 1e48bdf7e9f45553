"""Shared fixtures: an isolated Hugging Face cache per test, and tiny member checkpoints built at run time."""

from __future__ import annotations

import os
import sys

import pytest

from warm_hub.testing.hub_server import reserve_endpoint

# huggingface_hub reads HF_ENDPOINT once, at import: start the loopback Hub and point it there before any import.
reserve_endpoint()

import torch  # noqa: E402

# Triton reads TRITON_INTERPRET when a kernel is decorated: without a GPU, kernels run on the CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Progress bars in test logs are noise; tests that check them set the variable themselves.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def isolated_hf_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return home


@pytest.fixture
def run_cli(capfd):
    """Run `warm-hub ARGS...` in-process; return (exit code, stdout, stderr)."""
    from warm_hub.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capfd.readouterr()
        try:
            main(list(map(str, args)))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capfd.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


from warm_hub.testing.hub_server import hub_server  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # The marker itself, not `item.keywords`: keywords also hold folder names (a checkout under `gpu/`).
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)

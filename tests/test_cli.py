"""The command line: lazy start-up, help, version, and the merge path staying free of transformers."""

from __future__ import annotations

import subprocess

import pytest

from warm_hub.cli import COMMANDS


def test_help_lists_every_command_without_importing_torch(python):
    code = (
        "import sys\n"
        "from warm_hub.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported by --help'\n"
    )
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in COMMANDS:
        assert name in proc.stdout


def test_local_merge_path_imports_nothing_heavy(tmp_path, python):
    """A local merge needs neither transformers/triton nor huggingface_hub's API client (its import is slow)."""
    from warm_hub.testing.checkpoints import make_members

    members = make_members(tmp_path, count=2)
    code = (
        "import sys\n"
        "import warm_hub\n"
        f"warm_hub.merge({[str(m) for m in members]!r}, {str(tmp_path / 'out')!r})\n"
        "heavy = ('transformers', 'triton', 'datasets', 'accelerate', 'huggingface_hub.hf_api',"
        " 'huggingface_hub.repocard', 'filelock')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(run_cli, name):
    code, out, err = run_cli(name, "--help")
    assert code == 0, err
    assert "Usage: warm-hub " + name in out


def test_version(run_cli):
    import warm_hub

    code, out, _ = run_cli("--version")
    assert code == 0 and warm_hub.__version__ in out


def test_unknown_command_is_a_usage_error(run_cli):
    code, _, err = run_cli("frobnicate")
    assert code == 2 and "No such command" in err


def test_merge_stays_the_function_after_the_cli_imports_it(run_cli):
    import warm_hub
    import warm_hub.cli.merge  # noqa: F401
    import warm_hub.merging  # noqa: F401

    assert callable(warm_hub.merge) and warm_hub.merge.__name__ == "merge"


@pytest.mark.parametrize(
    ("argv", "code", "stream", "text"),
    [
        (["--version"], 0, "stdout", "version"),
        (["merge", "no-such-folder-here", "--out", "x"], 1, "stderr", "Error: no-such-folder-here: no such file"),
        (["merge"], 2, "stderr", "Missing argument"),
    ],
)
def test_console_script_exit_keeps_output_codes_and_atexit(python, argv, code, stream, text):
    """The console script leaves without Python's final collection, but still flushes and runs atexit handlers."""
    script = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        "from warm_hub.cli import console_main\n"
        f"sys.argv = ['warm-hub', *{argv!r}]\n"
        "console_main()\n"
    )
    proc = subprocess.run([python, "-c", script], capture_output=True, text=True)
    assert proc.returncode == code, proc.stderr
    assert text in getattr(proc, stream)
    assert proc.stdout.rstrip().endswith("atexit ran")


def test_finetune_options_take_default_and_help_from_the_config():
    """Every `finetune` option shows and uses the `FinetuneConfig` field's default and help, not a copy."""
    import dataclasses

    from warm_hub.cli.finetune import finetune_command
    from warm_hub.finetune.config import FinetuneConfig

    fields = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    options = [p for p in finetune_command.params if p.name in fields]
    assert {p.name for p in options} == set(fields)
    for param in options:
        spec = fields[param.name]
        assert param.help.startswith(spec.metadata["help"]), param.name
        if param.multiple:
            continue
        expected = None if spec.default is dataclasses.MISSING else spec.default
        assert param.default == expected, param.name


def test_merge_dtype_choices_are_the_planners(tmp_path, run_cli):
    """`--dtype` offers what `plan.DTYPE_CHOICES` accepts, float64 included, and float64 writes F64 tensors."""
    from safetensors import safe_open

    from warm_hub.cli.merge import merge_command
    from warm_hub.plan import DTYPE_CHOICES
    from warm_hub.testing.checkpoints import make_members

    (dtype,) = [p for p in merge_command.params if p.name == "dtype"]
    assert list(dtype.type.choices) == list(DTYPE_CHOICES)
    members = make_members(tmp_path, count=2)
    code, _, err = run_cli("merge", *members, "--out", tmp_path / "out", "--dtype", "float64")
    assert code == 0, err
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F64"}


def test_plot_is_refused_up_front_without_matplotlib(tmp_path, run_cli, monkeypatch):
    """Both commands that take `--plot` say what to install, in one line, before sampling or scoring anything."""
    import sys

    from warm_hub.testing.cli_output import error_line

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    code, _, err = run_cli(
        "best-of-n", tmp_path / "rm", "--policy", tmp_path / "lm", "--prompts", tmp_path / "p.jsonl",
        "--gold", tmp_path / "gold", "--plot", tmp_path / "bon.png",
    )  # fmt: skip
    assert code == 1 and "--plot needs matplotlib: pip install 'warm-hub[plot]'" in error_line(err, alone=True)
    assert not (tmp_path / "bon.png").exists()

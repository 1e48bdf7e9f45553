"""The `warm-hub` command line: a click group whose subcommands load lazily, so `merge` never imports
transformers and `--help` is instant. Every `WarmHubError` or Hub error becomes one line on stderr.
"""

from __future__ import annotations

import atexit
import importlib
import os
import sys
import threading

import click

from ..constants import DEBUG_ENV

# name -> "module:attribute" of the click command, imported only when the command runs.
COMMANDS = {
    "merge": "warm_hub.cli.merge:merge_command",
    "inspect": "warm_hub.cli.inspect:inspect_command",
    "push": "warm_hub.cli.hub:push_command",
    "card": "warm_hub.cli.hub:card_command",
    "finetune": "warm_hub.cli.finetune:finetune_command",
    "evaluate": "warm_hub.cli.evaluate:evaluate_command",
    "demo": "warm_hub.cli.demo:demo_command",
    "best-of-n": "warm_hub.cli.best_of_n:best_of_n_command",
}
HELP = {
    "merge": "Average N reward models into one WARM checkpoint (streaming, bounded memory).",
    "inspect": "Check that ingredients can be merged; --distances measures how far apart they are.",
    "push": "Push a merge output folder to the Hub in one atomic commit.",
    "card": "Write or refresh the model card (README.md) of a merge output folder.",
    "finetune": "Fine-tune M diverse reward models (Bradley-Terry) from a shared init.",
    "evaluate": "Pairwise accuracy of members, their prediction ensemble and WARM.",
    "demo": "The whole pipeline offline on a tiny model: fine-tune, merge, evaluate, card.",
    "best-of-n": "Gold reward of each proxy's best-of-n pick against KL: the overoptimization curve.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attribute = target.split(":")
        return getattr(importlib.import_module(module), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing help must not import every command (and with them torch and transformers).
        with formatter.section("Commands"):
            formatter.write_dl([(name, HELP[name]) for name in COMMANDS])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="warm-hub")
def cli() -> None:
    """warm-hub: build, merge and publish WARM reward models (Ramé et al., ICML 2024)."""


def _is_expected(exc: BaseException) -> bool:
    from warm_hub.errors import WarmHubError

    if isinstance(exc, WarmHubError | OSError):
        return True
    module = type(exc).__module__ or ""
    return module.startswith(("huggingface_hub", "httpx"))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0]
    # huggingface_hub errors put the useful sentence first and request ids after it.
    return first if len(first) <= 2000 else first[:2000] + "..."


def _log_to_stderr() -> None:
    """Library warnings and notes (`warm_hub.*` loggers) reach the user as plain lines on stderr."""
    import logging

    class StderrHandler(logging.StreamHandler):
        # Looks sys.stderr up at each write: it may have been replaced since (pytest's capture, a caller).
        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:
            pass

    logger = logging.getLogger("warm_hub")
    if not any(type(h).__name__ == "StderrHandler" for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `warm-hub` console script."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    _log_to_stderr()
    try:
        cli.main(args=argv, prog_name="warm-hub", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        if _is_expected(exc):
            click.echo(f"Error: {_one_line(exc)}", err=True)
        else:
            click.echo(
                f"Internal error: {type(exc).__name__}: {_one_line(exc)} (WARM_HUB_DEBUG=1 shows the traceback;"
                " please report it)",
                err=True,
            )
        sys.exit(1)


def console_main() -> None:
    """The `warm-hub` console script: `main`, then a quick exit.

    Python's own exit ends with a garbage collection of every object, which takes 0.6-0.8 s once torch is
    imported; a command has closed everything it wrote by the time it returns, so the process runs the atexit
    handlers (temporary folders, logging), flushes its streams and leaves. With other non-daemon threads still
    alive it exits the usual way, so that they can finish.
    """
    try:
        main()
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    run_exit_functions = getattr(atexit, "_run_exitfuncs", None)  # CPython's; elsewhere exit the usual way
    if others or run_exit_functions is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        sys.exit(code)
    try:
        run_exit_functions()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    console_main()

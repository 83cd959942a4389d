"""The ``poisonlab`` command: a typer app to which each module of :mod:`poisonlab.commands` adds its sub-command.

Nothing heavy is imported here or at the top of the command modules (torch, scikit-learn and
matplotlib are imported inside the commands that use them), so ``poisonlab --help`` answers at once.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

import poisonlab.commands as _commands

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Training-data poisoning of image classifiers: attack, train, defend, measure.")


def register_commands(target: typer.Typer) -> None:
    """Each public module in ``poisonlab.commands`` adds its command(s) with ``register(app)``."""
    for info in pkgutil.iter_modules(_commands.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{_commands.__name__}.{info.name}").register(target)


register_commands(app)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Warnings as one ``warning: ...`` line on stderr, not Python's ``file.py:NN: UserWarning`` form."""
    import sys

    print(f"warning: {message}", file=sys.stderr)


def main() -> None:
    import warnings

    from poisonlab.errors import PoisonlabError

    warnings.showwarning = _show_warning
    try:
        app()
    except PoisonlabError as e:  # pragma: no cover - safety net for a command without its own handler
        _commands.fail(e)


if __name__ == "__main__":
    main()

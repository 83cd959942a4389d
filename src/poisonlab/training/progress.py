"""Progress of long loops (training epochs, a defence's optimisation steps): a live bar on a terminal,
plain lines on stderr elsewhere (the log file of a run left in the background, where rich draws nothing
and hours of work would otherwise pass in silence)."""

from __future__ import annotations

import math
import sys
import time
from typing import Any


def progress_counter(enabled: bool, description: str, total: int, unit: str = "epoch",
                     done: int = 0) -> Progress:
    """A counter of ``total`` ``unit``\\ s, ``done`` of them already (a resumed run), to ``advance()`` and
    ``stop()``, or to use as a context manager that stops it; one that shows nothing when not ``enabled``.

    Off a terminal: one line per epoch, or about ten lines in all for any other unit (a line per mask
    step of a 2,000-step defence would bury the log).
    """
    if not enabled:
        return Progress()
    from rich.console import Console

    console = Console()
    if console.is_terminal:
        return ProgressBar(console, description, total, unit, done)
    return ProgressLines(description, total, unit, every=1 if unit == "epoch" else max(1, math.ceil(total / 10)),
                         done=done)


class Progress:
    """A progress counter that shows nothing (progress off); the base of the ones that do."""

    def advance(self, info: str = "") -> None:
        pass

    def stop(self) -> None:
        pass

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class ProgressBar(Progress):
    """A transient rich bar: description, bar, done/total, elapsed time and the latest ``info``."""

    def __init__(self, console: Any, description: str, total: int, unit: str = "epoch", done: int = 0):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit + "s"),
                            TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console, transient=True)
        self.task = self.bar.add_task(description, total=total, completed=done, info="")
        self.bar.start()

    def advance(self, info: str = "") -> None:
        self.bar.update(self.task, advance=1, info=info)

    def stop(self) -> None:
        self.bar.stop()


class ProgressLines(Progress):
    """``description: unit done/total info`` on stderr every ``every`` units and at the last one."""

    def __init__(self, description: str, total: int, unit: str = "epoch", every: int = 1, done: int = 0):
        self.description, self.total, self.unit, self.every = description or "training", total, unit, every
        self.done, self.t0 = done, time.perf_counter()

    def advance(self, info: str = "") -> None:
        self.done += 1
        if self.done % self.every and self.done != self.total:
            return
        if not info and self.unit != "epoch":
            info = f"({time.perf_counter() - self.t0:.0f}s)"
        print(f"{self.description}: {self.unit} {self.done}/{self.total} {info}".rstrip(), file=sys.stderr, flush=True)

"""Progress bars for long library calls (prediction, evaluation, conversion, dataset checks).

    with progress(show, "evaluating", total) as advance:
        for batch in batches:
            ...
            advance()          # or advance(n)

`show=False` gives a no-op `advance`, so library code calls it unconditionally. The bar is
rich's, transient (it disappears when done) and drawn on standard error, so a command's
printed results on standard output stay clean for pipes. Work made of a few long steps of
unknown length (load, write, verify) shows a spinner naming the current one instead:

    with stages(show, "converting m.keras") as stage:
        stage("loading"); ...; stage("verifying"); ...
"""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class progress:  # noqa: N801  (used as a context manager, like open)
    """A transient progress bar or nothing; `with progress(on, text, total) as advance:`."""

    def __init__(self, on, description, total=None):
        self.on, self.description, self.total = on, description, total
        self.bar = None

    def __enter__(self):
        if not self.on:
            return lambda n=1: None
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), transient=True, console=Console(stderr=True))
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda n=1: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


@contextlib.contextmanager
def stages(on, title):
    """A transient spinner `title: <stage>` on standard error, or nothing; yields `stage(text)`."""
    if not on:
        yield lambda text: None
        return
    with Console(stderr=True).status(title) as status:
        yield lambda text: status.update(f"{title}: {text}")


class transfer(progress):  # noqa: N801
    """A transient bar counting bytes (size, speed, time left) for downloads; `advance(n_bytes)`.
    total None (no Content-Length) gives a bar of unknown length."""

    def __enter__(self):
        if not self.on:
            return lambda n=1: None
        from rich.progress import DownloadColumn, TransferSpeedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), transient=True, console=Console(stderr=True))
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda n=1: self.bar.advance(task, n)

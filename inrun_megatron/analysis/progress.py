"""Progress of long work: a rich progress bar on a terminal, silence elsewhere (scripts, MPI ranks > 0)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Progress:
    """Hands out counters for long loops; library code calls it, only the CLI turns it on."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled and sys.stderr.isatty()

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """Yield ``advance(n)``; shows a bar over ``total`` units while the block runs."""
        if not self.enabled:
            yield lambda n: None
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        columns = (*Bar.get_default_columns()[:1], BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Bar(*columns, TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)


SILENT = Progress(False)

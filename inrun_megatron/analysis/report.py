"""What a command returns and writes: rich tables for people, JSON for scripts, files written atomically."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from inrun_megatron.analysis.dump import DumpError


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]


@dataclass
class Report:
    """``data`` is the whole answer (the ``--json`` output); ``tables`` and ``notes`` show it to people."""

    data: dict[str, Any]
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: False makes the command exit with status 1 (``verify`` found problems).
    ok: bool = True


def plain(obj: Any) -> Any:
    """``obj`` with NaN/inf as None and numpy scalars as Python numbers, so that it is valid JSON."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def render(report: Report, as_json: bool, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if as_json:
        json.dump(plain({**report.data, "notes": list(dict.fromkeys(report.notes))}), out, indent=2)
        out.write("\n")
        return
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console(file=out)
    if not console.is_terminal:
        console = Console(file=out, width=140)  # logs and pipes: no wrapping of wide tables
    for table in report.tables:
        rich = RichTable(title=table.title, title_justify="left", show_lines=False)
        for column in table.columns:
            rich.add_column(column, overflow="fold")
        for row in table.rows:
            rich.add_row(*(_cell(v) for v in row))
        console.print(rich)
    sign = [f"sign: {report.data['sign']}"] if "sign" in report.data else []
    for note in dict.fromkeys(sign + report.notes):
        console.print(f"[dim]note:[/dim] {note}", highlight=False)


def _cell(value: Any) -> str:
    value = plain(value)
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value[:8]) + (" ..." if len(value) > 8 else "")
    return str(value)


@contextmanager
def written(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write to; it becomes ``path`` only if the block succeeds.

    A file replaces an existing file atomically; a directory must not exist yet.
    """
    path = Path(path)
    if path.is_dir():
        raise DumpError(f"{path}: already exists; choose a new output path (nothing was written)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()

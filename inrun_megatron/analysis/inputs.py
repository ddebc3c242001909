"""What a command is pointed at: a score dump or a merged directory, and the run's sample index.

Commands that need accumulated values accept either; a dump is merged on the fly into a
temporary directory (removed afterwards), so that ``inrun-scores top RUN`` works on a fresh run
and ``inrun-scores merge RUN -o OUT`` once makes later commands on ``OUT`` fast.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from inrun_megatron.analysis.dump import DumpError, ScoreDump, read_table
from inrun_megatron.analysis.merge import DEFAULT_MEMORY, merge
from inrun_megatron.analysis.progress import SILENT, Progress
from inrun_megatron.analysis.values import VALUES_FORMAT, MergedValues
from inrun_megatron.analysis.views import DEFAULT_VIEW, ROW_FIELDS, check_view, write_view
from inrun_megatron.optimizer_values import ADAM, ADAM_ROW_SUFFIX, ROW_SUFFIXES, SGD, split_row_name
from inrun_megatron.records import MANIFEST, Manifest

ROW_COLUMNS = ["sample_id", "step", "value", "raw", "skipped"]

NO_DATA = (
    "the run records no data section (scores written through the API, not by the pretraining entry point):"
    " sources, documents and text are not available"
)


_UNOPENED = object()


class Scores:
    """A command's input; use as a context manager so that temporary merges are removed."""

    def __init__(
        self,
        path: str | Path,
        *,
        memory_bytes: int = DEFAULT_MEMORY,
        work_dir: str | Path | None = None,
        progress: Progress = SILENT,
    ):
        self.path = Path(path)
        self.memory_bytes = memory_bytes
        self.work_dir = work_dir
        self.progress = progress
        self.notes: list[str] = []
        self.dump: ScoreDump | None = None
        self.merged: MergedValues | None = None
        self._temporary: Path | None = None
        self._index = _UNOPENED
        self._views: dict[tuple[str, str], MergedValues] = {}
        if _format_of(self.path) == VALUES_FORMAT:
            self.merged = MergedValues.open(self.path)
        else:
            self.dump = ScoreDump.open(self.path)

    def __enter__(self) -> Scores:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None

    @property
    def manifest(self) -> Manifest:
        """The score dump's manifest (for a merged directory, the one it was merged from)."""
        return self.dump.manifest if self.dump is not None else self.merged.source_manifest

    @property
    def run_dir(self) -> Path:
        return self.dump.root if self.dump is not None else self.merged.source_dir

    def values(self) -> MergedValues:
        """Accumulated values; a dump is merged into a temporary directory first."""
        if self.merged is None:
            self._temporary = Path(tempfile.mkdtemp(prefix="inrun-scores-", dir=self.work_dir))
            out = self._temporary / "merged"
            merge(self.dump, out, memory_bytes=self.memory_bytes, progress=self.progress, work_dir=self._temporary)
            self.merged = MergedValues.open(out)
            self.notes.append(
                f"merged {self.dump.num_rows} score rows on the fly; `inrun-scores merge {self.path} -o OUT` once"
                " and point commands at OUT to skip this"
            )
        return self.merged

    def view(self, name: str, target: str | None = None) -> MergedValues:
        """Values of one target in the view ``name`` (docs/DESIGN.md §1.6), in the merged format.

        ``accumulated`` is :meth:`values` itself; the step views are computed from the per-step
        rows into a temporary directory, once per view and target.
        """
        check_view(name)
        values = self.values()
        if name == DEFAULT_VIEW:
            return values
        target = values.target(target)
        if (name, target) not in self._views:
            if self._temporary is None:
                self._temporary = Path(tempfile.mkdtemp(prefix="inrun-scores-", dir=self.work_dir))
            out = self._temporary / f"view-{name}-{len(self._views)}"
            rows = self.rows(target, columns=ROW_FIELDS)
            self._views[name, target] = write_view(
                values, rows, name, target, out, memory_bytes=self.memory_bytes, progress=self.progress
            )
        return self._views[name, target]

    def rows(
        self, target: str | None = None, sample_ids: np.ndarray | None = None, columns: Sequence[str] = ROW_COLUMNS
    ) -> Iterator[pa.Table]:
        """Per-step rows (``columns`` plus ``target``) of one target or all, optionally of some samples.

        From a merged directory's ``per_step`` parts when it has them, else from the dump.
        """
        columns = ["target", *columns]
        if self.merged is not None and self.merged.has_per_step:
            filters = [("sample_id", "in", sample_ids.tolist())] if sample_ids is not None else None
            for path in self.merged.parts("per_step"):
                table = read_table(path, columns, filters)
                yield from _select(table, target, None)
            return
        dump = self.dump if self.dump is not None else self._source_dump()
        with self.progress.task("reading score rows", dump.num_rows) as advance:
            for _, batch in dump.batches(columns):
                advance(batch.num_rows)
                yield from _select(pa.Table.from_batches([batch]), target, sample_ids)

    def _source_dump(self) -> ScoreDump:
        source = self.merged.source_dir
        if not (source / MANIFEST).exists():
            raise DumpError(
                f"{self.path}: merged without --per-step and its dump {source} is gone; per-step rows need either"
                " the dump or a merge with --per-step"
            )
        dump = ScoreDump.open(source)
        if dump.run_id != self.merged.run_id:
            raise DumpError(f"{source}: holds run {dump.run_id}, but {self.path} was merged from {self.merged.run_id}")
        return dump

    def score_rows(self) -> list[str]:
        """Names in the ``target`` column, in order: each target, then its Adam-aware rows if recorded."""
        if self.merged is not None:
            return self.merged.targets
        names = self.dump.steps_table().column("target").to_pylist()
        values = self.manifest.values
        names += list(values.rows) if values is not None else [t["name"] for t in self.manifest.targets]
        return sorted(set(names), key=names.index)

    def score_row(self, target: str | None, value: str | None) -> str | None:
        """The score row a command reads: ``target`` (default the first) with its ``value`` kind
        (``"adam"``, ``"sgd"`` or ``"second-order"``; default the Adam-aware value where the run
        recorded it, docs/DESIGN.md §1.5, §1.7). None when the run tells no targets and none was
        asked for."""
        named_kind = None if target is None else split_row_name(target)[1]
        if named_kind not in (None, SGD):  # a row named in full
            if value is not None and value != named_kind:
                raise DumpError(
                    f"--target {target!r} names a row of the {named_kind} value; drop --value {value} or the suffix"
                )
            return target
        rows = self.score_rows()
        base = target or next((r for r in rows if split_row_name(r)[1] == SGD), None)
        if base is None:
            return None
        if value is None:
            value = ADAM if f"{base}{ADAM_ROW_SUFFIX}" in rows else SGD
        row = base if value == SGD else f"{base}{ROW_SUFFIXES[value]}"
        if rows and row not in rows:
            raise DumpError(
                f"{self.path}: no {value} value of target {base!r} was recorded (the run holds {', '.join(rows)});"
                " Adam-aware values are recorded when the optimizer is Adam, second-order values with"
                " ScoringConfig(second_order=True)"
            )
        return row

    def index(self):
        """The run's sample index (``inrun_megatron.data``), or None with a note if it has no data section."""
        if self._index is _UNOPENED:
            self._index = None
            if not self.manifest.data:
                self.notes.append(NO_DATA)
            else:
                from inrun_megatron.data import open_sample_index

                if not (self.run_dir / MANIFEST).exists():
                    raise DumpError(
                        f"{self.path}: merged from {self.run_dir}, which is gone; sources, documents and text"
                        " are read through that run directory's data section"
                    )
                self._index = open_sample_index(self.run_dir)
        return self._index


def _format_of(path: Path) -> str | None:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None  # ScoreDump.open explains what is wrong


def _select(table: pa.Table, target: str | None, sample_ids: np.ndarray | None) -> Iterator[pa.Table]:
    if target is not None:
        table = table.filter(pc.equal(table.column("target"), target))
    if sample_ids is not None:
        table = table.filter(np.isin(table.column("sample_id").to_numpy(), sample_ids))
    if table.num_rows:
        yield table


def describe_samples(index, sample_ids: np.ndarray, text_chars: int) -> dict[int, dict]:
    """Source, documents and a text snippet of a few samples, by sample id."""
    rows = index.lookup(np.asarray(sample_ids, dtype=np.int64)).to_pylist()
    return {
        row["sample_id"]: {
            "source": row["source"],
            "document_ids": row["document_ids"],
            "text": index.text(row["sample_id"], max_chars=text_chars),
        }
        for row in rows
    }


def sources_of(index, sample_ids: np.ndarray) -> np.ndarray:
    """Source name of each sample id (in order)."""
    unique, inverse = np.unique(np.asarray(sample_ids, dtype=np.int64), return_inverse=True)
    names = index.lookup(unique).column("source").to_numpy(zero_copy_only=False)
    return names[inverse.reshape(-1)]

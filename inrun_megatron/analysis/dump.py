"""Open a score dump (the format of :mod:`inrun_megatron.records`) for analysis.

Opening reads the manifest and every part's Parquet footer only, and checks each part against
the manifest: its name, columns, schema version and run id. So shards of two runs or two
schema versions mixed in one directory, or a truncated part, are found before any work starts,
and the error names the file. Rows are then streamed part by part in a fixed order, and a part
that turns out to be unreadable in the middle is again reported by name.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from inrun_megatron.records import (
    META_RUN_ID,
    META_SCHEMA_VERSION,
    SCHEMA_VERSION,
    SCORE_SCHEMA,
    STEP_SCHEMA,
    Manifest,
    part_steps,
    read_manifest,
)

_REPLICA = re.compile(r"^dp\d{5,}$")

#: Rows per streamed record batch: large enough for vectorised work, small enough to bound memory.
BATCH_ROWS = 1 << 20


class DumpError(ValueError):
    """A score dump, or a directory derived from one, that cannot be analysed as it is."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file of a dump."""

    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class Part:
    """One Parquet part: ``stream`` is ``"dp00003"`` for score parts and ``"steps"`` for step parts."""

    path: Path
    stream: str
    first_step: int
    last_step: int
    num_rows: int


def open_part_metadata(path: Path) -> pq.FileMetaData:
    """A part's footer; a truncated or foreign file is a :class:`DumpError` naming it."""
    try:
        return pq.read_metadata(path)
    except (pa.ArrowException, OSError) as e:
        raise DumpError(
            f"{path}: corrupt or truncated Parquet file ({e}); restore it from a copy, or move it out of the"
            " directory (its steps then count as missing)"
        ) from e


def check_part_metadata(
    path: Path, meta: pq.FileMetaData, schema: pa.Schema, run_id: str, version: int = SCHEMA_VERSION
) -> None:
    """Raise :class:`DumpError` unless the part has ``schema`` and carries ``run_id`` and ``version``."""
    found = meta.schema.to_arrow_schema()
    if not found.remove_metadata().equals(schema):
        raise DumpError(
            f"{path}: its columns ({', '.join(f'{f.name}: {f.type}' for f in found)}) are not those of schema"
            f" version {version} ({', '.join(f'{f.name}: {f.type}' for f in schema)}); it was written by another"
            " inrun_megatron version or belongs to another kind of directory"
        )
    kv = found.metadata or {}
    found_version = kv.get(META_SCHEMA_VERSION, b"?").decode()
    if found_version != str(version):
        raise DumpError(
            f"{path}: written with schema version {found_version}, the manifest says {version}; parts of different"
            " schema versions are mixed in one directory, move this one to its own run directory"
        )
    found_run = kv.get(META_RUN_ID, b"").decode()
    if found_run != run_id:
        raise DumpError(
            f"{path}: belongs to run {found_run or '(none recorded)'}, the manifest is of run {run_id}; parts of"
            " two runs are mixed in one directory, move this one to its own run directory"
        )


class ScoreDump:
    """A validated score dump: its manifest and its score and step parts, in a fixed order."""

    def __init__(
        self, root: Path, manifest: Manifest, score_parts: list[Part], step_parts: list[Part], debris: list[Path]
    ):
        self.root = root
        self.manifest = manifest
        self.score_parts = score_parts
        self.step_parts = step_parts
        #: ``*.tmp`` files left by a crash: never data, listed so that ``verify`` can mention them.
        self.debris = debris

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

    @property
    def num_rows(self) -> int:
        return sum(p.num_rows for p in self.score_parts)

    @property
    def replicas(self) -> list[str]:
        return sorted({p.stream for p in self.score_parts})

    @classmethod
    def inspect(cls, root: str | Path) -> tuple[ScoreDump | None, list[Problem]]:
        """Every problem the footers show (for ``verify``); the dump is None if the manifest is unusable."""
        root = Path(root)
        try:
            manifest = read_manifest(root)
        except (OSError, ValueError) as e:
            return None, [Problem(root, str(e))]
        problems: list[Problem] = []
        debris: list[Path] = []
        score_parts: list[Part] = []
        scores = root / "scores"
        replicas = sorted(scores.iterdir()) if scores.is_dir() else []
        for replica in replicas:
            if replica.name.startswith("."):
                continue
            if not (replica.is_dir() and _REPLICA.match(replica.name)):
                problems.append(Problem(replica, "unexpected entry in scores/: expected dpNNNNN replica directories"))
                continue
            score_parts += stream_parts(replica, replica.name, SCORE_SCHEMA, manifest.run_id, problems, debris)
        step_parts = []
        if (root / "steps").is_dir():
            step_parts = stream_parts(root / "steps", "steps", STEP_SCHEMA, manifest.run_id, problems, debris)
        if not score_parts and not problems:
            problems.append(
                Problem(
                    scores,
                    "empty run: no score parts. The run wrote no step yet (parts are written every flush_every"
                    " steps and on close), or this is not the directory the scores were written to",
                )
            )
        return cls(root, manifest, score_parts, step_parts, debris), problems

    @classmethod
    def open(cls, root: str | Path) -> ScoreDump:
        """Open a dump for analysis; the first problem found is raised as a :class:`DumpError`."""
        dump, problems = cls.inspect(root)
        if problems:
            more = f" (and {len(problems) - 1} more problems; `inrun-scores verify` lists them)" if problems[1:] else ""
            raise DumpError(f"{problems[0]}{more}")
        return dump

    def batches(
        self, columns: list[str], parts: Iterable[Part] | None = None, batch_rows: int = BATCH_ROWS
    ) -> Iterator[tuple[Part, pa.RecordBatch]]:
        """Stream ``columns`` of the score parts (all, or ``parts``) in record batches, part by part."""
        for part in self.score_parts if parts is None else parts:
            yield from ((part, batch) for batch in read_batches(part.path, columns, batch_rows))

    def steps_table(self) -> pa.Table:
        """The per-step table (replica 0's ``steps`` stream), sorted by step and target."""
        tables = [read_table(p.path) for p in self.step_parts]
        table = pa.concat_tables(tables) if tables else STEP_SCHEMA.empty_table()
        return table.replace_schema_metadata(None).sort_by([("step", "ascending"), ("target", "ascending")])


def stream_parts(
    directory: Path, stream: str, schema: pa.Schema, run_id: str, problems: list[Problem], debris: list[Path]
) -> list[Part]:
    """The parts of one append-only stream directory (a replica's ``scores/dpNNNNN``, ``steps``, a replica's
    ``documents/dpNNNNN``), in step order, each checked against ``schema`` and ``run_id`` from its footer.

    Nothing is raised: every unexpected file, unreadable or foreign part and overlap of step ranges is
    appended to ``problems`` (so that ``verify`` lists them all) and ``*.tmp`` crash debris to ``debris``.
    """
    parts = []
    for path in sorted(directory.iterdir()):
        if path.name.endswith(".tmp"):
            debris.append(path)
            continue
        if path.name.startswith("."):
            continue
        span = part_steps(path)
        if span is None or not path.is_file():
            problems.append(Problem(path, "unexpected file: parts are named part-sFIRST-sLAST.parquet"))
            continue
        try:
            meta = open_part_metadata(path)
            check_part_metadata(path, meta, schema, run_id)
        except DumpError as e:
            problems.append(Problem(path, str(e).removeprefix(f"{path}: ")))
            continue
        parts.append(Part(path, stream, span[0], span[1], meta.num_rows))
    parts.sort(key=lambda p: (p.first_step, p.last_step))
    for before, after in itertools.pairwise(parts):
        if after.first_step <= before.last_step:
            problems.append(
                Problem(
                    after.path,
                    f"steps {after.first_step}-{after.last_step} overlap {before.path.name}: two parts hold the same"
                    " steps (parts of two runs in one directory, or a resumed run that was not given resume_step)",
                )
            )
    return parts


def read_batches(path: Path, columns: list[str] | None, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Record batches of one Parquet file; an unreadable file is a :class:`DumpError` naming it."""
    try:
        with pq.ParquetFile(path) as f:
            yield from f.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, e) from e


def read_table(path: Path, columns: list[str] | None = None, filters: list | None = None) -> pa.Table:
    """A Parquet file (or its rows that pass ``filters``); an unreadable file is a :class:`DumpError` naming it."""
    try:
        return pq.read_table(path, columns=columns, filters=filters, use_threads=False)
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, e) from e


def _unreadable(path: Path, error: Exception) -> DumpError:
    return DumpError(
        f"{path}: unreadable ({error}); the file is corrupt or truncated. Restore it from a copy, or move it out"
        " of the directory (its steps then count as missing)"
    )

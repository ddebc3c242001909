"""Durable, sharded score dumps: append-only Parquet parts per data-parallel replica + a manifest.

Layout of a run directory (the manifest is the contract; ``SCHEMA_VERSION`` versions it)::

    RUN/manifest.json                      units, sign, definitions, config, layout, versions, targets
    RUN/scores/dp00003/part-s00000010-s00000019.parquet   one row per (step, sample, target)
    RUN/steps/part-s00000010-s00000019.parquet            one row per (step, target), DP replica 0

Every part is written to ``.<name>.tmp`` and atomically renamed, so a reader never sees a
half-written file: hidden ``.*.tmp`` files are debris of a crash, skipped by pyarrow/pandas/polars
directory readers and ``*.parquet`` globs alike (and removed when a
writer reopens the stream). A part covers the contiguous steps in its name. Reopening a stream
with ``resume_step=k`` drops every row of steps > k (a run resumed from the checkpoint of step k
redoes those steps), so no step is ever counted twice.

Parquet was chosen because pandas, polars, DuckDB and pyarrow read these directories as they are
(``pyarrow.dataset.dataset(RUN / "scores")``).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from inrun_megatron.optimizer_values import split_row_name
from inrun_megatron.scores import SCORE_CONTRACT, StepRecords

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_PART = re.compile(r"^part-s(\d{8,})-s(\d{8,})\.parquet$")

SCORE_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64()),
        pa.field("sample_id", pa.int64()),
        pa.field("target", pa.string()),
        pa.field("raw", pa.float64()),
        pa.field("value", pa.float64()),
        pa.field("lr", pa.float64()),
        pa.field("clip_coef", pa.float64()),
        pa.field("n_tokens", pa.int64()),
        pa.field("skipped", pa.bool_()),
        pa.field("microbatch", pa.int32()),
        pa.field("position", pa.int32()),
        pa.field("dp_rank", pa.int32()),
    ]
)

STEP_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64()),
        pa.field("target", pa.string()),
        pa.field("lr", pa.float64()),
        pa.field("clip_coef", pa.float64()),
        pa.field("skipped", pa.bool_()),
        pa.field("validation_loss", pa.float64()),
        # <g_t, G_t> when measured, else NaN: the efficiency identity says it equals the sum of
        # raw over every shard's rows of the step and target.
        pa.field("batch_dot", pa.float64()),
    ]
)


def part_name(first_step: int, last_step: int) -> str:
    return f"part-s{first_step:08d}-s{last_step:08d}.parquet"


def part_steps(path: Path) -> tuple[int, int] | None:
    m = _PART.match(path.name)
    return (int(m.group(1)), int(m.group(2))) if m else None


#: Parquet key-value metadata of every part, so that a part moved into another run is recognised.
META_RUN_ID = b"inrun_megatron.run_id"
META_SCHEMA_VERSION = b"inrun_megatron.schema_version"


def part_metadata(run_id: str, schema_version: int = SCHEMA_VERSION) -> dict[bytes, bytes]:
    return {META_RUN_ID: run_id.encode(), META_SCHEMA_VERSION: b"%d" % schema_version}


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (hidden: readers skip it)."""
    return path.with_name(f".{path.name}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so that readers see either the old file or all of the new one, never a part."""
    tmp = temporary_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_table(path: Path, table: pa.Table) -> None:
    """Write a Parquet file atomically (hidden ``.<name>.tmp``, fsync, rename)."""
    tmp = temporary_path(path)
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(run_dir: str | Path, manifest: Mapping[str, Any]) -> dict:
    """Write the run's manifest (atomically); adds the score contract and schema version."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    full = {
        "format": "inrun_megatron.scores",
        "schema_version": SCHEMA_VERSION,
        "run_id": manifest.get("run_id") or uuid.uuid4().hex,
        "contract": SCORE_CONTRACT,
        "score_columns": {f.name: str(f.type) for f in SCORE_SCHEMA},
        "step_columns": {f.name: str(f.type) for f in STEP_SCHEMA},
        **{k: v for k, v in manifest.items() if k != "run_id"},
    }
    atomic_write_bytes(run_dir / MANIFEST, json.dumps(full, indent=2, sort_keys=True, default=str).encode())
    return full


def read_manifest(
    run_dir: str | Path, *, expected_format: str = "inrun_megatron.scores", expected_version: int = SCHEMA_VERSION
) -> dict:
    """The manifest of a score dump (or, with ``expected_format``, of a directory derived from one)."""
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest; is {run_dir} an inrun_megatron run directory?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{path}: not an {expected_format} manifest (format {found!r})")
    if manifest.get("schema_version") != expected_version:
        raise ValueError(
            f"{path}: schema version {manifest.get('schema_version')}, this inrun_megatron reads {expected_version}"
        )
    return manifest


def scores_table(records: StepRecords) -> pa.Table:
    c = records.columns
    arrays = {name: c[name] for name in SCORE_SCHEMA.names if name != "value"}
    arrays["value"] = records.values
    arrays["target"] = c["target"].astype(str)
    return pa.Table.from_pydict({name: arrays[name] for name in SCORE_SCHEMA.names}, schema=SCORE_SCHEMA)


@dataclass
class StepInfo:
    """Per-step facts stored once per step and target (replica 0's ``steps`` stream).

    ``batch_dots``: ``<g_t, G_t>`` per target, the scorer's ``last_batch_dots`` after ``end_step``;
    ``inrun-scores verify`` checks the efficiency identity against it (NaN where left out).
    """

    step: int
    lr: float
    clip_coef: float
    skipped: bool
    validation_losses: Mapping[str, float]
    batch_dots: Mapping[str, float] | None = None


class _PartStream:
    """One append-only directory of step-ranged Parquet parts."""

    def __init__(self, directory: Path, schema: pa.Schema, run_id: str, resume_step: int | None):
        self.directory, self.schema, self.run_id = directory, schema, run_id
        directory.mkdir(parents=True, exist_ok=True)
        for debris in directory.glob(".*.tmp"):
            debris.unlink()
        if resume_step is not None:
            self.truncate_after(resume_step)
        elif any(part_steps(p) for p in directory.iterdir()):
            raise FileExistsError(
                f"{directory} already holds score parts; pass resume_step=<last checkpointed step> to continue"
                " that run, or choose a new output directory"
            )
        self.pending: list[pa.Table] = []
        self.steps: list[int] = []
        # rows durably in the stream (kept by a resume included)
        self.rows_written = sum(pq.ParquetFile(p).metadata.num_rows for p in directory.iterdir() if part_steps(p))

    def truncate_after(self, step: int) -> None:
        for path in sorted(self.directory.iterdir()):
            span = part_steps(path)
            if span is None or span[1] <= step:
                continue
            if span[0] > step:
                path.unlink()
                continue
            table = pq.read_table(path)
            kept = table.filter(pc.less_equal(table["step"], step))
            atomic_write_table(self.directory / part_name(span[0], step), self._with_meta(kept))
            path.unlink()

    def _with_meta(self, table: pa.Table) -> pa.Table:
        return table.replace_schema_metadata(part_metadata(self.run_id))

    def append(self, step: int, table: pa.Table) -> None:
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"step {step} written after step {self.steps[-1]}: streams are append-only")
        self.pending.append(table)
        self.steps.append(step)

    def flush(self) -> None:
        if not self.pending:
            return
        table = pa.concat_tables(self.pending)
        atomic_write_table(self.directory / part_name(self.steps[0], self.steps[-1]), self._with_meta(table))
        self.rows_written += table.num_rows
        self.pending, self.steps = [], []


class ScoreWriter:
    """Writes one data-parallel replica's score rows (and, on replica 0, the per-step table).

    Rows are buffered and flushed every ``flush_every`` steps (and on :meth:`close`), each flush
    one atomic Parquet part. Call from one rank per DP replica (after the model-parallel
    reduction every rank of a replica holds the same rows).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        dp_rank: int,
        flush_every: int = 10,
        resume_step: int | None = None,
        write_steps: bool | None = None,
    ):
        run_dir = Path(run_dir)
        self.run_id = read_manifest(run_dir)["run_id"]
        self.flush_every = flush_every
        self.scores = _PartStream(run_dir / "scores" / f"dp{dp_rank:05d}", SCORE_SCHEMA, self.run_id, resume_step)
        write_steps = dp_rank == 0 if write_steps is None else write_steps
        self.steps = _PartStream(run_dir / "steps", STEP_SCHEMA, self.run_id, resume_step) if write_steps else None
        self._since_flush = 0

    def append(self, records: StepRecords, info: StepInfo) -> None:
        self.scores.append(info.step, scores_table(records))
        if self.steps is not None:
            self.steps.append(info.step, step_table(info))
        self._since_flush += 1
        if self._since_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        self.scores.flush()
        if self.steps is not None:
            self.steps.flush()
        self._since_flush = 0

    def close(self) -> None:
        self.flush()

    @property
    def rows_written(self) -> int:
        """Score rows durably in this replica's stream (flushed parts, a resumed run's kept ones included)."""
        return self.scores.rows_written


def step_table(info: StepInfo) -> pa.Table:
    """One row per score row of the step: each target, and each target's Adam-aware row where the
    step has one (``batch_dots`` names it; its validation loss is its target's), docs/DESIGN.md §1.5."""
    dots = info.batch_dots or {}
    targets = [*info.validation_losses, *(row for row in dots if row not in info.validation_losses)]
    return pa.Table.from_pydict(
        {
            "step": [info.step] * len(targets),
            "target": targets,
            "lr": [info.lr] * len(targets),
            "clip_coef": [info.clip_coef] * len(targets),
            "skipped": [info.skipped] * len(targets),
            "validation_loss": [float(info.validation_losses[split_row_name(t)[0]]) for t in targets],
            "batch_dot": [float(dots.get(t, np.nan)) for t in targets],
        },
        schema=STEP_SCHEMA,
    )

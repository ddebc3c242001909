"""Merge a score dump into accumulated per-sample values, out of core, in one process or under MPI.

Two passes with a fixed memory bound, whatever the dump's size:

1. **Spill.** Stream the score parts in record batches; append each row (as a packed record
   of ``SPILL_DTYPE``) to the spill file of its target and bucket, ``bucket_of(sample_id)``.
   Per part, also sum the rows of every (step, target) in file order (the efficiency identity
   and per-step curves need these sums, and summing per part makes them independent of which
   process read the part).
2. **Reduce.** Load one bucket and target at a time, sort by (sample id, step), and
   sum each sample's rows in step order into ``values/part-bNNNNN.parquet`` (and, with
   ``per_step``, keep the sorted rows in ``per_step/``).

The bucket count is chosen so that one bucket fits the memory budget while it is reduced.

Under MPI (``comm`` an mpi4py communicator, e.g. ``mpirun -n 4 inrun-scores merge --mpi``) rank
``r`` reads a balanced share of the parts into its own spill files and reduces the buckets
``b`` with ``b % size == r``; spill and output directories must be on a file system every rank
sees. Every sum runs in an order fixed by the data alone (sorted rows within a bucket; parts and
buckets in their global order), so the output is byte-for-byte the same for any number of ranks
(the bucket count, from the row count and the memory budget or given, being the same).

Nothing appears at the output path unless everything succeeded: all work happens in a hidden
sibling directory that is renamed to the output at the end (and removed on failure). A failure
on any rank is raised on every rank, so that none waits forever for a dead peer.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from inrun_megatron.analysis.dump import DumpError, Part, ScoreDump
from inrun_megatron.analysis.progress import SILENT, Progress
from inrun_megatron.analysis.values import (
    PER_STEP_COLUMNS,
    PER_STEP_SCHEMA,
    STEP_TOTALS_COLUMNS,
    STEP_TOTALS_SCHEMA,
    VALUE_COLUMNS,
    VALUE_SCHEMA,
    VALUES_FORMAT,
    VALUES_SCHEMA_VERSION,
    bucket_name,
    bucket_of,
)
from inrun_megatron.records import MANIFEST, atomic_write_bytes, atomic_write_table, part_metadata
from inrun_megatron.scores import row_values

#: One spilled score row.
SPILL_DTYPE = np.dtype(
    [
        ("sample_id", "<i8"),
        ("step", "<i8"),
        ("value", "<f8"),
        ("raw", "<f8"),
        ("n_tokens", "<i8"),
        ("part", "<i4"),
        ("skipped", "?"),
    ]
)
#: Score columns read from the dump (besides the target, which names the spill folder); lr and
#: clip_coef only go into the spilled value.
READ = ("sample_id", "step", "raw", "lr", "clip_coef", "n_tokens", "skipped")

#: Default memory budget of one merging process (``--memory-gib``).
DEFAULT_MEMORY = 4 << 30
#: Memory of the interpreter, the libraries and one streamed input batch, besides the bucket.
BASE_BYTES = 1 << 30
#: Peak bytes per row of the bucket being reduced: the loaded rows, the sort order, the sorted
#: copy and the output tables (a conservative bound on what the benchmark measures).
REDUCE_BYTES_PER_ROW = 256

_STEP_SUM_FIELDS = ("rows", "skipped_rows", "raw_sum", "raw_abs_sum", "value_sum")


def buckets_for(rows: int, memory_bytes: int) -> int:
    """Buckets needed so that one bucket's reduction stays within ``memory_bytes``."""
    usable = memory_bytes - BASE_BYTES
    if usable < 64 * REDUCE_BYTES_PER_ROW:
        raise ValueError(
            f"a memory budget of {memory_bytes / 2**30:.2f} GiB leaves nothing for the merge itself: it needs"
            f" {BASE_BYTES / 2**30:.1f} GiB besides its buckets; give it more"
        )
    return max(1, math.ceil(rows * REDUCE_BYTES_PER_ROW / usable))


class SerialComm:
    """The one-process stand-in for the parts of an mpi4py communicator that the merge uses."""

    rank = 0
    size = 1

    def allgather(self, obj: Any) -> list:
        return [obj]

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def barrier(self) -> None:
        pass


def collectively(comm, fn: Callable[[], Any]) -> list:
    """Run ``fn`` on every rank and gather the results; a failure on any rank is raised on all."""
    try:
        result, error = fn(), None
    except Exception as e:  # every failure must reach the other ranks, whatever it is
        result, error = None, e
    gathered = comm.allgather((None if error is None else f"{type(error).__name__}: {error}", result))
    if error is not None:
        raise error
    for rank, (message, _) in enumerate(gathered):
        if message is not None:
            raise DumpError(f"rank {rank} failed: {message}")
    return [r for _, r in gathered]


@dataclass
class PartFacts:
    """What the spill pass learned about one part."""

    index: int
    step_sums: pa.Table  # per (step, target) of this part, STEP_TOTALS_SCHEMA's first columns
    out_of_span: int = 0
    out_of_span_example: int | None = None


@dataclass
class BucketFacts:
    """What reducing buckets found: samples per target, and (step, sample) rows seen more than once."""

    samples: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    duplicate_examples: list[tuple[str, int, int, list[int]]] = field(default_factory=list)


@dataclass
class MergeReport:
    """What a merge found: sizes, per-step totals joined with the step table, and data problems."""

    rows: int
    parts: int
    buckets: int
    targets: list[str]
    samples: dict[str, int]
    step_totals: pa.Table
    steps_by_replica: dict[str, np.ndarray]
    duplicates: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    out_of_span: list[str] = field(default_factory=list)


def merge(
    dump: ScoreDump,
    out: str | Path | None,
    *,
    per_step: bool = False,
    buckets: int | None = None,
    memory_bytes: int = DEFAULT_MEMORY,
    comm=None,
    progress: Progress = SILENT,
    allow_duplicates: bool = False,
    work_dir: str | Path | None = None,
) -> MergeReport:
    """Merge ``dump`` into the new directory ``out`` (see the module docstring); return what it found.

    With ``out=None`` nothing is kept (``verify`` uses this for the report); ``allow_duplicates``
    reports duplicate (step, sample, target) rows instead of failing on them.
    """
    comm = comm or SerialComm()
    if buckets is not None and buckets < 1:
        raise ValueError(f"--buckets must be at least 1, got {buckets}")
    n_buckets = buckets or buckets_for(dump.num_rows, memory_bytes)
    out = None if out is None else Path(out)
    if out is not None and out.exists():
        raise DumpError(f"{out}: already exists; merge into a new directory (nothing was written)")
    parent = out.parent if out is not None else Path(work_dir or tempfile.gettempdir())
    token = comm.bcast(uuid.uuid4().hex[:12] if comm.rank == 0 else None)
    tmp = parent / f".{out.name if out is not None else 'inrun-scores'}.tmp-{token}"
    try:
        shares = _assign(dump.score_parts, comm.size)
        spilled = collectively(
            comm, lambda: _spill(dump, shares[comm.rank], tmp / "spill" / f"r{comm.rank}", n_buckets, progress)
        )
        rank_targets = [targets for targets, _ in spilled]
        mine = range(comm.rank, n_buckets, comm.size)
        reduced = collectively(
            comm, lambda: _reduce(tmp, mine, rank_targets, out is not None, per_step, dump.run_id, progress)
        )
        report = _report(dump, n_buckets, [f for _, facts in spilled for f in facts], reduced)
        if report.duplicates and not allow_duplicates:
            raise DumpError(
                f"{dump.root}: {report.duplicates} duplicate (step, sample, target) rows, e.g."
                f" {'; '.join(report.duplicate_examples[:3])}. Summing them would count those steps twice;"
                " `inrun-scores verify` lists them (nothing was written)"
            )
        if out is not None:
            collectively(comm, lambda: _publish(dump, report, tmp, out, per_step) if comm.rank == 0 else None)
        return report
    finally:
        comm.barrier()
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)


def _assign(parts: list[Part], n_ranks: int) -> list[list[tuple[int, Part]]]:
    """Balance the parts (with their global indices) over the ranks by row count, deterministically."""
    shares: list[list[tuple[int, Part]]] = [[] for _ in range(n_ranks)]
    load = [0] * n_ranks
    for index in sorted(range(len(parts)), key=lambda i: (-parts[i].num_rows, i)):
        rank = load.index(min(load))
        shares[rank].append((index, parts[index]))
        load[rank] += parts[index].num_rows
    return [sorted(share, key=lambda x: x[0]) for share in shares]


def _spill(
    dump: ScoreDump, share: list[tuple[int, Part]], spill_dir: Path, n_buckets: int, progress: Progress
) -> tuple[list[str], list[PartFacts]]:
    """Pass 1 on this rank's parts; returns the targets (spill folder ``t{k}`` holds ``targets[k]``)."""
    spill_dir.mkdir(parents=True, exist_ok=True)
    targets: list[str] = []
    facts = []
    with progress.task("reading score parts", sum(p.num_rows for _, p in share)) as advance:
        for index, part in share:
            sums, fact = [], PartFacts(index, None)
            for _, batch in dump.batches([*READ, "target"], [part]):
                columns = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in READ}
                rows = batch.column("target").to_numpy(zero_copy_only=False)
                # the value from its definition, whatever the dump stored (dumps written before
                # skipped steps stored value 0 hold NaN there)
                lr, clip_coef = columns.pop("lr"), columns.pop("clip_coef")
                columns["value"] = row_values(rows, columns["raw"], lr, clip_coef, columns["skipped"])
                step = columns["step"]
                outside = (step < part.first_step) | (step > part.last_step)
                if outside.any():
                    fact.out_of_span += int(outside.sum())
                    fact.out_of_span_example = fact.out_of_span_example or int(step[outside][0])
                encoded = pc.dictionary_encode(batch.column("target"))
                codes = encoded.indices.to_numpy()
                for code, name in enumerate(encoded.dictionary.to_pylist()):
                    if name not in targets:
                        targets.append(name)
                    mine = {key: column[codes == code] for key, column in columns.items()}
                    append_to_buckets(mine, index, spill_dir / f"t{targets.index(name)}", n_buckets)
                    sums.append(_step_sums(name, mine))
                advance(batch.num_rows)
            fact.step_sums = sum_by_step(pa.concat_tables(sums)) if sums else _empty_step_sums()
            facts.append(fact)
    return targets, facts


def append_to_buckets(columns: dict[str, np.ndarray], part_index: int, directory: Path, n_buckets: int) -> None:
    """Append rows (as packed SPILL_DTYPE records) to the spill file of each one's bucket.

    Shared with the step views (:mod:`.views`), which spill their per-row view values the same way.
    """
    directory.mkdir(exist_ok=True)
    buckets = bucket_of(columns["sample_id"], n_buckets)
    order = np.argsort(buckets, kind="stable")
    rows = np.empty(len(order), SPILL_DTYPE)
    for name, column in columns.items():
        rows[name] = column[order]  # sorting the columns first is faster than sorting records
    rows["part"] = part_index
    counts = np.bincount(buckets, minlength=n_buckets)
    ends = np.cumsum(counts)
    for bucket in np.flatnonzero(counts):
        with open(directory / f"b{bucket:05d}.bin", "ab") as f:
            rows[ends[bucket] - counts[bucket] : ends[bucket]].tofile(f)


def _step_sums(target: str, rows: dict[str, np.ndarray]) -> pa.Table:
    """Per-step sums of rows of one target, added in row order (so they are reproducible)."""
    unique, inverse = np.unique(rows["step"], return_inverse=True)
    trained = ~rows["skipped"]
    raw = np.where(trained, rows["raw"], 0.0)
    return pa.table(
        {
            "step": unique,
            "target": pa.repeat(pa.scalar(target, pa.string()), len(unique)),
            "rows": np.bincount(inverse, minlength=len(unique)).astype(np.int64),
            "skipped_rows": np.bincount(inverse, weights=rows["skipped"], minlength=len(unique)).astype(np.int64),
            "raw_sum": np.bincount(inverse, weights=raw, minlength=len(unique)),
            "raw_abs_sum": np.bincount(inverse, weights=np.abs(raw), minlength=len(unique)),
            "value_sum": np.bincount(inverse, weights=rows["value"], minlength=len(unique)),
        }
    )


def _empty_step_sums() -> pa.Table:
    return pa.schema([STEP_TOTALS_SCHEMA.field(n) for n in ("step", "target", *_STEP_SUM_FIELDS)]).empty_table()


def sum_by_step(table: pa.Table) -> pa.Table:
    """Add up rows of equal (step, target) in table order; sorted by step, then target."""
    targets = table.column("target").to_numpy().astype(str)
    names, codes = np.unique(targets, return_inverse=True)
    unique, inverse = np.unique(table.column("step").to_numpy() * len(names) + codes, return_inverse=True)
    sums = {
        name: np.bincount(inverse, weights=table.column(name).to_numpy(), minlength=len(unique))
        for name in _STEP_SUM_FIELDS
    }
    for name in ("rows", "skipped_rows"):
        sums[name] = sums[name].astype(np.int64)
    return pa.table(
        {"step": unique // len(names), "target": pa.array(names[unique % len(names)].tolist(), pa.string()), **sums},
        schema=_empty_step_sums().schema,
    )


def _reduce(
    tmp: Path,
    buckets: range,
    rank_targets: list[list[str]],
    write: bool,
    per_step: bool,
    run_id: str,
    progress: Progress,
) -> dict[int, BucketFacts]:
    """Pass 2 on this rank's buckets: one bucket and target in memory at a time."""
    names = sorted({name for targets in rank_targets for name in targets})
    metadata = part_metadata(run_id, VALUES_SCHEMA_VERSION)
    results = {}
    per_step = per_step and write
    if write:
        (tmp / "values").mkdir(parents=True, exist_ok=True)
    if per_step:
        (tmp / "per_step").mkdir(exist_ok=True)
    with progress.task("summing per sample", len(buckets)) as advance:
        for bucket in buckets:
            facts, values, rows_out = BucketFacts(), [], []
            for name in names:
                files = [
                    tmp / "spill" / f"r{rank}" / f"t{targets.index(name)}" / f"b{bucket:05d}.bin"
                    for rank, targets in enumerate(rank_targets)
                    if name in targets
                ]
                rows = load_sorted([f for f in files if f.exists()])
                if not len(rows["sample_id"]):
                    continue
                values.append(accumulate(name, rows, facts))
                if per_step:
                    rows_out.append(_per_step_table(name, rows))
                del rows
                for f in files:
                    f.unlink(missing_ok=True)
            if write:
                _write(tmp / "values" / bucket_name(bucket), values, VALUE_SCHEMA, metadata)
            if per_step:
                _write(tmp / "per_step" / bucket_name(bucket), rows_out, PER_STEP_SCHEMA, metadata)
            results[bucket] = facts
            advance(1)
    return results


def load_sorted(files: list[Path]) -> dict[str, np.ndarray]:
    """The spilled rows of one bucket and target as columns, sorted by sample id, then step.

    (sample id, step) identifies a row (duplicates make the merge fail), so the order, and every
    sum over it, depends only on the rows, not on the order in which ranks spilled them. The step
    views (:mod:`.views`) load their buckets with it too.
    """
    chunks = [np.fromfile(f, dtype=SPILL_DTYPE) for f in files]
    rows = chunks[0] if len(chunks) == 1 else np.concatenate(chunks) if chunks else np.empty(0, SPILL_DTYPE)
    del chunks
    order = _order_by_sample_and_step(rows["sample_id"], rows["step"])
    return {name: rows[name][order] for name in SPILL_DTYPE.names}


def _order_by_sample_and_step(sample_id: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Sort order by (sample id, step): one argsort of a combined key when it fits in 63 bits."""
    if not len(sample_id):
        return np.empty(0, dtype=np.int64)
    first_id, first_step = int(sample_id.min()), int(step.min())
    span = int(step.max()) - first_step + 1
    if (int(sample_id.max()) - first_id + 1) * span < 2**63:
        return np.argsort((sample_id - first_id) * span + (step - first_step))
    return np.lexsort((step, sample_id))


def accumulate(target: str, rows: dict[str, np.ndarray], facts: BucketFacts) -> pa.Table:
    """Per-sample sums of :func:`load_sorted` rows of one target (each sample's rows added in step
    order), as a ``VALUE_SCHEMA`` table; duplicate (sample, step) rows are counted in ``facts``. The
    step views (:mod:`.views`) sum their per-row view values with it, so both reduce alike."""
    sid, step = rows["sample_id"], rows["step"]
    new_sample = np.r_[True, sid[1:] != sid[:-1]]
    starts = np.flatnonzero(new_sample)
    ends = np.r_[starts[1:], len(sid)]
    repeated = np.flatnonzero(~new_sample & np.r_[False, step[1:] == step[:-1]])
    if len(repeated):
        facts.duplicates += len(repeated)
        for i in repeated[: 5 - len(facts.duplicate_examples)]:
            where = [int(rows["part"][i - 1]), int(rows["part"][i])]
            facts.duplicate_examples.append((target, int(sid[i]), int(step[i]), where))
    trained = ~rows["skipped"]
    n_steps = np.add.reduceat(trained.astype(np.int32), starts)
    facts.samples[target] = len(starts)
    return pa.table(
        {
            "target": pa.repeat(pa.scalar(target, pa.string()), len(starts)),
            "sample_id": sid[starts],
            "value": np.add.reduceat(rows["value"], starts),
            "raw": np.add.reduceat(np.where(trained, rows["raw"], 0.0), starts),
            "n_steps": n_steps.astype(np.int32),
            "skipped_steps": (ends - starts - n_steps).astype(np.int32),
            "first_step": step[starts],
            "last_step": step[ends - 1],
            "n_tokens": np.add.reduceat(np.where(trained, rows["n_tokens"], 0), starts).astype(np.int64),
        },
        schema=VALUE_SCHEMA,
    )


def _per_step_table(target: str, rows: dict[str, np.ndarray]) -> pa.Table:
    columns = {name: rows[name] for name in PER_STEP_SCHEMA.names if name != "target"}
    n = len(rows["sample_id"])
    return pa.table({"target": pa.repeat(pa.scalar(target, pa.string()), n), **columns}, schema=PER_STEP_SCHEMA)


def _write(path: Path, tables: list[pa.Table], schema: pa.Schema, metadata: dict) -> None:
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    atomic_write_table(path, table.replace_schema_metadata(metadata))


def _report(
    dump: ScoreDump, n_buckets: int, facts: list[PartFacts], reduced: list[dict[int, BucketFacts]]
) -> MergeReport:
    facts = sorted(facts, key=lambda f: f.index)
    buckets = sorted((b, f) for per_rank in reduced for b, f in per_rank.items())
    samples: dict[str, int] = {}
    for _, f in buckets:
        for target, n in f.samples.items():
            samples[target] = samples.get(target, 0) + n
    parts = dump.score_parts
    examples = [
        f"target {t!r} sample {sid} step {step} (in {', '.join(sorted({parts[i].path.name for i in where}))})"
        for _, f in buckets
        for t, sid, step, where in f.duplicate_examples
    ]
    by_replica: dict[str, list[np.ndarray]] = {}
    for f in facts:
        by_replica.setdefault(parts[f.index].stream, []).append(f.step_sums.column("step").to_numpy())
    totals = sum_by_step(pa.concat_tables([f.step_sums for f in facts]))
    return MergeReport(
        rows=dump.num_rows,
        parts=len(parts),
        buckets=n_buckets,
        targets=sorted(samples),
        samples=dict(sorted(samples.items())),
        step_totals=_join_step_table(totals, dump.steps_table()),
        steps_by_replica={r: np.unique(np.concatenate(s)) for r, s in sorted(by_replica.items())},
        duplicates=sum(f.duplicates for _, f in buckets),
        duplicate_examples=examples,
        out_of_span=[
            f"{parts[f.index].path}: {f.out_of_span} rows of steps outside the part's name (e.g. step"
            f" {f.out_of_span_example})"
            for f in facts
            if f.out_of_span
        ],
    )


def _join_step_table(totals: pa.Table, steps: pa.Table) -> pa.Table:
    joined = totals.join(steps, keys=["step", "target"], join_type="full outer", use_threads=False)
    for name in ("rows", "skipped_rows"):
        joined = joined.set_column(joined.schema.get_field_index(name), name, pc.fill_null(joined[name], 0))
    for name in ("raw_sum", "raw_abs_sum", "value_sum"):
        joined = joined.set_column(joined.schema.get_field_index(name), name, pc.fill_null(joined[name], 0.0))
    joined = joined.sort_by([("step", "ascending"), ("target", "ascending")])
    return joined.select(STEP_TOTALS_SCHEMA.names).cast(STEP_TOTALS_SCHEMA)


def _publish(dump: ScoreDump, report: MergeReport, tmp: Path, out: Path, per_step: bool) -> None:
    metadata = part_metadata(dump.run_id, VALUES_SCHEMA_VERSION)
    atomic_write_table(tmp / "steps.parquet", report.step_totals.replace_schema_metadata(metadata))
    manifest = {
        "format": VALUES_FORMAT,
        "schema_version": VALUES_SCHEMA_VERSION,
        "run_id": dump.run_id,
        "contract": dump.manifest.contract,
        "source": {
            "path": str(dump.root.resolve()),
            "rows": report.rows,
            "parts": report.parts,
            "replicas": dump.replicas,
        },
        "source_manifest": dump.manifest.to_dict(),
        "buckets": report.buckets,
        "bucket_of": "murmur3 fmix64(sample_id) mod buckets",
        "per_step": per_step,
        "targets": report.targets,
        "samples": report.samples,
        "columns": {
            "values": VALUE_COLUMNS,
            "per_step": PER_STEP_COLUMNS,
            "steps": STEP_TOTALS_COLUMNS,
        },
    }
    atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    shutil.rmtree(tmp / "spill")
    os.rename(tmp, out)

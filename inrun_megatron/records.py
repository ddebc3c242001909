"""Durable, sharded score dumps: append-only Parquet parts per data-parallel replica + a manifest.

Layout of a run directory (the manifest is the contract; ``SCHEMA_VERSION`` versions it)::

    RUN/manifest.json                      a :class:`Manifest`: units, sign, columns, config, layout, targets
    RUN/scores/dp00003/part-s00000010-s00000019.parquet   SCORE_FIELDS: one row per (step, sample, target)
    RUN/steps/part-s00000010-s00000019.parquet            STEP_FIELDS: one row per (step, target), replica 0
    RUN/documents/dp00003/part-...parquet   DOCUMENT_FIELDS (document values on): one row per (step, sample,
                                           document span, target)

:class:`ScoreWriter` writes one replica's streams; it is the Parquet sink of a scorer
(:mod:`inrun_megatron.step_result`).

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

import dataclasses
import datetime
import json
import os
import platform
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from inrun_megatron import __version__
from inrun_megatron.optimizer_values import RunValues, split_row_name
from inrun_megatron.scores import LOSS_NORMALISATIONS, SCORE_CONTRACT, StepRecords
from inrun_megatron.step_result import StepResult

#: Version of the run directory's layout (manifest fields and part columns); bumped when either changes.
SCHEMA_VERSION = 3
MANIFEST = "manifest.json"
_PART = re.compile(r"^part-s(\d{8,})-s(\d{8,})\.parquet$")


class Column(NamedTuple):
    """One column of a file kind: its name, Arrow type and what it holds (manifests copy ``holds``)."""

    name: str
    type: pa.DataType
    holds: str


def arrow_schema(columns: Sequence[Column]) -> pa.Schema:
    """The Arrow schema every writer and reader of a file kind uses."""
    return pa.schema([pa.field(c.name, c.type) for c in columns])


def describe_columns(columns: Sequence[Column]) -> dict[str, str]:
    """``{name: "type: what it holds"}``, as manifests record a file kind's columns."""
    return {c.name: f"{c.type}: {c.holds}" for c in columns}


def pick_columns(columns: Sequence[Column], *names: str) -> tuple[Column, ...]:
    """The named columns of another file kind, so that a column shared by two kinds is defined once."""
    by_name = {c.name: c for c in columns}
    return tuple(by_name[name] for name in names)


#: ``scores/dpNNNNN/*.parquet``: one row per (step, sample, target) of one data-parallel replica.
SCORE_FIELDS = (
    Column("step", pa.int64(), "optimizer step (the scorer's step counter; a resumed run continues it)"),
    Column("sample_id", pa.int64(), "global sample id: the dataset index of the training sequence"),
    Column(
        "target",
        pa.string(),
        "score row: the validation target T the scores are against (SGD value), T:adam (its Adam-aware value) or"
        " T:curvature (the second-order term, docs/DESIGN.md §1.7)",
    ),
    Column("raw", pa.float64(), "<grad of the sample's loss term, G_target> at the step's weights; NaN if skipped"),
    Column(
        "value",
        pa.float64(),
        "lr * clip_coef * raw (a curvature row: -(lr * clip_coef)^2 / 2 * raw), nats; positive = lowered the"
        " validation loss; 0 if skipped",
    ),
    Column("lr", pa.float64(), "learning rate of the step's update"),
    Column("clip_coef", pa.float64(), "factor gradient clipping multiplied the step's gradient by (1: no clipping)"),
    Column("n_tokens", pa.int64(), "loss tokens of the sequence"),
    Column("skipped", pa.bool_(), "the step's update was skipped (fp16 overflow)"),
    Column("microbatch", pa.int32(), "microbatch of the replica's step that held the sequence"),
    Column("position", pa.int32(), "the sequence's position in its microbatch"),
    Column("dp_rank", pa.int32(), "data-parallel replica that trained on the sequence"),
)
SCORE_SCHEMA = arrow_schema(SCORE_FIELDS)

#: ``steps/*.parquet`` (replica 0): one row per (step, target), the step's facts.
STEP_FIELDS = (
    *pick_columns(SCORE_FIELDS, "step", "target", "lr", "clip_coef", "skipped"),
    Column("validation_loss", pa.float64(), "validation loss at the step's weights (mean token cross-entropy, nats)"),
    Column(
        "batch_dot",
        pa.float64(),
        "<g_t, G_t> over the global batch, before clipping, loss scale removed (NaN: not measured; <g_t, P_t G_t>"
        " on a T:adam row); by the efficiency identity the sum of raw over every replica's rows of the step and"
        " target",
    ),
)
STEP_SCHEMA = arrow_schema(STEP_FIELDS)

#: ``documents/dpNNNNN/*.parquet`` (``ScoringConfig.document_eod`` set, docs/DESIGN.md §2.9): one row per
#: (step, sample, document span, target); the spans of a sample's row sum to its ``scores`` row.
DOCUMENT_FIELDS = (
    *pick_columns(SCORE_FIELDS, "step", "sample_id"),
    Column(
        "span",
        pa.int32(),
        "document span within the sequence, 0 = first: the positions whose input token belongs to the document,"
        " its end-of-document token included (inrun_megatron.data.open_sample_index maps (sample_id, span) to the"
        " document)",
    ),
    *pick_columns(SCORE_FIELDS, "target"),
    Column(
        "raw",
        pa.float64(),
        "the span's part of the sample's raw score: its positions' per-token partials of <grad of the sample's loss"
        " term, G_target>; exactly the document's own raw score when attention and position ids reset at"
        " document boundaries; NaN if skipped",
    ),
    Column("value", pa.float64(), "lr * clip_coef * raw, nats; positive = lowered the validation loss; 0 if skipped"),
    *pick_columns(SCORE_FIELDS, "lr", "clip_coef"),
    Column("span_tokens", pa.int64(), "positions (input tokens) of the span"),
    *pick_columns(SCORE_FIELDS, "skipped", "dp_rank"),
)
DOCUMENT_SCHEMA = arrow_schema(DOCUMENT_FIELDS)


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


def library_versions(**frameworks: str) -> dict[str, str]:
    """The versions every manifest records, plus the writer's framework versions (``megatron_core=``,
    ``deepspeed=``)."""
    return {
        "inrun_megatron": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
        **frameworks,
    }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def _new_run_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class RunLayout:
    """How a run was parallelised and batched: what a row's ``dp_rank``, ``microbatch`` and
    ``position`` refer to, and how many score streams to expect."""

    world_size: int
    """Processes of the run."""
    data_parallel: int
    """Data-parallel replicas; each writes its rows to its own stream ``scores/dpNNNNN``."""
    tensor_parallel: int = 1
    """Tensor-parallel size (the ranks of a replica's tensor-parallel group hold the same rows)."""
    pipeline_parallel: int = 1
    """Pipeline stages (megatron-core); the last stage writes the rows."""
    virtual_pipeline: int | None = None
    """Model chunks per pipeline stage under megatron's interleaved schedule; None without it."""
    zero_stage: int | None = None
    """DeepSpeed's ZeRO stage; None for megatron-core runs."""
    micro_batch_size: int | None = None
    """Sequences per microbatch (also the number of ``position`` values)."""
    num_microbatches: int | None = None
    """Microbatches per replica and step (gradient accumulation steps); the number of ``microbatch`` values."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all replicas."""


@dataclass(frozen=True)
class Manifest:
    """``RUN/manifest.json``: what a score dump holds and how it was made (``docs/DESIGN.md`` §2.8).

    Every writer (the pretraining and DeepSpeed entry points, synthetic dumps, API users) fills
    the same fields; :func:`write_manifest` writes it, :func:`read_manifest` reads and checks it.
    The fields after ``launcher`` are the library's own (format, units, sign, columns) and are
    filled in for the writer.
    """

    entry_point: str
    """What wrote the dump: ``launch/pretrain_gpt.py``, ``launch/deepspeed_train.py``,
    ``synthetic``, or the name an API user gives their own loop."""
    config: dict[str, Any]
    """The run's configuration as given (run config, command line, framework config): enough to
    run it again, and what a resumed run must match."""
    layout: RunLayout
    """The parallel layout and batch shape."""
    targets: list[dict[str, Any]]
    """One entry per validation target, in scoring order: ``name``, and where known ``sequences``,
    ``loss_tokens`` and where the target came from (``source``/``split`` or ``jsonl``)."""
    values: RunValues | None
    """The value kinds recorded and the score row of each (``Scorer.values_manifest``,
    ``docs/DESIGN.md`` §1.5); None if scoring was off."""
    scoring: dict[str, Any] | None = None
    """The ``ScoringConfig`` of the run (``ScoringConfig.to_dict()``); None if scoring was off."""
    scoring_path: str | None = None
    """The scoring path the steps took, ``"rules"`` or ``"microbatch"``; None if scoring was off."""
    data: dict[str, Any] | None = None
    """Where each sample id came from (``TrainingData.manifest_section``: sources, tokenizer, the
    dataset indices); None for synthetic data. ``inrun_megatron.data.open_sample_index`` reads it."""
    model: dict[str, Any] | None = None
    """What the model is, where the writer knows it (e.g. ``vocab_size``, ``parameters``)."""
    loss_normalisation: str | None = None
    """How the training loss divides each sequence's masked token-loss sum into its term ``l_z``
    (``docs/DESIGN.md`` §1.1): a key of ``LOSS_NORMALISATIONS`` (``microbatch_tokens``: megatron's
    default loss, ``global_batch_tokens``: its ``calculate_per_token_loss``), so a reader can
    renormalise raw scores offline; the Megatron scorer's ``loss_normalisation``. None where the
    writer does not know it (a loss of the user's own) or scoring was off."""
    versions: dict[str, str] = field(default_factory=library_versions)
    """Library versions of the run (:func:`library_versions`)."""
    run_id: str = field(default_factory=_new_run_id)
    """Identifies the run; every part's footer carries it, so parts of two runs are never mixed."""
    created: str = field(default_factory=_now)
    """When the run was first started (ISO 8601, UTC); kept when it resumes."""
    resumed_from: tuple[int, ...] = ()
    """The checkpoint iterations the run resumed from, in order."""
    launcher: str | None = None
    """How the processes were started (``torchrun``, ``deepspeed``, ``mpirun``, ``srun``), where known."""
    format: str = "inrun_megatron.scores"
    """The directory kind; readers refuse others."""
    schema_version: int = SCHEMA_VERSION
    """Version of this layout (manifest fields and part columns); readers refuse others."""
    contract: dict[str, Any] = field(default_factory=lambda: dict(SCORE_CONTRACT))
    """What a score means: units, sign convention, the value formula, skipped steps (``SCORE_CONTRACT``)."""
    columns: dict[str, dict[str, str]] = field(
        default_factory=lambda: {
            "scores": describe_columns(SCORE_FIELDS),
            "steps": describe_columns(STEP_FIELDS),
            "documents": describe_columns(DOCUMENT_FIELDS),
        }
    )
    """Per file kind (``scores``, ``steps``, ``documents``), each column's type and the value it holds."""

    @property
    def document_values(self) -> bool:
        """Whether the run recorded document values (``documents/``, ``ScoringConfig.document_eod``)."""
        return (self.scoring or {}).get("document_eod") is not None

    def __post_init__(self) -> None:
        if self.loss_normalisation is not None and self.loss_normalisation not in LOSS_NORMALISATIONS:
            raise ValueError(
                f"unknown loss_normalisation {self.loss_normalisation!r} (one of {sorted(LOSS_NORMALISATIONS)})"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "manifest") -> Manifest:
        """Check and type a manifest read from JSON; ``where`` names it in errors."""
        check_format(data, where, "inrun_megatron.scores", SCHEMA_VERSION)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        required = [
            n
            for n, f in fields.items()
            if dataclasses.MISSING is f.default and dataclasses.MISSING is f.default_factory
        ]
        missing = [n for n in required if n not in data]
        if unknown or missing:
            raise ValueError(f"{where}: unknown fields {unknown}, missing fields {missing} (of {list(fields)})")
        try:
            layout = RunLayout(**data["layout"])
        except TypeError as e:
            raise ValueError(f"{where}: bad layout {data['layout']!r} ({e})") from e
        if not all(isinstance(t, Mapping) and isinstance(t.get("name"), str) for t in data["targets"]):
            raise ValueError(f"{where}: every entry of targets needs a name, got {data['targets']!r}")
        try:
            values = None if data["values"] is None else RunValues.from_dict(data["values"])
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{where}: bad values {data['values']!r} ({e!r})") from e
        try:
            return cls(
                **{**data, "layout": layout, "values": values, "resumed_from": tuple(data.get("resumed_from", ()))}
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e


def check_format(data: Any, where: str, expected_format: str, expected_version: int) -> None:
    """Refuse a manifest of another directory kind or layout version, naming both."""
    if not isinstance(data, Mapping) or data.get("format") != expected_format:
        found = data.get("format") if isinstance(data, Mapping) else None
        raise ValueError(f"{where}: not an {expected_format} manifest (format {found!r})")
    if data.get("schema_version") != expected_version:
        raise ValueError(
            f"{where}: schema version {data.get('schema_version')}, this inrun_megatron reads {expected_version}"
        )


def write_manifest(run_dir: str | Path, manifest: Manifest) -> Manifest:
    """Write the run's manifest (atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True, default=str)
    atomic_write_bytes(run_dir / MANIFEST, text.encode())
    return manifest


def load_manifest_json(run_dir: str | Path) -> tuple[Path, Any]:
    """``run_dir``'s manifest as JSON, with its path; a missing or corrupt one is a clear error."""
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest; is {run_dir} an inrun_megatron run directory?")
    try:
        return path, json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt manifest ({e})") from e


def read_manifest(run_dir: str | Path) -> Manifest:
    """The checked manifest of a score dump."""
    path, data = load_manifest_json(run_dir)
    return Manifest.from_dict(data, str(path))


def scores_table(records: StepRecords, schema: pa.Schema = SCORE_SCHEMA) -> pa.Table:
    """The rows of a step as a table of ``schema`` (``SCORE_SCHEMA``, or ``DOCUMENT_SCHEMA`` for document rows)."""
    c = records.columns
    arrays = {name: c[name] for name in schema.names if name != "value"}
    arrays["value"] = records.values
    arrays["target"] = c["target"].astype(str)
    return pa.Table.from_pydict({name: arrays[name] for name in schema.names}, schema=schema)


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
    """Writes one data-parallel replica's score rows (and, on replica 0, the per-step table): the
    Parquet :class:`~inrun_megatron.step_result.ResultSink`.

    Rows are buffered and flushed every ``flush_every`` steps (and on :meth:`flush` and
    :meth:`close`), each flush one atomic Parquet part. Use it on one rank per DP replica (after
    the model-parallel reduction every rank of a replica holds the same rows), as that rank's
    scorer's sink or by calling :meth:`write` with each step's result.
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
        manifest = read_manifest(run_dir)
        self.run_id = manifest.run_id
        self.flush_every = flush_every
        self.scores = _PartStream(run_dir / "scores" / f"dp{dp_rank:05d}", SCORE_SCHEMA, self.run_id, resume_step)
        self.documents = (
            _PartStream(run_dir / "documents" / f"dp{dp_rank:05d}", DOCUMENT_SCHEMA, self.run_id, resume_step)
            if manifest.document_values
            else None
        )
        write_steps = dp_rank == 0 if write_steps is None else write_steps
        self.steps = _PartStream(run_dir / "steps", STEP_SCHEMA, self.run_id, resume_step) if write_steps else None
        self._since_flush = 0

    def write(self, result: StepResult) -> None:
        """Buffer the step's rows (and its per-step row per target on replica 0)."""
        self.scores.append(result.step, scores_table(result.records))
        if self.documents is not None:
            if result.documents is None:
                raise ValueError(
                    f"step {result.step} has no document rows; the manifest says the run records document values"
                )
            self.documents.append(result.step, scores_table(result.documents, DOCUMENT_SCHEMA))
        if self.steps is not None:
            self.steps.append(result.step, step_table(result))
        self._since_flush += 1
        if self._since_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        self.scores.flush()
        if self.documents is not None:
            self.documents.flush()
        if self.steps is not None:
            self.steps.flush()
        self._since_flush = 0

    def close(self) -> None:
        self.flush()

    @property
    def rows_written(self) -> int:
        """Score rows durably in this replica's stream (flushed parts, a resumed run's kept ones included)."""
        return self.scores.rows_written


def step_table(result: StepResult) -> pa.Table:
    """The step's rows of the ``steps`` stream (``STEP_SCHEMA``): one per score row, each target
    and each target's Adam-aware row where the step has one (its validation loss is its target's),
    docs/DESIGN.md §1.5."""
    targets = result.score_rows
    return pa.Table.from_pydict(
        {
            "step": [result.step] * len(targets),
            "target": targets,
            "lr": [result.lr] * len(targets),
            "clip_coef": [result.clip_coef] * len(targets),
            "skipped": [result.skipped] * len(targets),
            "validation_loss": [float(result.validation_losses[split_row_name(t)[0]]) for t in targets],
            "batch_dot": [float(result.batch_dots[t]) for t in targets],
        },
        schema=STEP_SCHEMA,
    )

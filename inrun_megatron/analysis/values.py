"""Merged values: a score dump compacted into accumulated per-sample values (``inrun-scores merge``).

Layout of a merged directory (``VALUES_FORMAT``; the source dump's manifest and score contract
are copied into its manifest)::

    OUT/manifest.json                    source manifest, bucket count, targets, samples per target
    OUT/values/part-b00003.parquet       one row per (target, sample id), see VALUE_SCHEMA
    OUT/per_step/part-b00003.parquet     (optional) one row per (target, sample id, step)
    OUT/steps.parquet                    one row per (step, target): row sums and the step table

Bucket ``b`` holds the sample ids with ``bucket_of(sample_id) == b``; every part is sorted by
target, then sample id (then step), so the files depend only on the dump and the bucket count,
never on how many processes merged it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from inrun_megatron.analysis.dump import DumpError, check_part_metadata, open_part_metadata, read_batches, read_table
from inrun_megatron.records import (
    SCORE_FIELDS,
    STEP_FIELDS,
    Column,
    Manifest,
    arrow_schema,
    check_format,
    describe_columns,
    load_manifest_json,
    pick_columns,
)

VALUES_FORMAT = "inrun_megatron.values"
#: Version of a merged directory's layout (manifest fields, part columns); bumped when either changes.
VALUES_SCHEMA_VERSION = 2

#: ``values/*.parquet``: one row per (target, sample id).
VALUE_FIELDS = (
    *pick_columns(SCORE_FIELDS, "target", "sample_id"),
    Column(
        "value",
        pa.float64(),
        "accumulated value phi = sum of value (lr * clip_coef * raw) over the sample's non-skipped steps",
    ),
    Column("raw", pa.float64(), "sum of raw over the sample's non-skipped steps"),
    Column("n_steps", pa.int32(), "non-skipped steps that trained on the sample"),
    Column("skipped_steps", pa.int32(), "skipped steps (no update) that drew the sample; they add nothing to value"),
    Column("first_step", pa.int64(), "first step that drew the sample (skipped or not)"),
    Column("last_step", pa.int64(), "last step that drew the sample (skipped or not)"),
    Column("n_tokens", pa.int64(), "loss tokens of the sample, summed over its non-skipped steps"),
)
VALUE_SCHEMA = arrow_schema(VALUE_FIELDS)
#: What the merged manifest records of them (``columns.values``).
VALUE_COLUMNS = describe_columns(VALUE_FIELDS)

#: ``per_step/*.parquet`` (optional): the dump's rows of each (target, sample id, step), sorted.
PER_STEP_FIELDS = pick_columns(SCORE_FIELDS, "target", "sample_id", "step", "value", "raw", "skipped", "n_tokens")
PER_STEP_SCHEMA = arrow_schema(PER_STEP_FIELDS)
PER_STEP_COLUMNS = describe_columns(PER_STEP_FIELDS)

#: ``steps.parquet``: one row per (step, target): sums of the dump's rows, then the dump's step table
#: (NaN / null where it has no row for the step).
STEP_TOTALS_FIELDS = (
    *pick_columns(STEP_FIELDS, "step", "target"),
    Column("rows", pa.int64(), "score rows of the step and target over all replicas"),
    Column("skipped_rows", pa.int64(), "of which in a skipped step"),
    Column(
        "raw_sum", pa.float64(), "sum of raw over the non-skipped rows: equals batch_dot by the efficiency identity"
    ),
    Column("raw_abs_sum", pa.float64(), "sum of |raw| over the non-skipped rows (the scale for the efficiency check)"),
    Column("value_sum", pa.float64(), "sum of value over the non-skipped rows"),
    *pick_columns(STEP_FIELDS, "lr", "clip_coef", "skipped", "validation_loss", "batch_dot"),
)
STEP_TOTALS_SCHEMA = arrow_schema(STEP_TOTALS_FIELDS)
STEP_TOTALS_COLUMNS = describe_columns(STEP_TOTALS_FIELDS)


def bucket_of(sample_ids: np.ndarray, n_buckets: int) -> np.ndarray:
    """Bucket of each sample id: murmur3's 64-bit finaliser, modulo ``n_buckets``.

    Spreads dense and strided id ranges evenly, and is the same in every process and on
    every machine, so that any number of ranks computes the same buckets.
    """
    x = np.asarray(sample_ids, dtype=np.int64).view(np.uint64).copy()
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return (x % np.uint64(n_buckets)).astype(np.int64)


#: Salt of the hash sample, so that it is independent of the merge buckets.
_SAMPLE_SALT = 0x5BD1E995


def hash_sample(sample_ids: np.ndarray, stride: int) -> np.ndarray:
    """Mask keeping about ``1/stride`` of the ids, the same ids wherever they occur."""
    if stride <= 1:
        return np.ones(len(sample_ids), dtype=bool)
    return bucket_of(np.asarray(sample_ids) ^ _SAMPLE_SALT, stride) == 0


def bucket_name(bucket: int) -> str:
    return f"part-b{bucket:05d}.parquet"


class MergedValues:
    """A merged directory, opened with every part's footer checked against the manifest."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, root: str | Path) -> MergedValues:
        root = Path(root)
        try:
            path, manifest = load_manifest_json(root)
            check_format(manifest, str(path), VALUES_FORMAT, VALUES_SCHEMA_VERSION)
        except (OSError, ValueError) as e:
            raise DumpError(str(e)) from e
        merged = cls(root, manifest)
        layouts = [("values", VALUE_SCHEMA)] + ([("per_step", PER_STEP_SCHEMA)] if merged.has_per_step else [])
        for folder, schema in layouts:
            for path in merged.parts(folder):
                if not path.exists():
                    raise DumpError(f"{path}: missing; the merged directory is incomplete, merge the run again")
                check_part_metadata(path, open_part_metadata(path), schema, merged.run_id, VALUES_SCHEMA_VERSION)
        return merged

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    @property
    def targets(self) -> list[str]:
        return list(self.manifest["targets"])

    @property
    def samples(self) -> dict[str, int]:
        """Number of distinct sample ids per target."""
        return dict(self.manifest["samples"])

    @property
    def has_per_step(self) -> bool:
        return bool(self.manifest["per_step"])

    @property
    def source_manifest(self) -> Manifest:
        """The manifest of the dump this directory was merged from."""
        return Manifest.from_dict(self.manifest["source_manifest"], f"{self.root / 'manifest.json'}: source_manifest")

    @property
    def source_dir(self) -> Path:
        return Path(self.manifest["source"]["path"])

    def parts(self, folder: str = "values") -> list[Path]:
        return [self.root / folder / bucket_name(b) for b in range(self.manifest["buckets"])]

    def target(self, name: str | None) -> str:
        """``name``, checked, or the only/first target when None."""
        if name is None:
            return self.targets[0]
        if name not in self.targets:
            raise DumpError(f"{self.root}: no target {name!r}; the run has targets {', '.join(self.targets)}")
        return name

    def batches(
        self, target: str | None = None, columns: list[str] | None = None, folder: str = "values"
    ) -> Iterator[pa.RecordBatch]:
        """Rows of ``folder`` (``values`` or ``per_step``) in bucket order, of one target or all."""
        wanted = None if columns is None else list(dict.fromkeys(["target", *columns]))
        for path in self.parts(folder):
            for batch in read_batches(path, wanted):
                if target is not None:
                    batch = batch.filter(pc.equal(batch.column("target"), target))
                if batch.num_rows:
                    yield batch if columns is None else batch.select(columns)

    def arrays(self, target: str, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(sample ids, values) of a target's finite values, sorted by sample id; with ``stride`` > 1
        only the hash sample of ``1/stride`` of the ids (the same ids in every run)."""
        ids, vals = [np.empty(0, np.int64)], [np.empty(0)]
        for batch in self.batches(target, ["sample_id", "value"]):
            sid, v = batch.column("sample_id").to_numpy(), batch.column("value").to_numpy()
            keep = hash_sample(sid, stride) & np.isfinite(v)
            ids.append(sid[keep])
            vals.append(v[keep])
        ids, vals = np.concatenate(ids), np.concatenate(vals)
        order = np.argsort(ids)
        return ids[order], vals[order]

    def step_totals(self) -> pa.Table:
        return read_table(self.root / "steps.parquet").replace_schema_metadata(None)

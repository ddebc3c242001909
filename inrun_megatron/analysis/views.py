"""Step-aware views of the values: what a sample did, apart from when it was seen (docs/DESIGN.md §1.6).

A sample's accumulated value ``φ(z) = Σ_t v_t(z)`` mixes what the sample did with when it was
seen: early in training, learning rates and gradients are large, so every sequence of an early
step has a large value, helpful or harmful. A *step view* compares each row with the other rows
of its own step and target (the global batch ``B_t``: every replica's non-skipped rows), and
averages that comparison over the steps that trained on the sample:

* ``accumulated``   ``Σ_t v_t(z)``; nats (the merged value, unchanged)
* ``step-scaled``   mean over t of ``v_t(z) / mean_{B_t} |v_t|``; unitless, sign kept
* ``step-z``        mean over t of ``(v_t(z) - mean_{B_t} v_t) / std_{B_t} v_t``; batch standard deviations
* ``step-rank``     mean over t of ``(midrank_{B_t}(v_t(z)) - 1/2) / |B_t|``; a fraction in (0, 1)

Out of core, in three passes with the memory bound of a merge (:mod:`.merge`): the rows of one
target are spilled into buckets by step (so that a step's rows meet), each step bucket is turned
into per-row view values and spilled into buckets by sample id, and each sample bucket is summed
(``merge``'s own reduction, in step order) and divided by the sample's non-skipped steps; a
sample no step trained on gets the view's neutral value. The output is a
directory in the merged format (:mod:`.values`) whose ``value`` column holds the view, so every
command reads it as it reads accumulated values.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inrun_megatron.analysis.merge import (
    SPILL_DTYPE,
    BucketFacts,
    accumulate,
    append_to_buckets,
    buckets_for,
    load_sorted,
)
from inrun_megatron.analysis.progress import SILENT, Progress
from inrun_megatron.analysis.values import (
    VALUE_COLUMNS,
    VALUE_SCHEMA,
    VALUES_SCHEMA_VERSION,
    MergedValues,
    bucket_name,
)
from inrun_megatron.records import MANIFEST, atomic_write_bytes, atomic_write_table, part_metadata


@dataclass(frozen=True)
class View:
    """One way of turning a sample's per-step values into one number per sample."""

    name: str
    unit: str
    #: Whether the sign still means helped (> 0) / hurt (< 0), so that ``--drop-negative`` makes sense.
    signed: bool
    definition: str
    #: The value of a sample that no step trained on (all its steps skipped): it did nothing, as its
    #: accumulated value 0 says; in a step view that is the middle of a batch.
    neutral: float = 0.0


VIEWS = {
    view.name: view
    for view in (
        View(
            "accumulated",
            "nats",
            True,
            "accumulated value phi = sum over the sample's non-skipped steps of value (lr * clip_coef * raw)",
        ),
        View(
            "step-scaled",
            "multiples of the step's mean |value|",
            True,
            "mean over the sample's non-skipped steps of value / (mean |value| over the step's rows of the target)",
        ),
        View(
            "step-z",
            "standard deviations of the step's values",
            False,
            "mean over the sample's non-skipped steps of (value - mean of the step's values) / (their standard"
            " deviation), over the step's rows of the target",
        ),
        View(
            "step-rank",
            "fraction of the step's rows (0..1, 0.5 = the step's median)",
            False,
            "mean over the sample's non-skipped steps of (midrank of value among the step's rows of the target"
            " - 1/2) / (rows of the step)",
            neutral=0.5,
        ),
    )
}
DEFAULT_VIEW = "accumulated"


def check_view(name: str) -> View:
    """The view called ``name``; an unknown name is a ValueError that lists the views."""
    if name not in VIEWS:
        raise ValueError(f"unknown view {name!r}; the views are {', '.join(VIEWS)} (docs/DESIGN.md §1.6)")
    return VIEWS[name]


def per_step_view(view: str, step: np.ndarray, value: np.ndarray, skipped: np.ndarray) -> np.ndarray:
    """The view's per-row quantity for rows of one target, every row of each present step included.

    Statistics of a step run over its non-skipped rows, sorted by value, so that they depend on
    the rows alone (not on their order or the bucket count); skipped rows get 0 (they changed
    nothing and are not counted in the sample's steps). A step whose values are all equal gives
    z = 0, one whose values are all 0 gives scaled = 0: it tells no sample from another.
    """
    out = np.zeros(len(value))
    trained = ~skipped
    if view == "accumulated" or not trained.any():
        return np.where(trained, value, 0.0)
    idx = np.flatnonzero(trained)
    order = idx[np.lexsort((value[idx], step[idx]))]  # by step, then value
    s, v = step[order], value[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    counts = np.diff(np.r_[starts, len(s)])
    group = np.repeat(np.arange(len(starts)), counts)
    n = counts[group].astype(float)
    if view == "step-rank":
        # midrank of each value within its step: ties share the mean of their ranks
        new_value = np.r_[True, (v[1:] != v[:-1]) | (s[1:] != s[:-1])]
        tie_start = np.flatnonzero(new_value)
        tie_len = np.diff(np.r_[tie_start, len(v)])
        first_rank = tie_start - starts[group[tie_start]] + 1
        midrank = np.repeat(first_rank + (tie_len - 1) / 2.0, tie_len)
        out[order] = (midrank - 0.5) / n
        return out
    if view == "step-scaled":
        scale = np.add.reduceat(np.abs(v), starts) / counts
        out[order] = np.divide(v, scale[group], out=np.zeros(len(v)), where=scale[group] > 0)
        return out
    if view == "step-z":
        mean = np.add.reduceat(v, starts) / counts
        std = np.sqrt(np.add.reduceat(np.square(v - mean[group]), starts) / counts)
        out[order] = np.divide(v - mean[group], std[group], out=np.zeros(len(v)), where=std[group] > 0)
        return out
    raise AssertionError(view)


def write_view(
    source: MergedValues,
    rows,
    view: str,
    target: str,
    out: Path,
    *,
    memory_bytes: int,
    progress: Progress = SILENT,
) -> MergedValues:
    """Write the ``view`` of one target as a merged-format directory ``out`` and open it.

    ``rows`` yields tables of per-step rows of the target (``ROW_FIELDS``), in any order;
    ``source`` is the run's merged values (its row count sizes the buckets, its step table is
    copied). Nothing of ``out`` is usable unless this returns; the caller removes it otherwise.
    """
    spec = check_view(view)
    n_rows = int(source.manifest["source"]["rows"])
    n_buckets = buckets_for(n_rows, memory_bytes)
    spill = out / "spill"
    by_step, by_sample = spill / "by-step", spill / "by-sample"
    by_step.mkdir(parents=True)
    for table in rows:  # (the reader shows its own progress)
        _append_by_step(
            {name: table.column(name).to_numpy(zero_copy_only=False) for name in ROW_FIELDS}, by_step, n_buckets
        )
    by_sample.mkdir()
    with progress.task(f"{view}: values within each step", n_buckets) as advance:
        for bucket in range(n_buckets):
            path = by_step / f"b{bucket:05d}.bin"
            if path.exists():
                r = np.fromfile(path, dtype=SPILL_DTYPE)
                path.unlink()
                columns = {name: r[name] for name in SPILL_DTYPE.names if name != "part"}
                columns["value"] = per_step_view(view, r["step"], r["value"], r["skipped"])
                append_to_buckets(columns, 0, by_sample, n_buckets)
            advance(1)
    metadata = part_metadata(source.run_id, VALUES_SCHEMA_VERSION)
    (out / "values").mkdir()
    samples = 0
    with progress.task(f"{view}: per sample", n_buckets) as advance:
        for bucket in range(n_buckets):
            path = by_sample / f"b{bucket:05d}.bin"
            table = VALUE_SCHEMA.empty_table()
            if path.exists():
                table = accumulate(target, load_sorted([path]), BucketFacts())
                path.unlink()
                if view != "accumulated":
                    n_steps = table.column("n_steps").to_numpy()
                    summed = table.column("value").to_numpy()
                    mean = np.divide(summed, n_steps, out=np.full(len(summed), spec.neutral), where=n_steps > 0)
                    table = table.set_column(table.schema.get_field_index("value"), "value", [mean])
                samples += table.num_rows
            atomic_write_table(out / "values" / bucket_name(bucket), table.replace_schema_metadata(metadata))
            advance(1)
    shutil.rmtree(spill)
    atomic_write_table(out / "steps.parquet", source.step_totals().replace_schema_metadata(metadata))
    manifest = {
        **source.manifest,
        "buckets": n_buckets,
        "per_step": False,
        "targets": [target],
        "samples": {target: samples},
        "view": {"name": spec.name, "unit": spec.unit, "definition": spec.definition},
        "columns": {**source.manifest["columns"], "values": {**VALUE_COLUMNS, "value": spec.definition}},
    }
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    return MergedValues.open(out)


#: Columns of the per-step rows a view reads.
ROW_FIELDS = ("sample_id", "step", "value", "raw", "n_tokens", "skipped")


def _append_by_step(columns: dict[str, np.ndarray], directory: Path, n_buckets: int) -> None:
    """Append rows to the spill file of their step's bucket (``step mod n_buckets``: steps are dense)."""
    bucket = np.mod(columns["step"], n_buckets)
    for b in np.unique(bucket).tolist():
        mine = bucket == b
        rows = np.zeros(int(mine.sum()), SPILL_DTYPE)
        for name, column in columns.items():
            rows[name] = column[mine]
        with open(directory / f"b{b:05d}.bin", "ab") as f:
            rows.tofile(f)

"""The ``inrun-scores`` commands as functions: each takes its inputs and returns a :class:`Report`.

Values follow the score contract of the dump (``SCORE_CONTRACT``): ``value = lr * clip_coef *
raw``, positive = the sample lowered the validation loss; the accumulated value of a sample is
the sum over its non-skipped steps. Every report repeats the sign convention.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from inrun_megatron.analysis.documents import curate_documents, document_parts, span_identity
from inrun_megatron.analysis.dump import DumpError, Problem, ScoreDump
from inrun_megatron.analysis.inputs import Scores, describe_samples, sources_of
from inrun_megatron.analysis.merge import DEFAULT_MEMORY, merge
from inrun_megatron.analysis.progress import SILENT, Progress
from inrun_megatron.analysis.report import Report, Table, plain, written
from inrun_megatron.analysis.stats import (
    CORRELATION_CAP,
    distribution,
    overlap,
    rank_correlations,
    sample_stride,
    top_k,
)
from inrun_megatron.analysis.views import DEFAULT_VIEW, VIEWS, check_view


def sign_of(scores: Scores) -> str:
    """The sign convention of the run's score contract (shown with every answer about values)."""
    return scores.manifest.contract.get("sign", "missing from the manifest's score contract")


#: Tolerance of the efficiency identity, relative to the step's sum of |raw| (fp32 scores are
#: exact to about 1e-4 of their scale, docs/DESIGN.md §1.3).
EFFICIENCY_RTOL = 1e-4


# ---------------------------------------------------------------------------------------------
# summary and verify


def step_facts(totals: pa.Table) -> dict:
    """Steps recorded, skipped and missing, from a merged step-totals table."""
    rows = pc.sum(totals.column("rows")).as_py() if totals.num_rows else 0
    by_step = totals.group_by("step").aggregate([("rows", "sum"), ("skipped_rows", "sum"), ("skipped", "any")])
    step = by_step.column("step").to_numpy()
    recorded = step[by_step.column("rows_sum").to_numpy() > 0]
    skipped_rows = by_step.column("skipped_rows_sum").to_numpy()
    flagged = pc.fill_null(by_step.column("skipped_any"), False).to_numpy(zero_copy_only=False)
    skipped = np.sort(step[flagged | (skipped_rows > 0)])
    if not len(recorded):
        return {"count": 0, "rows": rows, "first": None, "last": None, "skipped": [], "missing": []}
    missing = np.setdiff1d(np.arange(step.min(), step.max() + 1), recorded)
    return {
        "count": len(recorded),
        "rows": rows,
        "first": int(recorded.min()),
        "last": int(recorded.max()),
        "skipped": skipped.tolist(),
        "missing": missing.tolist(),
    }


def efficiency(totals: pa.Table, target: str, rtol: float = EFFICIENCY_RTOL) -> dict:
    """The efficiency identity per step: sum of raw over all rows of a step = batch_dot (<g_t, G_t>)."""
    t = totals.filter(pc.equal(totals.column("target"), target))
    dot = t.column("batch_dot").to_numpy(zero_copy_only=False).astype(float)
    skipped = pc.fill_null(t.column("skipped"), False).to_numpy(zero_copy_only=False)
    rows = t.column("rows").to_numpy()
    applied = ~skipped & (rows > 0)
    measured = np.isfinite(dot) & applied
    raw = t.column("raw_sum").to_numpy()[measured]
    scale = t.column("raw_abs_sum").to_numpy()[measured]
    err = np.abs(raw - dot[measured]) / np.where(scale > 0, scale, 1.0)
    steps_all = t.column("step").to_numpy()
    steps = steps_all[measured]
    lr_clip = t.column("lr").to_numpy(zero_copy_only=False) * t.column("clip_coef").to_numpy(zero_copy_only=False)
    return {
        "steps_measured": int(measured.sum()),
        "steps_applied": int(applied.sum()),
        "unmeasured": steps_all[applied & ~measured].tolist(),
        "raw_sum": float(raw.sum()),
        "batch_dot_sum": float(dot[measured].sum()),
        "value_sum": float(t.column("value_sum").to_numpy()[measured].sum()),
        "lr_clip_batch_dot_sum": float((lr_clip[measured] * dot[measured]).sum()),
        "max_rel_error": float(err.max()) if len(err) else None,
        "worst_step": int(steps[err.argmax()]) if len(err) else None,
        "violations": steps[err > rtol].tolist(),
        "rtol": rtol,
    }


def summary(scores: Scores) -> Report:
    values = scores.values()
    manifest = scores.manifest
    totals = values.step_totals()
    steps = step_facts(totals)
    run = {
        "path": str(scores.path),
        "run_id": values.run_id,
        "rows": values.manifest["source"]["rows"],
        "parts": values.manifest["source"]["parts"],
        "replicas": len(values.manifest["source"]["replicas"]),
        "targets": values.targets,
        "layout": asdict(manifest.layout),
    }
    targets = {}
    for target in values.targets:
        dist = distribution(values.batches(target, ["sample_id", "value"]), values.samples[target])
        targets[target] = {
            "samples": values.samples[target],
            "value": asdict(dist),
            "efficiency": efficiency(totals, target),
        }
    tables = [
        Table(
            "run",
            ["", ""],
            [[k, json.dumps(v) if isinstance(v, (dict, list)) else v] for k, v in run.items()]
            + [
                ["steps", f"{steps['count']} ({steps['first']}..{steps['last']})"],
                ["skipped steps", _ids(steps["skipped"])],
                ["missing steps", _ids(steps["missing"])],
            ],
        ),
        Table(
            "accumulated value per sample (nats)",
            ["target", "samples", "total", "mean", "std", "min", "median", "max", "negative"],
            [_distribution_row(t, d["samples"], d["value"]) for t, d in targets.items()],
        ),
        Table(
            "efficiency identity: sum of raw over a step's rows = <g_t, G_t> (batch_dot)",
            ["target", "steps measured", "sum raw", "sum batch_dot", "max rel. error", "worst step", "violations"],
            [
                [
                    t,
                    e["steps_measured"],
                    e["raw_sum"],
                    e["batch_dot_sum"],
                    e["max_rel_error"],
                    e["worst_step"],
                    len(e["violations"]),
                ]
                for t, d in targets.items()
                for e in [d["efficiency"]]
            ],
        ),
    ]
    notes = [
        f"quantiles of {t} from a hash sample of {d['value']['sampled']} samples"
        for t, d in targets.items()
        if d["value"]["sampled"]
    ]
    data = {"sign": sign_of(scores), "run": run, "steps": steps, "targets": targets}
    return Report(data, tables, notes + scores.notes)


def verify(
    path: str | Path,
    *,
    rtol: float = EFFICIENCY_RTOL,
    memory_bytes: int = DEFAULT_MEMORY,
    work_dir: str | Path | None = None,
    progress: Progress = SILENT,
) -> Report:
    """Every problem of a dump: files (footers, schema, run ids, overlaps) and then its rows."""
    dump, problems = ScoreDump.inspect(path)
    notes, checked, span_parts = [], {}, []
    if dump is not None:
        debris = list(dump.debris)
        if dump.manifest.document_values:
            span_parts = document_parts(dump.root, dump.run_id, problems, debris)
        notes += [f"{p}: crash debris (*.tmp), never data; safe to delete" for p in debris]
    if dump is not None and not problems:
        found = merge(
            dump, None, memory_bytes=memory_bytes, progress=progress, allow_duplicates=True, work_dir=work_dir
        )
        problems += _row_problems(dump, found, rtol)
        checked = {"rows": found.rows, "parts": found.parts, "replicas": len(dump.replicas), "targets": found.targets}
        checked |= {"steps": step_facts(found.step_totals)["count"], "duplicates": found.duplicates}
        checked["efficiency"] = {target: efficiency(found.step_totals, target, rtol) for target in found.targets}
        for target, e in checked["efficiency"].items():
            if e["unmeasured"]:
                notes.append(
                    f"target {target!r}: no <g_t, G_t> (batch_dot) recorded for steps {_ids(e['unmeasured'])};"
                    " the efficiency identity is unchecked there"
                )
        if dump.manifest.document_values:
            checked["documents"] = span_identity(dump, span_parts, rtol)
            problems += _span_problems(dump.root / "documents", checked["documents"], rtol)
    elif problems:
        notes.append(
            "row-level checks (duplicates, missing steps, efficiency, document spans) run once the file problems are"
            " fixed"
        )
    data = {"path": str(path), "ok": not problems, "problems": [str(p) for p in problems], "checked": checked}
    table = Table(f"verify {path}", ["file", "problem"], [[str(p.path), p.message] for p in problems])
    tables = [table]
    if not problems:
        rows = [[k, v] for k, v in checked.items() if k not in ("efficiency", "documents")]
        tables = [Table(f"verify {path}: OK", ["checked", ""], rows)]
    if checked:
        tables.append(_efficiency_table(checked["efficiency"], rtol))
    if "documents" in checked:
        tables.append(_span_table(checked["documents"], rtol))
    return Report(data, tables, notes, ok=not problems)


def _efficiency_table(by_target: dict, rtol: float) -> Table:
    """Per target: steps whose sum of raw was checked against <g_t, G_t>, and the worst residual."""
    return Table(
        f"efficiency identity: sum of raw over every replica's rows of a step = <g_t, G_t> (batch_dot),"
        f" residual relative to the step's sum of |raw|, tolerance {rtol:g}",
        ["target", "steps checked", "of applied steps", "worst residual", "at step", "violations"],
        [
            [t, e["steps_measured"], e["steps_applied"], e["max_rel_error"], e["worst_step"], len(e["violations"])]
            for t, e in by_target.items()
        ],
    )


def _span_table(by_target: dict, rtol: float) -> Table:
    """Per target: sequences whose document spans were summed against their raw score, and the worst residual."""
    return Table(
        f"document spans: the spans of a sequence sum to its raw score (docs/DESIGN.md §1.8), residual relative"
        f" to the larger of the sequence's |raw| and its spans' sum of |raw|, tolerance {rtol:g}",
        ["target", "sequences checked", "worst residual", "at step", "sample", "violations"],
        [
            [t, e["sequences"], e["max_rel_error"], e["worst_step"], e["worst_sample"], e["violating_sequences"]]
            for t, e in by_target.items()
        ],
    )


def _span_problems(directory: Path, by_target: dict, rtol: float) -> list[Problem]:
    return [
        Problem(
            directory,
            f"document spans do not sum to the sequence's raw score for target {target!r} at steps"
            f" {_ids(e['violations'])} (failing sequences: {e['violating_sequences']}; worst relative error"
            f" {e['max_rel_error']:.3g} at step {e['worst_step']}, sample {e['worst_sample']}; tolerance {rtol:g} of"
            " the larger of the sequence's |raw| and its spans' sum of |raw|): span rows of those sequences are"
            " missing or wrong",
        )
        for target, e in by_target.items()
        if e["violations"]
    ]


def _row_problems(dump: ScoreDump, found, rtol: float) -> list[Problem]:
    root = dump.root
    problems = [Problem(root, f"duplicate (step, sample, target) row: {e}") for e in found.duplicate_examples]
    if found.duplicates > len(found.duplicate_examples):
        problems.append(Problem(root, f"{found.duplicates} duplicate rows in all"))
    problems += [Problem(Path(line.split(": ", 1)[0]), line.split(": ", 1)[1]) for line in found.out_of_span]
    steps = step_facts(found.step_totals)
    if steps["missing"]:
        problems.append(Problem(root / "scores", f"steps with no score rows: {_ids(steps['missing'])}"))
    everything = np.unique(np.concatenate(list(found.steps_by_replica.values())))
    for replica, present in found.steps_by_replica.items():
        absent = np.setdiff1d(everything, present)
        if len(absent):
            problems.append(Problem(root / "scores" / replica, f"no rows for steps {_ids(absent.tolist())}"))
    totals = found.step_totals
    if dump.step_parts:
        unlisted = np.setdiff1d(everything, totals.filter(pc.is_valid(totals.column("lr"))).column("step").to_numpy())
        if len(unlisted):
            problems.append(Problem(root / "steps", f"no step-table row for steps {_ids(unlisted.tolist())}"))
    mixed = totals.filter(
        pc.and_(pc.greater(totals.column("skipped_rows"), 0), pc.less(totals.column("skipped_rows"), totals["rows"]))
    )
    for step in np.unique(mixed.column("step").to_numpy()).tolist():
        problems.append(Problem(root, f"step {step} is skipped in some rows and not in others"))
    for target in found.targets:
        e = efficiency(totals, target, rtol)
        if e["violations"]:
            problems.append(
                Problem(
                    root,
                    f"efficiency identity fails for target {target!r} at steps {_ids(e['violations'])} (sum of raw"
                    f" vs batch_dot, worst relative error {e['max_rel_error']:.3g} at step {e['worst_step']},"
                    f" tolerance {rtol:g} of the step's sum of |raw|): rows of those steps are missing or wrong",
                )
            )
    return problems


def _distribution_row(target: str, samples: int, v: dict) -> list:
    quantile = v["quantiles"].get("p50")
    return [
        target,
        samples,
        v["total"],
        v["mean"],
        v["std"],
        v["minimum"],
        quantile,
        v["maximum"],
        f"{v['negative']:.1%}",
    ]


def _ids(ids: list[int], shown: int = 10) -> str:
    if not ids:
        return "none"
    return ", ".join(map(str, ids[:shown])) + (f" ... ({len(ids)} in all)" if len(ids) > shown else "")


# ---------------------------------------------------------------------------------------------
# per-sample questions


def top(
    scores: Scores,
    *,
    k: int = 20,
    bottom: bool = False,
    target: str | None = None,
    text_chars: int = 200,
    view: str = DEFAULT_VIEW,
):
    """The ``k`` samples with the highest (lowest) values in ``view``, with source, documents and text."""
    spec = check_view(view)
    values = scores.view(view, target)
    target = values.target(target)
    columns = ["sample_id", "value", "n_steps", "first_step", "last_step"]
    best = top_k(values.batches(target, columns), k, bottom)
    if best is None:
        raise DumpError(f"{scores.path}: no finite values for target {target!r}")
    rows = best.to_pylist()
    index = scores.index()
    if index is not None:
        described = describe_samples(index, best.column("sample_id").to_numpy(), text_chars)
        for row in rows:
            row.update(described[row["sample_id"]])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    columns = ["rank", *columns] + (["source", "document_ids", "text"] if index is not None else [])
    which = "lowest" if bottom else "highest"
    table = Table(
        f"{len(rows)} {which} values, view {view} ({spec.unit}), target {target!r}",
        columns,
        [[_short(row[c]) if c == "text" else row[c] for c in columns] for row in rows],
    )
    data = {"target": target, "order": which, "sign": sign_of(scores), "view": asdict(spec), "samples": rows}
    return Report(data, [table], scores.notes)


def _short(text: str, chars: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= chars else text[: chars - 1] + "…"


def by_source(scores: Scores, *, target: str | None = None, view: str = DEFAULT_VIEW) -> Report:
    """Values (in ``view``) per source dataset: the paper's per-domain view."""
    spec = check_view(view)
    values = scores.view(view, target)
    target = values.target(target)
    index = scores.index()
    if index is None:
        raise DumpError(f"{scores.path}: by-source needs the run's sample index; {scores.notes[-1]}")
    sums: dict[str, np.ndarray] = {}  # source -> [samples, total, positive, negative, positive sum, negative sum]
    with scores.progress.task("looking up sources", values.samples[target]) as advance:
        for batch in values.batches(target, ["sample_id", "value"]):
            v = batch.column("value").to_numpy()
            names, which = np.unique(sources_of(index, batch.column("sample_id").to_numpy()), return_inverse=True)
            for i, name in enumerate(names.tolist()):
                x = v[which == i]
                stats = [len(x), x.sum(), (x > 0).sum(), (x < 0).sum(), x[x > 0].sum(), x[x < 0].sum()]
                sums[name] = sums.get(name, np.zeros(6)) + np.array(stats, dtype=float)
            advance(batch.num_rows)
    total = sum(abs(s[1]) for s in sums.values()) or 1.0
    rows = [
        {
            "source": name,
            "samples": int(s[0]),
            "sum": s[1],
            "mean": s[1] / s[0],
            "positive": s[2] / s[0],
            "negative": s[3] / s[0],
            "positive_sum": s[4],
            "negative_sum": s[5],
            "share_of_abs_total": abs(s[1]) / total,
        }
        for name, s in sorted(sums.items(), key=lambda item: -item[1][1])
    ]
    columns = ["source", "samples", "sum", "mean", "positive", "negative", "positive_sum", "negative_sum"]
    table = Table(
        f"values per source, view {view} ({spec.unit}), target {target!r}",
        columns,
        [[f"{r[c]:.1%}" if c in ("positive", "negative") else r[c] for c in columns] for r in rows],
    )
    data = {"target": target, "sign": sign_of(scores), "view": asdict(spec), "sources": rows}
    return Report(data, [table], scores.notes)


def trajectory(scores: Scores, sample_ids: list[int], *, target: str | None = None) -> Report:
    """Per-step value and running total of some samples."""
    target = _target_of(scores, target)
    wanted = np.array(sorted(set(sample_ids)), dtype=np.int64)
    tables = [t for t in scores.rows(target, wanted)]
    rows = pa.concat_tables(tables).sort_by([("sample_id", "ascending"), ("step", "ascending")]) if tables else None
    samples = {}
    for sid in wanted.tolist():
        mine = rows.filter(pc.equal(rows.column("sample_id"), sid)) if rows is not None else None
        if mine is None or not mine.num_rows:
            raise DumpError(f"{scores.path}: sample {sid} has no rows for target {target!r}")
        value = np.where(mine.column("skipped").to_numpy(zero_copy_only=False), 0.0, mine.column("value").to_numpy())
        samples[sid] = {
            "step": mine.column("step").to_pylist(),
            "value": mine.column("value").to_pylist(),
            "raw": mine.column("raw").to_pylist(),
            "skipped": mine.column("skipped").to_pylist(),
            "cumulative": np.cumsum(value).tolist(),
        }
    table = Table(
        f"trajectories, target {target!r}",
        ["sample_id", "step", "value", "raw", "skipped", "cumulative"],
        [
            [sid, *row]
            for sid, s in samples.items()
            for row in zip(s["step"], s["value"], s["raw"], s["skipped"], s["cumulative"])
        ],
    )
    return Report({"target": target, "sign": sign_of(scores), "samples": samples}, [table], scores.notes)


def source_curves(scores: Scores, *, target: str | None = None) -> Report:
    """Total value per source and step, and its running total: which sources helped when."""
    target = _target_of(scores, target)
    index = scores.index()
    if index is None:
        raise DumpError(f"{scores.path}: per-source curves need the run's sample index; {scores.notes[-1]}")
    parts = []
    for table in scores.rows(target):
        skipped = table.column("skipped").to_numpy(zero_copy_only=False)
        value = np.where(skipped, 0.0, table.column("value").to_numpy())
        source = sources_of(index, table.column("sample_id").to_numpy())
        part = pa.table({"step": table.column("step"), "source": source, "value": value})
        parts.append(part.group_by(["step", "source"], use_threads=False).aggregate([("value", "sum")]))
    if not parts:
        raise DumpError(f"{scores.path}: no rows for target {target!r}")
    grouped = pa.concat_tables(parts).group_by(["source", "step"], use_threads=False).aggregate([("value_sum", "sum")])
    grouped = grouped.sort_by([("source", "ascending"), ("step", "ascending")])
    curves = {}
    for name in pc.unique(grouped.column("source")).to_pylist():
        mine = grouped.filter(pc.equal(grouped.column("source"), name))
        value = mine.column("value_sum_sum").to_numpy()
        curves[name] = {
            "step": mine.column("step").to_pylist(),
            "value": value.tolist(),
            "cumulative": np.cumsum(value).tolist(),
        }
    table = Table(
        f"value per source and step, target {target!r}",
        ["source", "steps", "first step", "last step", "total"],
        [[n, len(c["step"]), c["step"][0], c["step"][-1], c["cumulative"][-1]] for n, c in curves.items()],
    )
    return Report({"target": target, "sign": sign_of(scores), "sources": curves}, [table], scores.notes)


def _target_of(scores: Scores, target: str | None) -> str:
    if scores.merged is not None:
        return scores.merged.target(target)
    if target is not None:
        return target
    names = scores.dump.steps_table().column("target").to_pylist() or [t["name"] for t in scores.manifest.targets]
    if not names:
        raise DumpError(f"{scores.path}: cannot tell the targets without a step table; pass --target")
    return sorted(set(names), key=names.index)[0]


# ---------------------------------------------------------------------------------------------
# two runs


def compare(
    a: Scores,
    b: Scores,
    *,
    target_a: str | None = None,
    target_b: str | None = None,
    k: int = 100,
    view: str = DEFAULT_VIEW,
):
    """Rank agreement of two runs' (or two targets' or values') values in ``view``, on the samples both scored."""
    spec = check_view(view)
    ta, tb = a.values().target(target_a), b.values().target(target_b or target_a)
    if a.values().root == b.values().root and ta == tb:
        raise DumpError("compare needs two runs, or two targets or values of one run (--target-b, --value-b)")
    va, vb = a.view(view, ta), b.view(view, tb)
    stride = sample_stride(max(va.samples[ta], vb.samples[tb]), CORRELATION_CAP)
    ids_a, val_a = va.arrays(ta, stride)
    ids_b, val_b = vb.arrays(tb, stride)
    common, ia, ib = np.intersect1d(ids_a, ids_b, assume_unique=True, return_indices=True)
    data = {
        "a": {"path": str(a.path), "target": ta, "samples": va.samples[ta]},
        "b": {"path": str(b.path), "target": tb, "samples": vb.samples[tb]},
        "view": asdict(spec),
        "common_samples": len(common) * stride,  # an estimate when sampled
        "sampled": len(common) if stride > 1 else None,
        **rank_correlations(val_a[ia], val_b[ib]),
        "overlap": {},
    }
    for name, bottom in (("top", False), ("bottom", True)):
        best_a = top_k(va.batches(ta, ["sample_id", "value"]), k, bottom).column("sample_id").to_numpy()
        best_b = top_k(vb.batches(tb, ["sample_id", "value"]), k, bottom).column("sample_id").to_numpy()
        data["overlap"][name] = {
            str(n): overlap(best_a[:n], best_b[:n]) for n in sorted({x for x in (10, 100, 1000, k) if x <= k})
        }
    rows = [
        ["Spearman rho", data["spearman"]],
        ["Kendall tau-b", data["kendall_tau_b"]],
        ["samples in both", f"~{data['common_samples']}" if stride > 1 else data["common_samples"]],
    ]
    rows += [[f"{name}-{n} overlap", f"{x:.1%}"] for name, o in data["overlap"].items() for n, x in o.items()]
    notes = [*a.notes, *b.notes]
    if stride > 1:
        notes.append(f"correlations on a hash sample of {len(common)} common samples; overlaps are exact")
    title = f"{a.path} [{ta}] vs {b.path} [{tb}], view {view}"
    return Report(plain(data), [Table(title, ["", ""], rows)], notes)


# ---------------------------------------------------------------------------------------------
# files for other tools


def export(
    scores: Scores,
    out: str | Path,
    *,
    fmt: str,
    per_step: bool = False,
    target: str | None = None,
    with_source: bool = False,
) -> Report:
    """Accumulated values (or per-step rows) as CSV, Parquet or JSON lines, streamed."""
    index = scores.index() if with_source else None
    if with_source and index is None:
        raise DumpError(f"{scores.path}: --with-source needs the run's sample index; {scores.notes[-1]}")
    if per_step:
        tables = scores.rows(target)
    else:
        values = scores.values()
        tables = (pa.Table.from_batches([b]) for b in values.batches(None if target is None else values.target(target)))
    rows = 0
    with written(Path(out)) as tmp:
        writer = None
        for table in tables:
            if index is not None:
                table = table.append_column("source", pa.array(sources_of(index, table["sample_id"].to_numpy())))
            table = table.replace_schema_metadata(None)
            if writer is None:
                writer = _writer(tmp, fmt, table.schema)
            writer.write_table(table)
            rows += table.num_rows
        if writer is None:
            raise DumpError(f"{scores.path}: nothing to export for target {target!r}")
        writer.close()
    what = "per-step rows" if per_step else "accumulated values"
    data = {"out": str(out), "format": fmt, "rows": rows, "what": what}
    return Report(data, [Table(f"exported {what}", ["file", "format", "rows"], [[str(out), fmt, rows]])], scores.notes)


class _JsonLines:
    def __init__(self, path: Path):
        self.file = open(path, "w")  # noqa: SIM115 (closed by close(), like the pyarrow writers)

    def write_table(self, table: pa.Table) -> None:
        for row in table.to_pylist():
            self.file.write(json.dumps(plain(row)) + "\n")

    def close(self) -> None:
        self.file.close()


def _writer(path: Path, fmt: str, schema: pa.Schema):
    if fmt == "parquet":
        return pq.ParquetWriter(path, schema, compression="zstd")
    if fmt == "csv":
        return pacsv.CSVWriter(path, schema)
    if fmt == "jsonl":
        return _JsonLines(path)
    raise ValueError(f"unknown export format {fmt!r}: csv, parquet or jsonl")


def curate(
    scores: Scores,
    out: str | Path,
    *,
    target: str | None = None,
    drop_negative: bool = False,
    drop_fraction: float = 0.0,
    dropped_out: str | Path | None = None,
    view: str = DEFAULT_VIEW,
    by_document: bool = False,
) -> Report:
    """Sample ids to keep for retraining: without the harmful (negative) and/or the lowest-valued samples
    (lowest in ``view``; ``drop_negative`` only in a view whose sign means helped/hurt).

    As in the paper's data-curation study, ids never scored in the run are not listed: the
    list says which *scored* samples to keep. Written in merge order (unique ids), one per line.
    ``by_document``: the same rule on the run's document values (docs/DESIGN.md §2.9), keeping and
    dropping (source, document id) pairs instead of packed sequences (:func:`curate_documents`).
    """
    if not drop_negative and not drop_fraction:
        raise ValueError("say what to drop: --drop-negative and/or --drop-fraction F")
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError(f"--drop-fraction must be in [0, 1), got {drop_fraction}")
    spec = check_view(view)
    if drop_negative and not spec.signed:
        signed = ", ".join(name for name, v in VIEWS.items() if v.signed)
        raise ValueError(
            f"--drop-negative needs a view whose sign means helped or hurt ({signed}); in view {view} a low value"
            " means worse than the step's other samples, use --drop-fraction"
        )
    if by_document:
        return curate_documents(
            scores,
            out,
            target=target,
            drop_negative=drop_negative,
            drop_fraction=drop_fraction,
            dropped_out=dropped_out,
            view=view,
        )
    values = scores.view(view, target)
    target = values.target(target)
    threshold, ties = -np.inf, np.empty(0, dtype=np.int64)
    n_drop = round(drop_fraction * values.samples[target])
    if n_drop:
        lowest = top_k(values.batches(target, ["sample_id", "value"]), n_drop, bottom=True)
        lowest_values = lowest.column("value").to_numpy()
        threshold = lowest_values[-1]
        ties = lowest.column("sample_id").to_numpy()[lowest_values == threshold]
    kept = dropped = 0
    kept_value = dropped_value = 0.0
    with ExitStack() as stack:
        keep_file = stack.enter_context(open(stack.enter_context(written(Path(out))), "w"))
        drop_file = None
        if dropped_out is not None:
            drop_file = stack.enter_context(open(stack.enter_context(written(Path(dropped_out))), "w"))
        for batch in values.batches(target, ["sample_id", "value"]):
            sid, v = batch.column("sample_id").to_numpy(), batch.column("value").to_numpy()
            drop = (v < threshold) | ((v == threshold) & np.isin(sid, ties))
            if drop_negative:
                drop |= v < 0
            keep_file.write("".join(f"{x}\n" for x in sid[~drop].tolist()))
            if drop_file is not None:
                drop_file.write("".join(f"{x}\n" for x in sid[drop].tolist()))
            kept += int((~drop).sum())
            dropped += int(drop.sum())
            kept_value += float(v[~drop].sum())
            dropped_value += float(v[drop].sum())
    data = {
        "granularity": "sequence",
        "target": target,
        "sign": sign_of(scores),
        "view": asdict(spec),
        "kept": kept,
        "dropped": dropped,
        "kept_value": kept_value,
        "dropped_value": dropped_value,
        "keep_ids": str(out),
        "drop_ids": None if dropped_out is None else str(dropped_out),
    }
    table = Table(
        f"curation by view {view} ({spec.unit}), target {target!r}",
        ["", "samples", "total value"],
        [["kept", kept, kept_value], ["dropped", dropped, dropped_value]],
    )
    notes = [f"kept sample ids written to {out}, one per line", *scores.notes]
    return Report(data, [table], notes)

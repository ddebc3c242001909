"""``inrun-scores by-document``: document values (docs/DESIGN.md §2.9) per document and per source.

A run with document values on (``ScoringConfig.document_eod``; the pretraining config's
``scoring.document_values``) records, next to each sequence's row, one row per document span of the
sequence (``RUN/documents/``). The run's sample index turns (sample id, span) into (source, document
id): span ``k`` of a sample is its ``k``-th document (``document_tokens`` of the sample map, less the
last token of the sample, which is only a label). Every row is checked against the map before
anything is summed: a span whose length differs from its document's means the end-of-document
tokens the scorer cut at are not the documents the map knows.

A document's value is the sum of its spans' values over every sequence it was cut into and every
step (``accumulated``), or, in a step view (docs/DESIGN.md §1.6), the mean over its non-skipped span
rows of each row's view among the step's span rows. The rows of the chosen score row are read into
memory (about 60 bytes a row).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from inrun_megatron.analysis.dump import DumpError, Part, Problem, ScoreDump, read_table, stream_parts
from inrun_megatron.analysis.inputs import Scores
from inrun_megatron.analysis.report import Report, Table, written
from inrun_megatron.analysis.views import DEFAULT_VIEW, check_view, per_step_view
from inrun_megatron.records import DOCUMENT_SCHEMA

ROW_COLUMNS = ["step", "sample_id", "span", "value", "skipped", "span_tokens"]


def check_document_run(scores: Scores, command: str):
    """The run's sample index, after checking that the run recorded document values and has the sample
    map that turns span rows into documents: what a document command needs, refused before any work."""
    if not scores.manifest.document_values:
        raise DumpError(
            f"{scores.path}: {command} needs document values and the run recorded none; turn them on with the"
            " pretraining config's scoring.document_values (ScoringConfig.document_eod), docs/DESIGN.md §2.9"
        )
    index = scores.index()
    if index is None:
        raise DumpError(f"{scores.path}: {command} needs the run's sample index; {scores.notes[-1]}")
    return index


def document_rows(scores: Scores, target: str) -> pa.Table:
    """Every document row of one score row (``target``), from the run directory's ``documents`` stream."""
    if not scores.manifest.document_values:
        raise DumpError(
            f"{scores.path}: the run recorded no document values; turn them on with the pretraining config's"
            " scoring.document_values (ScoringConfig.document_eod), docs/DESIGN.md §2.9"
        )
    directory = scores.run_dir / "documents"
    problems: list[Problem] = []
    parts = document_parts(scores.run_dir, scores.manifest.run_id, problems, [])
    if problems:
        raise DumpError(str(problems[0]))
    table = ds.dataset([str(p.path) for p in parts], format="parquet").to_table(columns=["target", *ROW_COLUMNS])
    table = table.filter(pc.equal(table.column("target"), target))
    if not table.num_rows:
        raise DumpError(f"{directory}: no document rows of {target!r}")
    return table


def document_parts(root: Path, run_id: str, problems: list[Problem], debris: list[Path]) -> list[Part]:
    """The parts of every replica's ``documents`` stream of the run directory ``root`` (``docs/DESIGN.md``
    §2.8), each checked against ``DOCUMENT_SCHEMA`` and ``run_id`` as the score parts are; what is wrong
    goes to ``problems`` (a missing ``documents/`` included: the manifest says the run recorded it)."""
    directory = root / "documents"
    replicas = sorted(r for r in directory.iterdir() if not r.name.startswith(".")) if directory.is_dir() else []
    if not replicas:
        problems.append(Problem(directory, "missing; the manifest says the run recorded document values"))
    parts = []
    for replica in replicas:
        parts += stream_parts(replica, replica.name, DOCUMENT_SCHEMA, run_id, problems, debris)
    return parts


#: Columns of a score row and of a document row that the span identity compares.
SPAN_KEY = ["step", "sample_id", "target"]


def span_identity(dump: ScoreDump, parts: list[Part], rtol: float) -> dict[str, dict]:
    """Per score row (target): whether the document spans of each non-skipped sequence sum to its raw
    score (``docs/DESIGN.md`` §1.8), ``|sum_d r(z, d) - r(z)|`` relative to the larger of ``|r(z)|`` and
    ``sum_d |r(z, d)|``. A sequence with no span rows, or span rows with no sequence row, fails unless
    its raw scores are 0.

    Replica by replica, one window of steps at a time (the steps of overlapping score and document
    parts: both streams of a replica flush together, so a window is usually one part of each).
    """
    found: dict[str, dict] = {}
    for replica in sorted({p.stream for p in parts} | {p.stream for p in dump.score_parts}):
        score_parts = [p for p in dump.score_parts if p.stream == replica]
        span_parts = [p for p in parts if p.stream == replica]
        for first, last in _windows([(p.first_step, p.last_step) for p in [*score_parts, *span_parts]]):
            sequences = _rows_in(score_parts, first, last).group_by(SPAN_KEY).aggregate([("raw", "sum")])
            spans = _rows_in(span_parts, first, last)
            spans = spans.append_column("raw_abs", pc.abs(spans.column("raw")))
            sums = spans.group_by(SPAN_KEY).aggregate([("raw", "sum"), ("raw_abs", "sum")])
            sums = sums.rename_columns({"raw_sum": "span_sum", "raw_abs_sum": "span_abs_sum"})
            joined = sequences.join(sums, SPAN_KEY, join_type="full outer")
            for target in pc.unique(joined.column("target")).to_pylist():
                rows = joined.filter(pc.equal(joined.column("target"), target))
                _add_span_residuals(found.setdefault(target, _no_residuals(rtol)), rows, rtol)
    return found


def _windows(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The connected step ranges that ``ranges`` (first, last) cover, in order."""
    merged: list[list[int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return [(first, last) for first, last in merged]


def _rows_in(parts: list[Part], first: int, last: int) -> pa.Table:
    """The key and raw score of the non-skipped rows of steps ``first..last`` in ``parts``."""
    keep = [("step", ">=", first), ("step", "<=", last), ("skipped", "=", False)]
    columns = [*SPAN_KEY, "raw"]
    tables = [read_table(p.path, columns, keep) for p in parts if p.first_step <= last and p.last_step >= first]
    empty = DOCUMENT_SCHEMA.empty_table().select(columns)
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables] or [empty])


def _no_residuals(rtol: float) -> dict:
    return {
        "sequences": 0,
        "max_rel_error": None,
        "worst_step": None,
        "worst_sample": None,
        "violations": [],
        "violating_sequences": 0,
        "rtol": rtol,
    }


def _add_span_residuals(found: dict, rows: pa.Table, rtol: float) -> None:
    """Fold the sequences of ``rows`` (one target's sequence and span sums, joined) into ``found``."""
    raw, spans, spans_abs = (
        pc.fill_null(rows.column(c), 0.0).to_numpy() for c in ("raw_sum", "span_sum", "span_abs_sum")
    )
    scale = np.maximum(np.abs(raw), spans_abs)
    err = np.divide(np.abs(spans - raw), scale, out=np.zeros(len(raw)), where=scale > 0)
    step = rows.column("step").to_numpy()
    found["sequences"] += len(err)
    if len(err) and (found["max_rel_error"] is None or err.max() > found["max_rel_error"]):
        worst = int(err.argmax())
        found |= {"max_rel_error": float(err[worst]), "worst_step": int(step[worst])}
        found["worst_sample"] = rows.column("sample_id")[worst].as_py()
    bad = err > rtol
    found["violating_sequences"] += int(bad.sum())
    found["violations"] = sorted(set(found["violations"]) | set(step[bad].tolist()))


def locate_spans(index, sample_ids: np.ndarray, spans: np.ndarray, span_tokens: np.ndarray):
    """``(dataset_id, source names, document_id)`` of each (sample id, span), after checking each span's
    positions against its document's input tokens in the sample map."""
    unique, inverse = np.unique(sample_ids, return_inverse=True)
    table = index.lookup(unique)
    documents = table.column("document_ids").to_pylist()
    inputs = []  # input tokens per document: the sample's last token is only a label
    for counts in table.column("document_tokens").to_pylist():
        counts = list(counts)
        counts[-1] -= 1
        inputs.append(counts if counts[-1] else counts[:-1])
    document_id = np.empty(len(spans), dtype=np.int64)
    for row, (u, span, n) in enumerate(zip(inverse.tolist(), spans.tolist(), span_tokens.tolist())):
        if span >= len(inputs[u]) or inputs[u][span] != n:
            expected = inputs[u][span] if span < len(inputs[u]) else "no document"
            raise DumpError(
                f"sample {unique[u]} span {span} covers {n} positions, the sample map gives {expected} (input tokens"
                f" of its documents {inputs[u]}): the end-of-document tokens the scorer cut at are not the"
                " documents of the data (docs/DESIGN.md §2.9)"
            )
        document_id[row] = documents[u][span]
    dataset_id = table.column("dataset_id").to_numpy()[inverse]
    names = np.asarray(table.column("source").to_pylist(), dtype=object)[inverse]
    return dataset_id, names, document_id


def by_document(
    scores: Scores, *, target: str | None = None, view: str = DEFAULT_VIEW, k: int = 20, bottom: bool = False
) -> Report:
    """Document values (in ``view``) of the ``k`` highest (``bottom``: lowest) documents, all if ``k`` is 0, and
    their sums per source."""
    spec = check_view(view)
    index = check_document_run(scores, "by-document")
    target = target or scores.score_row(None, None)
    rows = document_rows(scores, target)
    step, sample_id, span = (rows.column(c).to_numpy() for c in ("step", "sample_id", "span"))
    skipped = rows.column("skipped").to_numpy(zero_copy_only=False)
    span_tokens = rows.column("span_tokens").to_numpy()
    dataset_id, names, document_id = locate_spans(index, sample_id, span, span_tokens)
    per_row = per_step_view(view, step, rows.column("value").to_numpy(), skipped)

    keys, which = np.unique(np.stack([dataset_id, document_id], axis=1), axis=0, return_inverse=True)
    which = which.reshape(-1)
    trained = (~skipped).astype(float)
    total = np.bincount(which, per_row, len(keys))
    counted = np.bincount(which, trained, len(keys))
    if view == DEFAULT_VIEW:
        value = total
    else:
        value = np.divide(total, counted, out=np.full(len(keys), spec.neutral), where=counted > 0)
    source = np.empty(len(keys), dtype=object)
    source[which] = names
    spans = np.bincount(which, minlength=len(keys))
    tokens = np.bincount(which, span_tokens, len(keys)).astype(np.int64)
    sequences = np.array([len(set(sample_id[which == i].tolist())) for i in range(len(keys))])
    order = np.lexsort((keys[:, 1], keys[:, 0], value if bottom else -value))
    shown = order if k == 0 else order[:k]
    documents = [
        {
            "source": source[i],
            "document_id": int(keys[i, 1]),
            "value": float(value[i]),
            "spans": int(spans[i]),
            "sequences": int(sequences[i]),
            "span_steps": int(counted[i]),
            "tokens": int(tokens[i]),
        }
        for i in shown.tolist()
    ]
    per_source = []
    for name in sorted(set(source.tolist())):
        mine = value[source == name]
        per_source.append(
            {
                "source": name,
                "documents": len(mine),
                "sum": float(mine.sum()),
                "mean": float(mine.mean()),
                "positive": float((mine > 0).mean()),
            }
        )
    columns = ["source", "document_id", "value", "spans", "sequences", "span_steps", "tokens"]
    which_end = "lowest" if bottom else "highest"
    tables = [
        Table(
            f"{len(documents)} {which_end} document values of {len(keys)}, view {view} ({spec.unit}),"
            f" target {target!r}",
            columns,
            [[d[c] for c in columns] for d in documents],
        ),
        Table(
            f"document values per source, view {view}",
            ["source", "documents", "sum", "mean", "positive"],
            [[s["source"], s["documents"], s["sum"], s["mean"], f"{s['positive']:.1%}"] for s in per_source],
        ),
    ]
    data = {
        "target": target,
        "sign": scores.manifest.contract.get("sign"),
        "view": asdict(spec),
        "document_rows": rows.num_rows,
        "documents": documents,
        "sources": per_source,
    }
    return Report(data, tables, scores.notes)


def curate_documents(
    scores: Scores,
    out: str | Path,
    *,
    target: str | None,
    drop_negative: bool,
    drop_fraction: float,
    dropped_out: str | Path | None,
    view: str,
) -> Report:
    """``curate --by-document``: the rule of sequence curation applied to document values (``view``, as
    :func:`by_document` computes them): drop the documents whose value is negative and/or the
    ``drop_fraction`` lowest (ties broken by source dataset and document id, so the count is exact).

    Writes JSON lines, one per scored document in (source, document id) order:
    ``{"source": ..., "document_id": ..., "value": ...}``, the document id being the document's index
    in its source's preprocessed dataset (``inrun-preprocess``'s ``<source>.documents.parquet``,
    which names its input file and line). The caller checks the arguments; documents never scored
    are not listed, as unscored sequences are not.
    """
    check_document_run(scores, "curate --by-document")
    values = by_document(scores, target=target, view=view, k=0, bottom=True)
    documents = values.data["documents"]  # lowest first
    drop = np.zeros(len(documents), dtype=bool)
    drop[: round(drop_fraction * len(documents))] = True
    value = np.array([d["value"] for d in documents], dtype=float)
    if drop_negative:
        drop |= value < 0
    order = sorted(range(len(documents)), key=lambda i: (documents[i]["source"], documents[i]["document_id"]))
    with ExitStack() as stack:
        files = {False: stack.enter_context(open(stack.enter_context(written(Path(out))), "w"))}
        if dropped_out is not None:
            files[True] = stack.enter_context(open(stack.enter_context(written(Path(dropped_out))), "w"))
        for i in order:
            if bool(drop[i]) in files:
                line = {k: documents[i][k] for k in ("source", "document_id", "value")}
                files[bool(drop[i])].write(json.dumps(line) + "\n")
    spec = values.data["view"]
    target = values.data["target"]
    data = {
        "granularity": "document",
        "target": target,
        "sign": values.data["sign"],
        "view": spec,
        "kept": int((~drop).sum()),
        "dropped": int(drop.sum()),
        "kept_value": float(value[~drop].sum()),
        "dropped_value": float(value[drop].sum()),
        "keep_documents": str(out),
        "drop_documents": None if dropped_out is None else str(dropped_out),
    }
    table = Table(
        f"curation of documents by view {view} ({spec['unit']}), target {target!r}",
        ["", "documents", "total value"],
        [["kept", data["kept"], data["kept_value"]], ["dropped", data["dropped"], data["dropped_value"]]],
    )
    notes = [f"kept documents written to {out}, one JSON line each (source, document_id, value)", *scores.notes]
    return Report(data, [table], notes)

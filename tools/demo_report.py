"""Report of a demo run: the most helpful and harmful training sequences and values per source
(``inrun-scores top`` / ``by-source``, in one process) in the recommended view, and how well low
values of every view find the demo corpus's planted corrupted documents (AUROC).

    python tools/demo_report.py runs/demo

A sequence counts as corrupted when most of its tokens come from documents the corpus marked
``corrupted`` (their JSON fields are kept in each source's document table). ``--value`` chooses the
value of each target, by default the Adam-aware one where the run recorded it (docs/DESIGN.md §1.5).
"""

from __future__ import annotations

import argparse
import itertools
import json
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from inrun_megatron.analysis.commands import by_source, top
from inrun_megatron.analysis.inputs import Scores
from inrun_megatron.analysis.report import render
from inrun_megatron.analysis.views import VIEWS
from inrun_megatron.optimizer_values import split_row_name

#: The view the report shows the sequences and sources in (docs/DESIGN.md §1.6): each value as a
#: multiple of its step's mean |value|, so that a sequence is compared with its own batch and not
#: with sequences seen when learning rates and gradients were larger, and positive still = helped.
RECOMMENDED_VIEW = "step-scaled"

#: The training phases over which the recommended view's AUROC is shown (fractions of the steps).
PHASES = (0.0, 0.1, 0.25, 0.5, 1.0)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive scores higher than a random negative (ties count half)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    midranks = np.cumsum(counts) - (counts - 1) / 2.0  # average rank of each distinct value
    ranks = midranks[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def document_kinds(index) -> dict[str, list[str | None]]:
    """Per source, per document id: the corruption the demo corpus planted in it (None: clean),
    from the ``corrupted`` field the corpus wrote into each document's metadata."""
    kinds = {}
    for source in index.source_names:
        meta = index.documents(source).column("meta").to_pylist()
        kinds[source] = [json.loads(m).get("corrupted") if m else None for m in meta]
    return kinds


def corrupted_fractions(index, sample_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per corruption kind, per sample: the fraction of its tokens from documents of that kind."""
    kinds = document_kinds(index)
    rows = index.lookup(sample_ids).to_pylist()
    out: dict[str, np.ndarray] = {}
    for i, row in enumerate(rows):
        tokens = np.asarray(row["document_tokens"], dtype=float)
        for doc, n in zip(row["document_ids"], tokens):
            kind = kinds[row["source"]][doc]
            if kind:
                out.setdefault(kind, np.zeros(len(rows)))[i] += n / tokens.sum()
    return out


def corruption_aurocs(values: np.ndarray, fractions: dict[str, np.ndarray]) -> dict[str, float]:
    """AUROC of 'lower value = corrupted': all kinds against the rest, and each kind against clean
    sequences (a sequence is of a kind when more than half of its tokens are)."""
    corrupted = sum(fractions.values())
    clean = corrupted == 0
    cells = {"all kinds": auroc(-values, corrupted > 0.5)}
    for kind in sorted(fractions):
        keep = (fractions[kind] > 0.5) | clean
        cells[f"{kind} vs clean"] = auroc(-values[keep], fractions[kind][keep] > 0.5)
    return cells


def timing_correlation(values: np.ndarray, step: np.ndarray) -> float:
    """Spearman's rho of each value's distance from the median and its step: how much *when* a sample
    was seen decides how large its value is (0 for a view that removes the timing)."""
    from scipy import stats

    return float(stats.spearmanr(np.abs(values - np.median(values)), step).statistic)


def sign_flips(totals: pa.Table, targets: list[str]) -> dict[str, dict[str, int]]:
    """Per target: steps, steps with a negative <g_t, G_t>, and steps after which the validation loss
    (measured at each step's weights) rose."""
    out = {}
    for target in targets:
        mine = totals.filter(pc.equal(totals.column("target"), target)).sort_by("step")
        dot = mine.column("batch_dot").to_numpy(zero_copy_only=False).astype(float)
        loss = mine.column("validation_loss").to_numpy(zero_copy_only=False).astype(float)
        out[target] = {
            "steps": mine.num_rows,
            "negative_batch_dot": int((dot < 0).sum()),
            "loss_rose": int((np.diff(loss) > 0).sum()),
        }
    return out


def view_values(scores: Scores, view: str, targets: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Sample ids (sorted) and, per target (score row), their values in ``view``; 'all targets' is
    their sum. The rows of one value kind all score the same samples."""
    tables = {
        t: pa.Table.from_batches(scores.view(view, t).batches(t, ["sample_id", "value"])).sort_by("sample_id")
        for t in targets
    }
    ids = tables[targets[0]].column("sample_id").to_numpy()
    for t, table in tables.items():
        if not np.array_equal(table.column("sample_id").to_numpy(), ids):
            raise ValueError(f"target {t!r} scored other samples than {targets[0]!r}")
    values = {t: table.column("value").to_numpy() for t, table in tables.items()}
    values["all targets"] = sum(values[t] for t in targets)
    return ids, values


def print_table(title: str, rows: dict[str, dict[str, float]]) -> None:
    """A table of numbers: one row per entry of ``rows``, one column per key of its cells."""
    kinds = list(next(iter(rows.values())))
    print(title)
    print(f"  {'':<26}" + "".join(f"{k:>18}" for k in kinds))
    for name, cells in rows.items():
        print(f"  {name:<26}" + "".join(f"{cells[k]:>18.3f}" for k in kinds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--value", choices=["adam", "sgd"], help="default: adam where the run recorded it")
    args = parser.parse_args()
    view = RECOMMENDED_VIEW
    with Scores(args.run_dir) as scores:
        names = dict.fromkeys(split_row_name(row)[0] for row in scores.values().targets)
        targets = [scores.score_row(name, args.value) for name in names]
        print(
            f"values: {', '.join(targets)} (rows named TARGET:adam hold the Adam-aware value; sequences trained only"
            " at the optimizer's first step have none and are left out, docs/DESIGN.md §1.5)"
        )
        for target in targets:
            for bottom in (False, True):
                render(top(scores, k=args.top, bottom=bottom, target=target, text_chars=100, view=view), False)
        for target in targets:
            render(by_source(scores, target=target, view=view), as_json=False)
        index = scores.index()
        values = {name: view_values(scores, name, targets) for name in VIEWS}
        totals = scores.values().step_totals()
        first_step = pa.Table.from_batches(scores.values().batches(targets[0], ["sample_id", "first_step"])).sort_by(
            "sample_id"
        )

    sample_ids = values[view][0]
    fractions = corrupted_fractions(index, sample_ids)
    mostly = sum(fractions.values()) > 0.5
    kinds = ", ".join(f"{kind}: {(f > 0.5).sum()}" for kind, f in sorted(fractions.items()))
    kinds += f"; clean: {(sum(fractions.values()) == 0).sum()}"
    print(
        f"\nplanted corruption: {mostly.sum()} of {len(sample_ids)} training sequences are mostly from corrupted"
        f" documents\n({kinds}).\n"
    )
    explained = (
        f"The lists above use the view {view!r}: {VIEWS[view].definition} ({VIEWS[view].unit}). Accumulated"
        " values of sequences seen once are dominated by when they were seen (learning rate and gradient size"
        " early in training); this view compares each sequence with the other sequences of its own step, and"
        " keeps the sign (positive = helped)."
    )
    print(textwrap.fill(explained, width=110))
    rows = {
        f"{name} / {t}": corruption_aurocs(v, fractions) for name, (_, per) in values.items() for t, v in per.items()
    }
    print_table(
        "\nAUROC of 'lower value = corrupted' per view and target (1: all corrupted below all others; 0.5: chance):",
        rows,
    )
    if not np.array_equal(first_step.column("sample_id").to_numpy(), sample_ids):
        raise ValueError("the views scored other samples than the merged values")
    step = first_step.column("first_step").to_numpy()
    timing = {
        f"{name} / {t}": {"rho": timing_correlation(v, step)}
        for name, (_, per) in values.items()
        for t, v in per.items()
    }
    print_table(
        "\nHow much the step decides the size of a value: Spearman rho of |value - median| and the step the sequence"
        " was\nfirst seen in (0: not at all; negative: early sequences get the large values):",
        timing,
    )
    edges = np.quantile(np.arange(step.min(), step.max() + 2), PHASES).round().astype(int)
    phases = {}
    for lo, hi in itertools.pairwise(edges):
        seen = (step >= lo) & (step < hi)
        part = {kind: f[seen] for kind, f in fractions.items()}
        phases[f"steps {lo}-{hi - 1}"] = corruption_aurocs(values[view][1]["all targets"][seen], part)
    print_table(
        f"\nAUROC of the view {view!r} (all targets) by the step the sequence was first seen in: corruption is"
        " found early in\ntraining; later its first-order values fade towards those of clean text:",
        phases,
    )
    print(
        "\nSteps where normalising by the step's <g_t, G_t> or by its change of validation loss would flip the sign"
        " (docs/DESIGN.md §1.6):"
    )
    for target, counts in sign_flips(totals, targets).items():
        print(
            f"  {target}: <g_t, G_t> < 0 at {counts['negative_batch_dot']} of {counts['steps']} steps;"
            f" the validation loss rose after {counts['loss_rose']}"
        )
    run = args.run_dir
    print(f"\nscore records: {run / 'scores'} (Parquet, one stream per data-parallel replica); per-step table")
    print(f"{run / 'steps'}; manifest {run / 'manifest.json'}; every view: inrun-scores top {run} --view VIEW")


if __name__ == "__main__":
    main()

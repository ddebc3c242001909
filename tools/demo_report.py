"""Report of a demo run: the most helpful and harmful training sequences and values per source
(``inrun-scores top`` / ``by-source``, in one process), and how well low values find the demo
corpus's planted corrupted documents (AUROC).

    python tools/demo_report.py runs/demo

A sequence counts as corrupted when most of its tokens come from documents the corpus marked
``corrupted`` (their JSON fields are kept in each source's document table). ``--value`` chooses the
value of each target, by default the Adam-aware one where the run recorded it (docs/DESIGN.md §1.5).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from inrun_megatron.analysis.commands import by_source, top
from inrun_megatron.analysis.inputs import Scores
from inrun_megatron.analysis.report import render
from inrun_megatron.optimizer_values import split_row_name


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive scores higher than a random negative (ties count half)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    midranks = np.cumsum(counts) - (counts - 1) / 2.0  # average rank of each distinct value
    ranks = midranks[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def corrupted_fractions(index, sample_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per corruption kind, per sample: the fraction of its tokens from documents of that kind."""
    kinds = {}
    for source in index.source_names:
        meta = index.documents(source).column("meta").to_pylist()
        kinds[source] = [json.loads(m).get("corrupted") if m else None for m in meta]
    rows = index.lookup(sample_ids).to_pylist()
    out: dict[str, np.ndarray] = {}
    for i, row in enumerate(rows):
        tokens = np.asarray(row["document_tokens"], dtype=float)
        for doc, n in zip(row["document_ids"], tokens):
            kind = kinds[row["source"]][doc]
            if kind:
                out.setdefault(kind, np.zeros(len(rows)))[i] += n / tokens.sum()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--value", choices=["adam", "sgd"], help="default: adam where the run recorded it")
    args = parser.parse_args()
    with Scores(args.run_dir) as scores:
        merged = scores.values()
        names = dict.fromkeys(split_row_name(row)[0] for row in merged.targets)
        targets = [scores.score_row(name, args.value) for name in names]
        print(f"values: {', '.join(targets)} (rows named TARGET:adam hold the Adam-aware value)")
        for target in targets:
            for bottom in (False, True):
                render(top(scores, k=args.top, bottom=bottom, target=target, text_chars=100), as_json=False)
        for target in targets:
            render(by_source(scores, target=target), as_json=False)

        index = scores.index()
        values = {}
        for target in targets:
            batches = list(merged.batches(target, ["sample_id", "value"]))
            ids = np.concatenate([b.column("sample_id").to_numpy() for b in batches])
            v = np.concatenate([b.column("value").to_numpy() for b in batches])
            values[target] = dict(zip(ids.tolist(), v.tolist()))
        sample_ids = np.array(sorted(set().union(*values.values())), dtype=np.int64)
        # A sample trained only at the first step has no Adam-aware contribution: its accumulated value,
        # a sum over no step, is 0 (docs/DESIGN.md §1.5).
        per_target = {t: np.array([values[t].get(i, 0.0) for i in sample_ids.tolist()]) for t in targets}
        per_target["all targets"] = sum(per_target[t] for t in targets)

    fractions = corrupted_fractions(index, sample_ids)
    corrupted = sum(fractions.values())
    mostly, clean = corrupted > 0.5, corrupted == 0
    print(f"\nplanted corruption: {mostly.sum()} of {len(sample_ids)} training sequences are mostly from corrupted")
    print("documents. AUROC of 'lower accumulated value = corrupted' (1: all corrupted below all others; 0.5: chance):")
    kinds = sorted(fractions)
    print(f"  {'target':<12} {'all kinds':>10} " + " ".join(f"{k + ' vs clean':>18}" for k in kinds))
    for name, v in per_target.items():
        cells = []
        for kind in kinds:
            keep = (fractions[kind] > 0.5) | clean
            cells.append(f"{auroc(-v[keep], fractions[kind][keep] > 0.5):>18.3f}")
        print(f"  {name:<12} {auroc(-v, mostly):>10.3f} " + " ".join(cells))
    run = args.run_dir
    print(f"\nscore records: {run / 'scores'} (Parquet, one stream per data-parallel replica); per-step table")
    print(f"{run / 'steps'}; accumulated values {run / 'merged'}; manifest {run / 'manifest.json'}")


if __name__ == "__main__":
    main()

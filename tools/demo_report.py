"""Report of a demo run: the most helpful and harmful training sequences, values per source, and how
well low values find the demo corpus's planted corrupted documents (AUROC).

    python tools/demo_report.py runs/demo

Reads only the run directory: the accumulated values (``values/``), the manifest and the sample
index (sample id -> source, documents, text). A sequence counts as corrupted when most of its
tokens come from documents the corpus marked ``corrupted``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds

from inrun_megatron.data import open_sample_index
from inrun_megatron.records import read_manifest


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive scores higher than a random negative (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    values = np.concatenate([pos, neg])
    for v in np.unique(values):  # average ranks of ties
        tied = values == v
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def corrupted_fractions(index, lookup) -> dict[str, np.ndarray]:
    """Per corruption kind, per looked-up sample: the fraction of its tokens from such documents."""
    kinds = {}
    for source in index.source_names:
        meta = index.documents(source).column("meta").to_pylist()
        kinds[source] = [json.loads(m).get("corrupted") if m else None for m in meta]
    rows = lookup.to_pylist()
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
    args = parser.parse_args()
    run = args.run_dir
    manifest = read_manifest(run)
    table = ds.dataset(run / "values", format="parquet").to_table()
    targets = [t["name"] for t in manifest["validation_targets"]]
    index = open_sample_index(run)
    ids = np.unique(table["sample_id"].to_numpy())
    lookup = index.lookup(ids)
    sources = np.array(lookup["source"].to_pylist())
    fractions = corrupted_fractions(index, lookup)
    corrupted = sum(fractions.values())
    bad, clean = corrupted > 0.5, corrupted == 0
    values = {}
    for target in targets:
        rows = table.filter(ds.field("target") == target)
        by_id = dict(zip(rows["sample_id"].to_pylist(), rows["value"].to_pylist()))
        values[target] = np.array([by_id[i] for i in ids.tolist()])
    values["all targets"] = sum(values[t] for t in targets)

    print(f"\nIn-Run Data Shapley of {len(ids)} training sequences, run {run}")
    print("value = sum over steps of lr * clip * <grad of the sequence's loss, grad of the validation loss>;")
    print("positive = the sequence lowered that target's validation loss (helped), in nats.\n")
    for target in targets:
        v = values[target]
        order = np.argsort(v)
        for title, picks in (("most helpful", order[::-1][: args.top]), ("most harmful", order[: args.top])):
            print(f"{title} for validation target {target!r}:")
            for k in picks:
                tag = " [mostly corrupted]" if bad[k] else ""
                snippet = index.text(int(ids[k]), max_chars=90).replace("\n", " ")
                print(f"  {v[k]:+.3e}  sample {ids[k]:>5} ({sources[k]}){tag}  {snippet!r}")
        print()
    print("per source: sequences and mean value per sequence (x 1e-4 nats)")
    header = f"  {'source':<12} {'sequences':>9} " + " ".join(f"{t:>12}" for t in values)
    print(header)
    for source in index.source_names:
        mask = sources == source
        cells = " ".join(f"{1e4 * values[t][mask].mean():>+12.3f}" for t in values)
        print(f"  {source:<12} {mask.sum():>9} {cells}")
    print(f"\nplanted corruption: {bad.sum()} of {len(ids)} sequences are mostly from corrupted documents")
    print("AUROC of 'lower value = corrupted' (1.0: every corrupted sequence below every other one; 0.5: chance)")
    kinds = sorted(fractions)
    print(f"  {'target':<12} {'all kinds':>10} " + " ".join(f"{k + ' vs clean':>18}" for k in kinds))
    for t in values:
        per_kind = []
        for k in kinds:
            mostly = fractions[k] > 0.5
            keep = mostly | clean
            per_kind.append(f"{auroc(-values[t][keep], mostly[keep]):>18.3f}")
        print(f"  {t:<12} {auroc(-values[t], bad):>10.3f} " + " ".join(per_kind))
    print(f"\nscore records: {run / 'scores'} (Parquet, one stream per data-parallel replica),")
    print(f"per-step table {run / 'steps'}, accumulated values {run / 'values'}, manifest {run / 'manifest.json'}")


if __name__ == "__main__":
    main()

"""PNG figures of a run's values (``inrun-scores plot``), drawn from the same reports the tables show."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from inrun_megatron.analysis import commands
from inrun_megatron.analysis.inputs import Scores
from inrun_megatron.analysis.report import Report, Table, written
from inrun_megatron.analysis.stats import sample_stride, top_k

#: Values drawn in the histogram at most (a hash sample beyond).
HISTOGRAM_CAP = 2_000_000


def plot(scores: Scores, out_dir: str | Path, *, target: str | None = None, sample_ids: list[int] | None = None):
    """Write the figures into the new directory ``out_dir``; return the list of files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = scores.values()
    target = values.target(target)
    index = scores.index()
    if not sample_ids:
        columns = ["sample_id", "value"]
        best = top_k(values.batches(target, columns), 3).column("sample_id").to_pylist()
        worst = top_k(values.batches(target, columns), 3, bottom=True).column("sample_id").to_pylist()
        sample_ids = list(dict.fromkeys(best + worst))
    figures = {
        "values_histogram.png": lambda ax: _histogram(ax, values, target),
        "steps.png": lambda ax: _steps(ax, values.step_totals(), target),
        "trajectories.png": lambda ax: _trajectories(ax, commands.trajectory(scores, sample_ids, target=target)),
    }
    if index is not None:
        figures["sources.png"] = lambda ax: _sources(ax, commands.by_source(scores, target=target))
        figures["source_curves.png"] = lambda ax: _source_curves(ax, commands.source_curves(scores, target=target))
    out_dir = Path(out_dir)
    with written(out_dir) as tmp:
        tmp.mkdir()
        for name, draw in figures.items():
            fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
            draw(ax)
            fig.savefig(tmp / name, dpi=110)
            plt.close(fig)
    files = [str(out_dir / name) for name in figures]
    table = Table(f"figures of target {target!r}", ["file"], [[f] for f in files])
    return Report({"target": target, "files": files}, [table], scores.notes)


def _histogram(ax, values, target: str) -> None:
    n = values.samples[target]
    stride = sample_stride(n, HISTOGRAM_CAP)
    _, v = values.arrays(target, stride)
    ax.hist(v, bins=100, color="tab:blue")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    sampled = f", hash sample of {len(v)}" if stride > 1 else ""
    ax.set_title(f"accumulated value per sample, target {target!r} ({n} samples{sampled})")
    ax.set_xlabel("value (nats; > 0 = lowered the validation loss)")
    ax.set_ylabel("samples")


def _steps(ax, totals, target: str) -> None:
    t = totals.filter(pc.equal(totals.column("target"), target))
    step = t.column("step").to_numpy()
    value = t.column("value_sum").to_numpy()
    ax.plot(step, np.cumsum(value), color="tab:blue", label="cumulative value of the batches")
    ax.set_xlabel("step")
    ax.set_ylabel("cumulative value (nats)")
    loss = t.column("validation_loss").to_numpy(zero_copy_only=False).astype(float)
    if np.isfinite(loss).any():
        twin = ax.twinx()
        twin.plot(step, loss, color="tab:orange", label="validation loss")
        twin.set_ylabel("validation loss")
        twin.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(f"value of each step's batch, target {target!r}")


def _trajectories(ax, report: Report) -> None:
    for sid, s in report.data["samples"].items():
        ax.plot(s["step"], s["cumulative"], marker="o", markersize=3, label=f"sample {sid}")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("accumulated value (nats)")
    ax.set_title(f"accumulated value over training, target {report.data['target']!r}")
    ax.legend(fontsize="small")


def _sources(ax, report: Report) -> None:
    rows = report.data["sources"]
    names = [r["source"] for r in rows]
    sums = [r["sum"] for r in rows]
    ax.barh(names, sums, color=["tab:green" if s >= 0 else "tab:red" for s in sums])
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("total accumulated value (nats; > 0 = helped)")
    ax.set_title(f"value per source, target {report.data['target']!r}")


def _source_curves(ax, report: Report) -> None:
    for name, curve in report.data["sources"].items():
        ax.plot(curve["step"], curve["cumulative"], label=name)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("cumulative value (nats)")
    ax.set_title(f"value per source over training, target {report.data['target']!r}")
    ax.legend(fontsize="small")

"""Statistics over streams of accumulated values, in bounded memory.

Exact wherever the data fits the stated caps; beyond them quantiles and rank correlations are
computed on a hash sample of sample ids (the same ids in every run, so two runs are compared on
the same samples), and say so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from inrun_megatron.analysis.values import hash_sample

#: At most this many values are held to compute quantiles exactly (8 bytes each).
EXACT_CAP = 20_000_000
#: At most this many pairs are ranked for Spearman/Kendall (scipy needs about 200 bytes a pair).
CORRELATION_CAP = 5_000_000


def sample_stride(n: int, cap: int = EXACT_CAP) -> int:
    return max(1, -(-n // cap))


def select_best(values: np.ndarray, sample_ids: np.ndarray, k: int, bottom: bool = False) -> np.ndarray:
    """Indices of the ``k`` highest (lowest) values, ties broken by smaller sample id, best first."""
    score = -values if bottom else values
    if len(score) > k:
        threshold = np.partition(score, len(score) - k)[len(score) - k]
        better = np.flatnonzero(score > threshold)
        ties = np.flatnonzero(score == threshold)
        ties = ties[np.argsort(sample_ids[ties], kind="stable")[: k - len(better)]]
        chosen = np.concatenate([better, ties])
    else:
        chosen = np.arange(len(score))
    return chosen[np.lexsort((sample_ids[chosen], -score[chosen]))]


def top_k(batches: Iterable[pa.RecordBatch], k: int, bottom: bool = False) -> pa.Table:
    """The ``k`` rows with the highest (lowest) finite ``value`` of a stream, best first."""
    kept: pa.Table | None = None
    for batch in batches:
        table = pa.Table.from_batches([batch])
        table = table.filter(np.isfinite(table.column("value").to_numpy()))
        kept = table if kept is None else pa.concat_tables([kept, table])
        if kept.num_rows > 4 * k + (1 << 16):
            kept = _keep_best(kept, k, bottom)
    if kept is None:
        return kept
    return _keep_best(kept, k, bottom)


def _keep_best(table: pa.Table, k: int, bottom: bool) -> pa.Table:
    index = select_best(table.column("value").to_numpy(), table.column("sample_id").to_numpy(), k, bottom)
    return table.take(index)


@dataclass
class Distribution:
    """Summary of a set of values; ``sampled`` tells whether quantiles come from a hash sample."""

    count: int
    total: float
    mean: float
    std: float
    minimum: float
    maximum: float
    negative: float  # fraction < 0
    zero: float  # fraction == 0
    non_finite: int
    quantiles: dict[str, float]
    sampled: int | None = None


QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def distribution(batches: Iterable[pa.RecordBatch], count: int, cap: int = EXACT_CAP) -> Distribution:
    """Moments exactly over all values; quantiles exactly up to ``cap`` values, else on a hash sample."""
    stride = sample_stride(count, cap)
    n = neg = zero = bad = 0
    total = mean = m2 = 0.0
    lo, hi = np.inf, -np.inf
    kept = []
    for batch in batches:
        v = batch.column("value").to_numpy()
        finite = np.isfinite(v)
        bad += int((~finite).sum())
        kept.append(v[finite & hash_sample(batch.column("sample_id").to_numpy(), stride)])
        v = v[finite]
        if not len(v):
            continue
        # Chan et al.'s pairwise update of mean and squared deviations: stable for any offset.
        batch_mean = float(v.mean())
        delta = batch_mean - mean
        m2 += float(np.square(v - batch_mean).sum()) + delta * delta * n * len(v) / (n + len(v))
        mean += delta * len(v) / (n + len(v))
        n += len(v)
        total += float(v.sum())
        neg += int((v < 0).sum())
        zero += int((v == 0).sum())
        lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
    values = np.concatenate(kept) if kept else np.empty(0)
    nan = float("nan")
    return Distribution(
        count=n,
        total=total,
        mean=mean if n else nan,
        std=float(np.sqrt(m2 / n)) if n else nan,
        minimum=lo if n else nan,
        maximum=hi if n else nan,
        negative=neg / n if n else nan,
        zero=zero / n if n else nan,
        non_finite=bad,
        quantiles=dict(zip((f"p{round(q * 100)}" for q in QUANTILES), np.quantile(values, QUANTILES).tolist()))
        if len(values)
        else {},
        sampled=len(values) if stride > 1 else None,
    )


def rank_correlations(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Spearman's rho and Kendall's tau-b (both with ties handled) of paired values."""
    from scipy import stats

    if len(a) < 2:
        return {"spearman": float("nan"), "kendall_tau_b": float("nan")}
    return {
        "spearman": float(stats.spearmanr(a, b).statistic),
        "kendall_tau_b": float(stats.kendalltau(a, b, variant="b").statistic),
    }


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of shared ids between two top-k id lists of the same length."""
    return len(np.intersect1d(a, b)) / max(len(a), 1)

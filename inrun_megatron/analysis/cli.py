"""``inrun-scores``: answers from sharded score dumps without writing code.

Every command takes a run directory (a score dump) or a merged directory (``inrun-scores merge``);
accumulated values of a dump are merged on the fly. ``--json`` prints the whole answer as JSON.
Exit status: 0 done, 1 ``verify`` found problems, 2 bad input (the message names the file).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from inrun_megatron.analysis import commands
from inrun_megatron.analysis.dump import DumpError, ScoreDump
from inrun_megatron.analysis.inputs import Scores
from inrun_megatron.analysis.merge import DEFAULT_MEMORY, merge
from inrun_megatron.analysis.progress import Progress
from inrun_megatron.analysis.report import Report, Table, render
from inrun_megatron.analysis.views import DEFAULT_VIEW, VIEWS
from inrun_megatron.optimizer_values import ADAM, SECOND_ORDER, SGD

VALUE_KINDS = (ADAM, SGD, SECOND_ORDER)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the answer as JSON (for scripts)")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument(
        "--memory-gib",
        type=float,
        default=DEFAULT_MEMORY / 2**30,
        help="memory budget of a merge (default %(default)g GiB); more buckets when it is smaller",
    )
    common.add_argument("--work-dir", help="where on-the-fly merges spill (default: the system temp directory)")
    run = argparse.ArgumentParser(add_help=False, parents=[common])
    run.add_argument("run", help="run directory (score dump) or merged directory")
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument("--target", help="validation target (default: the first)")
    target.add_argument(
        "--value",
        choices=VALUE_KINDS,
        help="which value: adam (Adam-aware, docs/DESIGN.md §1.5), sgd (lr * clip * <grad, G>) or second-order"
        " (sgd - (lr * clip)^2 / 2 * <grad, H_val g>, §1.7); default adam where the run recorded it, else sgd",
    )
    view = argparse.ArgumentParser(add_help=False)
    view.add_argument(
        "--view",
        choices=list(VIEWS),
        default=DEFAULT_VIEW,
        help="which number per sample (default %(default)s): accumulated = sum of the sample's values (nats);"
        " step-scaled, step-z, step-rank = the sample against the other samples of the steps it was seen in"
        " (docs/DESIGN.md §1.6)",
    )

    parser = argparse.ArgumentParser(prog="inrun-scores", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("summary", parents=[run], help="steps, samples, value distribution, efficiency identity")
    p = sub.add_parser("top", parents=[run, target, view], help="highest (or lowest) accumulated values, with text")
    p.add_argument("--bottom", action="store_true", help="the lowest (most harmful) values instead")
    p.add_argument("-k", type=int, default=20, help="how many (default %(default)s)")
    p.add_argument("--text-chars", type=int, default=200, help="length of the text snippets")
    sub.add_parser("by-source", parents=[run, target, view], help="values aggregated per source dataset")
    p = sub.add_parser(
        "by-document",
        parents=[run, target, view],
        help="document values (runs with document values on): per document over its spans, and per source",
    )
    p.add_argument("--bottom", action="store_true", help="the lowest (most harmful) documents instead")
    p.add_argument("-k", type=int, default=20, help="how many documents (default %(default)s; 0: all)")
    p = sub.add_parser("trajectory", parents=[run, target], help="value of samples or sources over steps")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--sample", type=int, nargs="+", metavar="ID", help="sample ids")
    which.add_argument("--by-source", action="store_true", help="per-source curves instead")
    p = sub.add_parser("plot", parents=[run, target], help="PNG figures: histogram, steps, trajectories, sources")
    p.add_argument("-o", "--out", required=True, help="new directory for the figures")
    p.add_argument("--sample", type=int, nargs="+", metavar="ID", help="trajectories of these samples")
    p = sub.add_parser("compare", parents=[common, view], help="rank agreement of two runs or two targets")
    p.add_argument("run", help="first run (or merged) directory")
    p.add_argument("run_b", nargs="?", help="second run (default: the first, with --target-b)")
    p.add_argument("--target", help="target of the first run")
    p.add_argument("--target-b", help="target of the second run (default: --target)")
    p.add_argument("--value", choices=VALUE_KINDS, help="value of the first run (default: adam where recorded)")
    p.add_argument("--value-b", choices=VALUE_KINDS, help="value of the second run (default: --value)")
    p.add_argument("-k", type=int, default=100, help="size of the top/bottom sets compared (default %(default)s)")
    p = sub.add_parser("merge", parents=[run], help="compact the shards into accumulated per-sample values")
    p.add_argument("-o", "--out", required=True, help="new merged directory")
    p.add_argument("--per-step", action="store_true", help="also keep per-step rows sorted by sample")
    p.add_argument("--buckets", type=int, help="hash buckets (default: from the row count and --memory-gib)")
    p.add_argument("--mpi", action="store_true", help="run under mpirun with mpi4py, one share per rank")
    p = sub.add_parser("export", parents=[run, target], help="values as CSV, Parquet or JSON lines")
    p.add_argument("-o", "--out", required=True, help="output file")
    p.add_argument("--format", choices=["csv", "parquet", "jsonl"], required=True)
    p.add_argument("--per-step", action="store_true", help="per-step rows instead of accumulated values")
    p.add_argument("--with-source", action="store_true", help="add each sample's source dataset")
    p = sub.add_parser("curate", parents=[run, target, view], help="sample ids to keep for retraining")
    p.add_argument("-o", "--out", required=True, help="file of kept sample ids, one per line")
    p.add_argument("--drop-negative", action="store_true", help="drop samples with negative value (harmful)")
    p.add_argument("--drop-fraction", type=float, default=0.0, help="drop this fraction of lowest-valued samples")
    p.add_argument("--dropped", help="also write the dropped sample ids (documents) to this file")
    p.add_argument(
        "--by-document",
        action="store_true",
        help="keep/drop documents (source, document id) by their document values; -o/--dropped are JSON lines",
    )
    p = sub.add_parser("verify", parents=[run], help="check files, rows, the efficiency identity and document spans")
    p.add_argument("--rtol", type=float, default=commands.EFFICIENCY_RTOL, help="efficiency tolerance")
    from inrun_megatron.analysis import bench

    bench.add_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    comm = _mpi_comm() if getattr(args, "mpi", False) else None
    rank = 0 if comm is None else comm.rank
    progress = Progress(enabled=not (args.quiet or args.json) and rank == 0)
    try:
        report = _run(args, progress, comm)
    except (DumpError, FileNotFoundError, ValueError) as e:
        if rank == 0:
            print(f"inrun-scores {args.command}: error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        render(report, args.json)
    return 0 if report.ok else 1


def _run(args: argparse.Namespace, progress: Progress, comm) -> Report:
    memory = int(args.memory_gib * 2**30)
    if args.command == "verify":
        return commands.verify(args.run, rtol=args.rtol, memory_bytes=memory, work_dir=args.work_dir, progress=progress)
    if args.command == "merge":
        return _merge(args, memory, progress, comm)
    if args.command == "bench":
        from inrun_megatron.analysis import bench

        return bench.run(args)
    options = dict(memory_bytes=memory, work_dir=args.work_dir, progress=progress)
    with Scores(args.run, **options) as scores:
        if hasattr(args, "value") and args.command not in ("compare", "export"):
            args.target = scores.score_row(args.target, args.value)
        elif args.command == "export" and (args.target is not None or args.value is not None):
            args.target = scores.score_row(args.target, args.value)  # else every row of every target
        if args.command == "summary":
            return commands.summary(scores)
        if args.command == "top":
            return commands.top(
                scores, k=args.k, bottom=args.bottom, target=args.target, text_chars=args.text_chars, view=args.view
            )
        if args.command == "by-source":
            return commands.by_source(scores, target=args.target, view=args.view)
        if args.command == "by-document":
            from inrun_megatron.analysis.documents import by_document

            return by_document(scores, target=args.target, view=args.view, k=args.k, bottom=args.bottom)
        if args.command == "trajectory":
            if args.by_source:
                return commands.source_curves(scores, target=args.target)
            return commands.trajectory(scores, args.sample, target=args.target)
        if args.command == "plot":
            from inrun_megatron.analysis.plots import plot

            return plot(scores, args.out, target=args.target, sample_ids=args.sample)
        if args.command == "export":
            return commands.export(
                scores,
                args.out,
                fmt=args.format,
                per_step=args.per_step,
                target=args.target,
                with_source=args.with_source,
            )
        if args.command == "curate":
            return commands.curate(
                scores,
                args.out,
                target=args.target,
                drop_negative=args.drop_negative,
                drop_fraction=args.drop_fraction,
                dropped_out=args.dropped,
                view=args.view,
                by_document=args.by_document,
            )
        if args.command == "compare":
            value_b = args.value_b or args.value
            target_a = scores.score_row(args.target, args.value)
            if args.run_b is None or Path(args.run_b).resolve() == Path(args.run).resolve():
                target_b = scores.score_row(args.target_b or args.target, value_b)
                return commands.compare(scores, scores, target_a=target_a, target_b=target_b, k=args.k, view=args.view)
            with Scores(args.run_b, **options) as other:
                target_b = other.score_row(args.target_b or args.target, value_b)
                return commands.compare(scores, other, target_a=target_a, target_b=target_b, k=args.k, view=args.view)
    raise AssertionError(args.command)


def _merge(args: argparse.Namespace, memory: int, progress: Progress, comm) -> Report:
    start = time.perf_counter()
    dump = ScoreDump.open(args.run)
    found = merge(
        dump, args.out, per_step=args.per_step, buckets=args.buckets, memory_bytes=memory, comm=comm, progress=progress
    )
    seconds = time.perf_counter() - start
    data = {
        "out": args.out,
        "rows": found.rows,
        "parts": found.parts,
        "buckets": found.buckets,
        "samples": found.samples,
        "ranks": 1 if comm is None else comm.size,
        "seconds": seconds,
        "rows_per_second": found.rows / seconds,
    }
    table = Table(f"merged {args.run} into {args.out}", ["", ""], [[k, v] for k, v in data.items()])
    return Report(data, [table])


def _mpi_comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


if __name__ == "__main__":
    sys.exit(main())

"""``inrun-scores bench``: the analysis tool on a large synthetic dump, within a stated memory budget.

Writes a synthetic dump of ``--rows`` rows (through the real ScoreWriter, many parts per
replica), then runs each command as its own process and measures wall time, rows/s and the
peak resident memory of the process (for ``mpirun``, of the largest rank): ``merge``, ``top`` on
the merged directory, ``top`` straight on the dump (merging on the fly), ``top`` in a step view
(docs/DESIGN.md §1.6, from the dump's per-step rows), and ``merge --mpi``
with 2 and 4 ranks, whose output must be byte-for-byte the merge's.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from inrun_megatron.analysis.report import Report, Table
from inrun_megatron.analysis.synthetic import SyntheticRun, write_synthetic_dump


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("bench", parents=[common], help="benchmark merge and top on a synthetic dump")
    p.add_argument("--dir", required=True, help="directory for the dump and the outputs (reused if it holds the dump)")
    p.add_argument("--rows", type=float, default=1e8, help="score rows of the synthetic dump (default %(default)g)")
    p.add_argument("--replicas", type=int, default=8, help="data-parallel replicas (one folder of parts each)")
    p.add_argument("--flush-every", type=int, default=100, help="steps per part")
    p.add_argument("--mpi", type=int, nargs="*", default=[2, 4], help="rank counts of the MPI merges")


def run(args: argparse.Namespace) -> Report:
    root = Path(args.dir)
    dump_dir = root / "run"
    shape = SyntheticRun(
        replicas=args.replicas,
        micro_batches=4,
        micro_batch_size=32,
        targets=("web", "code"),
        flush_every=args.flush_every,
    )
    shape.steps = math.ceil(args.rows / (shape.rows // shape.steps))
    results = []
    if not (dump_dir / "manifest.json").exists():
        start = time.perf_counter()
        write_synthetic_dump(dump_dir, shape)
        results.append(["generate dump", time.perf_counter() - start, shape.rows, None])
    parts = sum(1 for _ in (dump_dir / "scores").rglob("*.parquet"))
    dump_bytes = sum(p.stat().st_size for p in dump_dir.rglob("*.parquet"))
    memory = ["--memory-gib", str(args.memory_gib), "--work-dir", str(root), "--quiet", "--json"]
    for name in ["merged", *(f"merged-mpi{n}" for n in args.mpi)]:
        shutil.rmtree(root / name, ignore_errors=True)
    rows = shape.rows
    results.append(["merge", *_measure(cli_command("merge", dump_dir, "-o", root / "merged", *memory), rows)])
    merged_rows = sum(json.loads((root / "merged" / "manifest.json").read_text())["samples"].values())
    top_merged = _measure(cli_command("top", root / "merged", "-k", "100", *memory), merged_rows)
    results.append(["top -k 100 (merged; rows = per-sample values)", *top_merged])
    results.append(
        ["top -k 100 (dump, merges on the fly)", *_measure(cli_command("top", dump_dir, "-k", "100", *memory), rows)]
    )
    view = cli_command("top", root / "merged", "-k", "100", "--view", "step-rank", *memory)
    results.append(["top -k 100 --view step-rank (merged; reads the dump's rows)", *_measure(view, rows)])
    identical = {}
    for n in args.mpi:
        out = root / f"merged-mpi{n}"
        command = mpirun_command(n, cli_command("merge", dump_dir, "-o", out, "--mpi", *memory))
        results.append([f"merge --mpi, {n} ranks", *_measure(command, rows)])
        identical[n] = same_files(root / "merged", out)
    budget = args.memory_gib
    table_rows = [
        [name, seconds, None if n is None else n / seconds, None if rss is None else rss / 2**20]
        for name, seconds, n, rss in results
    ]
    data = {
        "rows": rows,
        "parts": parts,
        "replicas": args.replicas,
        "dump_gib": dump_bytes / 2**30,
        "memory_budget_gib": budget,
        "results": [dict(zip(["command", "seconds", "rows_per_second", "peak_rss_mib"], r)) for r in table_rows],
        "mpi_identical_to_merge": identical,
    }
    notes = [f"{rows} rows in {parts} score parts ({dump_bytes / 2**30:.2f} GiB), memory budget {budget:g} GiB"]
    notes += [f"merge --mpi with {n} ranks byte-identical to merge: {same}" for n, same in identical.items()]
    over = [r[0] for r in table_rows if r[3] is not None and r[3] > budget * 1024]
    if over:
        notes.append(f"over the memory budget: {', '.join(over)}")
    table = Table("inrun-scores benchmark", ["command", "seconds", "rows/s", "peak RSS MiB"], table_rows)
    return Report(data, [table], notes, ok=not over and all(identical.values()))


def cli_command(*args) -> list[str]:
    """``inrun-scores ARGS`` as a command line of this interpreter."""
    return [sys.executable, "-m", "inrun_megatron.analysis.cli", *map(str, args)]


def mpirun_command(n: int, command: list[str]) -> list[str]:
    """``command`` on ``n`` MPI ranks (more ranks than cores allowed); run it with :func:`mpi_env`."""
    mpirun = shutil.which("mpirun") or str(Path(sys.executable).with_name("mpirun"))
    return [mpirun, "--oversubscribe", "-n", str(n), *command]


def mpi_env() -> dict[str, str]:
    """The environment, with Open MPI allowed to run as root (containers)."""
    return dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def _measure(command: list[str], rows: int) -> tuple[float, int, int]:
    """Wall seconds, rows and peak RSS in bytes (largest process of the command's tree)."""
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(command, env=mpi_env(), stdout=log, stderr=subprocess.STDOUT)
        # wait4's usage covers the process and every descendant it reaped (mpirun's ranks).
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            log.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{log.read().decode()[-6000:]}")
    return seconds, rows, usage.ru_maxrss * 1024


def same_files(a: Path, b: Path) -> bool:
    """Whether two directory trees hold the same files with the same bytes."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)

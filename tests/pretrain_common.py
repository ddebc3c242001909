"""Shared by the pretraining entry-point tests: a small corpus, run configs, runs and their dumps."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import yaml

from common import free_port
from launcher import TESTS, torchrun

REPO = TESTS.parent
ENTRY_POINT = REPO / "launch" / "pretrain_gpt.py"
FAULT_WORKER = TESTS / "workers" / "pretrain_with_faults.py"

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


def write_corpus(path: Path, n_docs: int = 300, sources=("a", "b", "c"), seed: int = 0) -> None:
    """Word documents of three sources; each source has its own word distribution."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            source = sources[i % len(sources)]
            vocab = WORDS[3 * (i % len(sources)) :] + WORDS[:3]
            text = " ".join(rng.choice(vocab) for _ in range(rng.randint(5, 40)))
            f.write(json.dumps({"text": text, "source": source, "id": f"{source}{i}"}) + "\n")


def prepare_data(root: Path) -> Path:
    """Tokenize the corpus (bytes) into ``root/data``; returns that directory."""
    from inrun_megatron.data import Tokenizer
    from inrun_megatron.data.indexed import preprocess

    write_corpus(root / "corpus.jsonl")
    preprocess([root / "corpus.jsonl"], root / "data", Tokenizer({"type": "bytes"}))
    return root / "data"


def tiny_config(data_dir: Path, run_dir: Path, **sections) -> dict:
    """A run config small enough for a few seconds of CPU training; ``sections`` update it."""
    config = {
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32},
        "parallel": {"tensor_model_parallel_size": 2},
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_iters": 16, "seed": 7},
        "optimizer": {"type": "adam", "lr": 2.0e-3, "lr_warmup_iters": 2, "clip_grad": 1.0},
        "data": {
            "tokenizer": {"type": "bytes"},
            "sources": [{"name": n, "prefix": str(data_dir / n), "weight": w} for n, w in zip("abc", (3, 2, 1))],
            "split": "90,10,0",
        },
        "validation": {"targets": [{"name": "heldout-a", "source": "a", "sequences": 4}]},
        "scoring": {"flush_every": 3},
        "checkpoint": {"save_interval": 4},
        "output": {"run_dir": str(run_dir)},
        "logging": {"log_interval": 4},
    }
    config = copy.deepcopy(config)
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def run_pretrain(config: dict, nproc: int, *overrides: str, kill: str | None = None, timeout: int = 900):
    """Run the entry point (or, with ``kill``, the fault-injection worker) under torchrun."""
    run_dir = Path(config["output"]["run_dir"])
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    script = FAULT_WORKER if kill else ENTRY_POINT
    env = {"INRUN_KILL": kill} if kill else {}
    return torchrun(script, nproc, "--config", str(path), *overrides, timeout=timeout, env=env)


def read_rows(run_dir: Path, stream: str = "scores") -> pa.Table:
    """Every row of a dump stream, or of the values merged from it at the end of the run
    (``"values"``), sorted (as any Parquet reader sees the directory)."""
    keys = {"scores": ["step", "target", "sample_id"], "steps": ["step", "target"], "values": ["target", "sample_id"]}
    directory = run_dir / "merged" / "values" if stream == "values" else run_dir / stream
    table = ds.dataset(directory, format="parquet").to_table()
    return table.sort_by([(k, "ascending") for k in keys[stream]])


def accumulate_from_rows(rows: pa.Table) -> dict[tuple[str, int], float]:
    """``phi`` per (target, sample id) summed from the dump in step order, as the scorer sums it."""
    order = np.lexsort((rows["sample_id"].to_numpy(), rows["step"].to_numpy()))
    totals: dict[tuple[str, int], float] = {}
    targets, ids = rows["target"].to_pylist(), rows["sample_id"].to_pylist()
    values, skipped = rows["value"].to_pylist(), rows["skipped"].to_pylist()
    for i in order:
        if not skipped[i]:
            key = (targets[i], ids[i])
            totals[key] = totals.get(key, 0.0) + values[i]
    return totals


def srun_like(script: Path, ntasks: int, *args: str, timeout: int = 900) -> list[subprocess.CompletedProcess]:
    """Start ``ntasks`` processes the way ``srun`` does (``SLURM_PROCID``/``SLURM_NTASKS``/
    ``SLURM_LOCALID``, ``MASTER_ADDR``/``MASTER_PORT`` from the batch script); wait for all."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    env["MASTER_PORT"] = str(free_port())
    env["PYTHONPATH"] = os.pathsep.join(p for p in [env.get("PYTHONPATH"), str(TESTS), str(REPO)] if p)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), *args],
            env=dict(env, SLURM_PROCID=str(rank), SLURM_NTASKS=str(ntasks), SLURM_LOCALID=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(ntasks)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results

"""The curation loop on the demo corpus (``make curate-demo``): train with scoring, curate, retrain.

1. data: the demo corpus (:mod:`inrun_megatron.data.demo_corpus`, 10% of the training documents
   of every source corrupted) plus clean documents of every source held out before tokenization:
   half become the validation target ``select`` that the values are computed against, the other
   half the target ``eval`` that only measures the runs (cut into pieces that fit one sequence);
2. ``full``: pretrain from scratch on every training sequence (``data.train_ids`` = all ids of one
   epoch, repeated for ``--epochs`` epochs) with scoring on, as ``launch/pretrain_gpt.py`` does;
   beside it ``full-seed2``: the same data under another seed (another initialisation, packing and
   order), which shows how far a second seed alone moves the full run's curve;
3. ``inrun-scores curate --by-document`` on the Adam-aware value (the runs train with Adam,
   docs/DESIGN.md §1.5) for ``select`` in the recommended view (§1.6), ``--drop-negative``: the kept
   training documents (``--granularity sequence``: ``curate`` without ``--by-document``, the kept
   sequence ids);
4. ``curated``: retrain from scratch on the kept documents only: their lines of the training corpus
   tokenized again by the project's preprocessing (the same tokenizer) into a new dataset that
   megatron packs anew, every sequence of it (``data.train_ids`` = all ids) repeated to fill the same
   steps under the same schedule; ``random-1`` .. ``random-R``: the same with as many documents
   drawn at random, one draw per seed (the random drop of the same size; its spread says how much
   one draw's luck is worth). With ``--granularity sequence`` these train on kept (or random)
   sequence ids of the full run's dataset instead;
5. report, on ``eval``: the steps each run needs to reach the full run's final validation loss,
   the final losses (per run, and mean and spread of the random draws), and how well the view's low
   values find the planted corruption (AUROC), for the Adam-aware and for the SGD value, per
   sequence and per document (the scored run records document values, docs/DESIGN.md §2.9).
   Every run trains with megatron's reset attention masks and position ids
   (configs/curate-demo.yaml), so a document's value is that of its own loss terms
   (docs/DESIGN.md §1.8), not its part of a whole sequence's.

The runs go ``--parallel`` at a time (one process each). The last line is ``steps_saved=<fraction>``:
1 - (steps of ``curated``) / (steps of ``full``) to reach the full run's final ``eval`` loss
(``nan`` when the curated run never reaches it).

    python tools/curate_demo.py [--out runs/curate-demo] [--epochs 2] [--random-seeds 3]
                                [--granularity document|sequence]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from inrun_megatron.analysis.commands import curate
from inrun_megatron.analysis.documents import by_document
from inrun_megatron.analysis.inputs import Scores
from inrun_megatron.data.demo_corpus import build_corpus
from inrun_megatron.data.indexed import preprocess
from inrun_megatron.data.tokenizer import Tokenizer
from inrun_megatron.optimizer_values import ADAM_ROW_SUFFIX

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "curate-demo.yaml"

_spec = importlib.util.spec_from_file_location("demo_report", Path(__file__).with_name("demo_report.py"))
demo_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo_report)

#: The view the values are curated in: the one the demo report recommends (docs/DESIGN.md §1.6).
VIEW = demo_report.RECOMMENDED_VIEW
#: The value curated on: the Adam-aware one, since the runs train with Adam (docs/DESIGN.md §1.5);
#: the report shows the SGD value's AUROC beside it.
VALUE = "adam"
SOURCES = ("prose", "code", "docstrings")
#: The target the values are computed against, and the one that only measures the runs.
SELECT, EVAL = "select", "eval"
#: The seed of the second full run (the first uses the config's training.seed).
SECOND_SEED = 4321
#: What curate and the random drops drop: training documents (packed again) or packed sequences.
GRANULARITIES = ("document", "sequence")


# --------------------------------------------------------------------------------------
# data


def split_heldout(corpus: Path, heldout: int) -> tuple[list[dict], list[dict]]:
    """The corpus's documents: (training, held out); the last ``heldout`` documents of every source
    are held out (the corpus never corrupts its last 10%)."""
    records = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    train, held = [], []
    for source in SOURCES:
        mine = [r for r in records if r["source"] == source]
        if any(r["corrupted"] for r in mine[-heldout:]):
            raise ValueError(f"--heldout {heldout}: the held-out {source} documents would include corrupted ones")
        train += mine[:-heldout]
        held += mine[-heldout:]
    return train, held


def sequence_pieces(text: str, tokenizer: Tokenizer, seq_length: int) -> list[str]:
    """``text`` cut at line breaks into pieces of at most ``seq_length`` tokens plus the
    end-of-document token (what a ``jsonl`` validation target accepts); a longer line is cut by tokens."""
    pieces, current = [], ""

    def fits(piece: str) -> bool:
        return len(tokenizer.tokenize(piece)) <= seq_length

    for line in text.split("\n"):
        joined = f"{current}\n{line}" if current else line
        if fits(joined):
            current = joined
            continue
        if current.strip():
            pieces.append(current)
        current = line
        while not fits(current):
            ids = tokenizer.tokenize(current)
            head = tokenizer.detokenize(ids[: seq_length // 2])
            pieces.append(head)
            current = current[len(head) :] if current.startswith(head) else tokenizer.detokenize(ids[seq_length // 2 :])
    if current.strip():
        pieces.append(current)
    return [p for p in pieces if p.strip()]


def build_data(out: Path, *, documents: int, heldout: int, seq_length: int, bpe_vocab: int) -> dict:
    """Corpus, tokenizer, indexed datasets and the two validation targets under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    total = documents + heldout
    # as many corrupted documents as the demo's 10% of the training documents
    build_corpus(out / "all.jsonl", documents=total, corrupted=0.1 * documents / total)
    train, held = split_heldout(out / "all.jsonl", heldout)
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in train)
    run([sys.executable, "tools/preprocess_data.py", "--input", str(out / "train.jsonl"), "--output-dir", str(out),
         "--train-bpe", str(bpe_vocab)])  # fmt: skip
    tokenizer = Tokenizer({"type": "json", "path": str(out / "tokenizer.json")})
    halves = {"select": held[0::2], "eval": held[1::2]}  # every source in both
    for name, docs in halves.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in docs:
                for piece in sequence_pieces(r["text"], tokenizer, seq_length):
                    f.write(json.dumps({"text": piece, "source": r["source"]}, ensure_ascii=False) + "\n")
    return {
        "training_documents": Counter(r["source"] for r in train),
        "corrupted": Counter(r["corrupted"] for r in train if r["corrupted"]),
        "heldout_documents": {name: len(docs) for name, docs in halves.items()},
    }


def unigram_loss(train_texts: list[str], eval_texts: list[str], tokenizer: Tokenizer) -> float:
    """Cross-entropy (nats/token) on ``eval`` of the training data's token frequencies (add-one):
    the loss of a model that has learned token frequencies and nothing else."""
    counts = np.ones(tokenizer.vocab_size)
    for text in train_texts:
        np.add.at(counts, [*tokenizer.tokenize(text), tokenizer.eod], 1)
    log_p = np.log(counts / counts.sum())
    labels = [t for text in eval_texts for t in [*tokenizer.tokenize(text), tokenizer.eod][1:]]
    return float(-log_p[labels].mean())


def training_sequences(data_dir: Path, tokenizer: Tokenizer, seq_length: int, seed: int, cache_dir: Path) -> int:
    """How many sequences one epoch of the training sources under ``data_dir`` makes (megatron's own
    count: an unweighted blend is one epoch of every source)."""
    import torch.distributed as dist

    from inrun_megatron.data.datasets import Source, build_training_data

    sources = [Source(s, str(data_dir / s)) for s in SOURCES]
    cache_dir.mkdir(parents=True, exist_ok=True)
    # megatron's dataset builder asks for the rank: a process group of this one process, unless the
    # caller (a test session, an embedding script) already has one
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", init_method=f"file://{cache_dir / '.process_group'}", rank=0, world_size=1)
    try:
        data = build_training_data(
            sources, tokenizer, seq_length=seq_length, seed=seed, split="100,0,0", train_samples=1, cache_dir=cache_dir
        )
    finally:
        if own_group:
            dist.destroy_process_group()
    return sum(len(ds) for ds in data.train.datasets)


# --------------------------------------------------------------------------------------
# runs


def run(command: list[str], wait: bool = True, **kwargs) -> subprocess.Popen:
    """Start ``command`` in the repository root; wait for it and fail when it fails, unless not ``wait``."""
    print("+ " + " ".join(command), flush=True)
    process = subprocess.Popen(command, cwd=ROOT, **kwargs)
    if wait and process.wait():
        raise SystemExit(f"failed (exit status {process.returncode}): {' '.join(command)}")
    return process


def write_ids(path: Path, ids: np.ndarray) -> None:
    path.write_text("".join(f"{i}\n" for i in ids.tolist()))


def read_ids(path: Path) -> np.ndarray:
    return np.sort(np.loadtxt(path, dtype=np.int64, ndmin=1))


def random_drop(num_samples: int, keep: int, seed: int) -> np.ndarray:
    """``keep`` of the ids ``0..num_samples-1`` drawn at random: the baseline that drops as many."""
    return np.sort(np.random.default_rng(seed).choice(num_samples, size=keep, replace=False))


def pretrain(
    out: Path,
    name: str,
    ids: Path,
    *,
    num_samples: int,
    steps: int,
    targets: list[str],
    data_dir: Path | None = None,
    seed: int | None = None,
    adam_values: bool = True,
    document_values: bool = False,
    wait: bool = True,
):
    """One run of launch/pretrain_gpt.py on the sample ids of ``ids`` (of the ``num_samples``-sequence
    training dataset of the sources under ``data_dir``, default ``out/data``: the full training data),
    from scratch; its run directory, or its process when not ``wait``. ``seed``
    (default the config's) seeds the initialisation and megatron's dataset order alike, so the ids
    of one seed name other sequences under another: only a run on every id may change it. A run that
    only measures its targets' loss records no ``adam_values`` (half the score rows); only the scored
    run records ``document_values`` (docs/DESIGN.md §2.9), for the report's document AUROC."""
    run_dir = out / name
    data_dir = data_dir or out / "data"
    target_list = [{"name": t, "jsonl": str(out / "data" / f"{t}.jsonl")} for t in targets]
    overrides = [
        f"output.run_dir={run_dir}",
        f"data.tokenizer.path={out / 'data' / 'tokenizer.json'}",
        *(f"data.sources.{i}.prefix={data_dir / s}" for i, s in enumerate(SOURCES)),
        f"data.cache_dir={out / 'data_cache'}",
        f"data.train_ids={ids}",
        f"data.train_samples={num_samples}",
        f"training.train_iters={steps}",
        f"optimizer.lr_warmup_iters={max(1, steps // 10)}",  # warm up over the first 10% of the steps
        f"validation.targets={json.dumps(target_list)}",
        *([f"training.seed={seed}"] if seed is not None else []),
        *([] if adam_values else ["scoring.optimizer_values=false"]),
        *(["scoring.document_values=true"] if document_values else []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    process = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   "launch/pretrain_gpt.py", "--config", str(CONFIG), *overrides], wait=wait, env=env)  # fmt: skip
    return run_dir if wait else process


def loss_curve(run_dir: Path, target: str) -> np.ndarray:
    """The target's validation loss at every step (measured at the step's weights, before its update)."""
    with Scores(run_dir) as scores:
        totals = scores.values().step_totals()
    mine = totals.filter(pc.equal(totals.column("target"), target)).sort_by("step")
    return mine.column("validation_loss").to_numpy(zero_copy_only=False).astype(float)


def steps_to_reach(curve: np.ndarray, level: float) -> int | None:
    """Updates made before the loss is first at or below ``level`` (None: never)."""
    reached = np.nonzero(curve <= level)[0]
    return int(reached[0]) if reached.size else None


def steps_saved(curated: int | None, full: int) -> float:
    return math.nan if curated is None else 1.0 - curated / full


def spread(numbers: list[float | None]) -> dict:
    """Mean, sample standard deviation, min and max of the numbers that are not None, and how many
    are None (runs that never reached the loss): the random arm over its seeds."""
    known = np.array([x for x in numbers if x is not None], dtype=float)
    return {
        "n": len(numbers),
        "missing": len(numbers) - known.size,
        "mean": float(known.mean()) if known.size else math.nan,
        "std": float(known.std(ddof=1)) if known.size > 1 else math.nan,
        "min": float(known.min()) if known.size else math.nan,
        "max": float(known.max()) if known.size else math.nan,
    }


def curate_row(scores: Scores, target: str = SELECT) -> str:
    """The score row the demo curates on: ``target``'s Adam-aware value (docs/DESIGN.md §1.5)."""
    return scores.score_row(target, VALUE)


def run_side_by_side(jobs: dict[str, dict], parallel: int, start) -> None:
    """``start(name, **job)`` (a :func:`pretrain` without waiting) for every job, ``parallel`` at a
    time, in order; stop at the first that fails."""
    names = list(jobs)
    for first in range(0, len(names), parallel):
        started = {name: start(name, **jobs[name]) for name in names[first : first + parallel]}
        for name, process in started.items():
            if process.wait():
                raise SystemExit(f"the {name} run failed (exit status {process.returncode}); see its output above")


def training_documents(index) -> list[tuple[str, int]]:
    """Every training document as (source, document id), in that order: what a document drop draws from."""
    return [(source, d) for source in SOURCES for d in index.documents(source).column("document_id").to_pylist()]


def trained_documents(index, num_samples: int) -> list[tuple[str, int]]:
    """The (source, document id) pairs with input tokens in the ``num_samples`` sequences of the
    dataset, sorted: the documents a run on all of them trains on (a sequence's last token is only a
    label, as ``inrun-scores by-document`` counts spans)."""
    found = set()
    for sample in index.lookup(np.arange(num_samples)).to_pylist():
        documents, tokens = sample["document_ids"], sample["document_tokens"]
        found.update((sample["source"], d) for d in (documents if tokens[-1] > 1 else documents[:-1]))
    return sorted(found)


def read_documents_list(path: Path) -> list[tuple[str, int]]:
    """The (source, document id) pairs of a ``curate --by-document`` output (JSON lines)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [(r["source"], r["document_id"]) for r in rows]


def data_tokenizer(out: Path) -> Tokenizer:
    """The tokenizer the demo trained on its corpus (every run's)."""
    return Tokenizer({"type": "json", "path": str(out / "data" / "tokenizer.json")})


def repack(
    out: Path, name: str, index, keep: list[tuple[str, int]], *, tokenizer: Tokenizer, seq_length: int, seed: int
) -> dict:
    """The training data of a retraining on the documents ``keep`` only: their lines of the corpus
    they were tokenized from (the preprocessing's document table names file and line), tokenized
    again with the full data's ``tokenizer`` into ``out/<name>-data``, which megatron packs anew; the
    :func:`pretrain` arguments that train on every sequence of it."""
    data_dir = out / f"{name}-data"
    data_dir.mkdir(parents=True)
    kept = set(keep)
    lines: dict[str, list[int]] = {}  # input file -> 1-based lines of the kept documents
    for source in SOURCES:
        documents = index.documents(source).to_pylist()
        mine = [d for d in documents if (source, d["document_id"]) in kept]
        if not mine:
            raise SystemExit(f"{name}: keeps no {source} document; every source needs one to retrain on")
        for d in mine:
            lines.setdefault(d["input"], []).append(d["line"])
    with open(data_dir / "train.jsonl", "w", encoding="utf-8") as f:
        for path, numbers in lines.items():
            text = Path(path).read_text(encoding="utf-8").splitlines()
            f.writelines(text[n - 1] + "\n" for n in sorted(numbers))
    infos = preprocess([data_dir / "train.jsonl"], data_dir, tokenizer)
    if sum(info["documents"] for info in infos.values()) != len(kept):
        raise SystemExit(f"{name}: tokenized {infos} documents, not the {len(kept)} kept")
    num_samples = training_sequences(data_dir, tokenizer, seq_length, seed, data_dir / "cache")
    write_ids(data_dir / "ids.txt", np.arange(num_samples))
    return {"ids": data_dir / "ids.txt", "num_samples": num_samples, "data_dir": data_dir}


# --------------------------------------------------------------------------------------


def corruption_report(run_dir: Path, dropped: np.ndarray | None, target: str = SELECT) -> dict:
    """AUROC of the curation view's low values for the planted corruption, of the Adam-aware value
    (the one curated on) and of the SGD value, and which sequences of each kind are among the
    ``dropped`` sequence ids (None: curate dropped documents, not sequences)."""
    aurocs = {}
    with Scores(run_dir) as scores:
        index = scores.index()
        for value in (VALUE, "sgd"):
            row = scores.score_row(target, value)
            row_ids, values = demo_report.view_values(scores, VIEW, [row])
            row_fractions = demo_report.corrupted_fractions(index, row_ids)
            aurocs[row] = demo_report.corruption_aurocs(values[row], row_fractions)
            if value == VALUE:  # the row curate read: what it dropped
                ids, fractions = row_ids, row_fractions
    if dropped is None:
        return {"auroc": aurocs}
    mostly = {kind: ids[f > 0.5] for kind, f in fractions.items()}
    clean = ids[sum(fractions.values()) == 0]
    counts = {kind: (int(np.isin(members, dropped).sum()), len(members)) for kind, members in mostly.items()}
    counts["clean"] = (int(np.isin(clean, dropped).sum()), len(clean))
    return {"auroc": aurocs, "dropped_of": counts}


def document_corruption_report(
    run_dir: Path, target: str = SELECT, dropped: list[tuple[str, int]] | None = None
) -> dict:
    """AUROC of the curation view's low values for the planted corruption *per document*
    (docs/DESIGN.md §1.7): each training document's value, as ``inrun-scores by-document`` sums the
    scored run's document rows (docs/DESIGN.md §2.9), against the corruption the demo corpus planted
    in it, for the Adam-aware and the SGD value; how many documents of each kind were scored; and,
    when curate dropped documents (``dropped``: (source, document id)), how many of the scored
    documents of each kind."""
    aurocs, counts = {}, {}
    with Scores(run_dir) as scores:
        kinds = demo_report.document_kinds(scores.index())
        for value in (VALUE, "sgd"):
            row = scores.score_row(target, value)
            documents = by_document(scores, target=row, view=VIEW, k=0).data["documents"]
            values, fractions = document_fractions(documents, kinds)
            aurocs[row] = demo_report.corruption_aurocs(values, fractions)
            counts[row] = {kind: int(f.sum()) for kind, f in fractions.items()}
            counts[row]["clean"] = len(documents) - sum(counts[row].values())
            if value == VALUE:  # the row curate read
                scored = [(d["source"], d["document_id"]) for d in documents]
    found = {"document_auroc": aurocs, "documents_of": counts}
    if dropped is not None:
        of_kind: dict[str, list[int]] = {}
        for source, d in scored:
            of_kind.setdefault(kinds[source][d] or "clean", [0, 0])[1] += 1
        for source, d in dropped:
            of_kind[kinds[source][d] or "clean"][0] += 1
        found["dropped_documents_of"] = {kind: tuple(n) for kind, n in sorted(of_kind.items())}
    return found


def document_fractions(documents: list[dict], kinds: dict[str, list]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The values of by-document's rows and, per corruption kind, 1 for each document of that kind and
    0 for the others (a document is all of one kind): the form ``corruption_aurocs`` reads."""
    values = np.array([d["value"] for d in documents], dtype=float)
    labels = [kinds[d["source"]][d["document_id"]] for d in documents]
    planted = sorted({label for label in labels if label})
    return values, {kind: np.array([label == kind for label in labels], dtype=float) for kind in planted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/curate-demo"))
    parser.add_argument("--documents", type=int, default=400, help="training documents per source")
    parser.add_argument("--heldout", type=int, default=8, help="clean held-out documents per source")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the training sequences (at least 2)")
    parser.add_argument("--random-seeds", type=int, default=3, help="random drops of the curated size, one run each")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one process, one core each)")
    parser.add_argument("--global-batch-size", type=int, default=16, help="as configs/curate-demo.yaml")
    parser.add_argument("--seed", type=int, default=1234, help="as configs/curate-demo.yaml")
    parser.add_argument("--seq-length", type=int, default=128, help="as configs/curate-demo.yaml")
    parser.add_argument("--granularity", choices=GRANULARITIES, default="document",
                        help="what curate and the random drops drop (default %(default)s)")  # fmt: skip
    parser.add_argument("--report-only", action="store_true", help="only the report, from the runs under --out")
    args = parser.parse_args()
    # the Adam-aware value is not defined at the optimizer's first step (docs/DESIGN.md §1.5): a
    # second epoch gives the sequences of that step a value
    if args.epochs < 2:
        parser.error(f"--epochs {args.epochs}: at least 2, so that every sequence has an Adam-aware value")
    if args.random_seeds < 2:
        parser.error(f"--random-seeds {args.random_seeds}: at least 2, so that the random arm has a spread")
    if args.parallel < 1:
        parser.error(f"--parallel {args.parallel}: at least 1")
    out = args.out.resolve()
    if not args.report_only:
        start = time.perf_counter()
        loop(out, args)
        print(f"\ncurate demo: data and runs took {time.perf_counter() - start:.0f} s of wall time")
    report(out)


def random_name(seed: int) -> str:
    return f"random-{seed}"


def loop(out: Path, args: argparse.Namespace) -> None:
    """Data, the full runs (one with scoring on ``select``), curate, and the retrainings (see the
    module docstring)."""
    if out.exists():
        shutil.rmtree(out)
    data = build_data(out / "data", documents=args.documents, heldout=args.heldout, seq_length=args.seq_length,
                      bpe_vocab=2048)  # fmt: skip
    num_samples = training_sequences(out / "data", data_tokenizer(out), args.seq_length, args.seed, out / "data_cache")
    steps = args.epochs * num_samples // args.global_batch_size
    print(f"data: {dict(data['training_documents'])} training documents, corrupted {dict(data['corrupted'])};"
          f" held out {data['heldout_documents']} documents; {num_samples} training sequences of {args.seq_length}"
          f" tokens; every run {steps} steps ({args.epochs} epochs of the full data)", flush=True)  # fmt: skip
    write_ids(out / "all_ids.txt", np.arange(num_samples))

    def start(name: str, **job) -> subprocess.Popen:
        return pretrain(out, name, steps=steps, wait=False, **{"num_samples": num_samples, **job})

    # the second full run needs no values on select: it only measures eval, beside the scored one
    full = {"ids": out / "all_ids.txt", "targets": [SELECT, EVAL], "document_values": True}
    second = {"ids": out / "all_ids.txt", "targets": [EVAL], "seed": SECOND_SEED, "adam_values": False}
    run_side_by_side({"full": full, "full-seed2": second}, args.parallel, start)
    retrain = (retrain_documents if args.granularity == "document" else retrain_sequences)(out, args, num_samples)
    sizes = {name: job.pop("size") for name, job in retrain.items()}
    (out / "arms.json").write_text(json.dumps({"granularity": args.granularity, "sizes": sizes}, indent=2))
    for job in retrain.values():
        job |= {"targets": [EVAL], "adam_values": False}
    run_side_by_side(retrain, args.parallel, start)


def retrain_sequences(out: Path, args: argparse.Namespace, num_samples: int) -> dict[str, dict]:
    """Curate the full run's sequences; the retrainings on the kept and on random sequence ids of its
    dataset, each with its size (sequences, documents: unknown, a sequence packs parts of several)."""
    with Scores(out / "full" / "merged") as scores:
        row = curate_row(scores)
        curated = curate(scores, out / "keep_ids.txt", target=row, drop_negative=True, view=VIEW,
                         dropped_out=out / "dropped_ids.txt")  # fmt: skip
    kept, dropped = curated.data["kept"], curated.data["dropped"]
    if kept + dropped != num_samples:
        raise SystemExit(f"curate saw {kept + dropped} of the {num_samples} training sequences in row {row}")
    print(f"curate (value {row}, view {VIEW}, --drop-negative): kept {kept}, dropped {dropped}"
          f" of {num_samples} sequences", flush=True)  # fmt: skip
    retrain = {"curated": {"ids": out / "keep_ids.txt", "size": [kept, None]}}
    for seed in range(1, args.random_seeds + 1):
        ids = out / f"{random_name(seed)}_ids.txt"
        write_ids(ids, random_drop(num_samples, kept, args.seed + seed))
        retrain[random_name(seed)] = {"ids": ids, "size": [kept, None]}
    return retrain


def retrain_documents(out: Path, args: argparse.Namespace, num_samples: int) -> dict[str, dict]:
    """Curate the full run's training documents (``curate --by-document``); the retrainings on the kept
    and on as many random documents, each packed anew (:func:`repack`), with its size (sequences,
    documents). Both choose among the documents ``full`` trained on, the ones curate decided on:
    megatron leaves out the tokens after an epoch's last whole sequence, so a document there is in
    no sequence, has no value and is in no retraining."""
    with Scores(out / "full" / "merged") as scores:
        row = curate_row(scores)
        curated = curate(scores, out / "keep_documents.jsonl", target=row, drop_negative=True, view=VIEW,
                         dropped_out=out / "dropped_documents.jsonl", by_document=True)  # fmt: skip
        index = scores.index()
    keep = read_documents_list(out / "keep_documents.jsonl")
    scored = sorted(keep + read_documents_list(out / "dropped_documents.jsonl"))
    kept, dropped = curated.data["kept"], curated.data["dropped"]
    trained = trained_documents(index, num_samples)
    if scored != trained:
        raise SystemExit(f"curate saw {len(scored)} documents in row {row}, full trained on {len(trained)}")
    print(f"curate --by-document (value {row}, view {VIEW}, --drop-negative): kept {kept}, dropped {dropped}"
          f" of the {len(scored)} documents full trained on ({len(training_documents(index))} training documents)",
          flush=True)  # fmt: skip
    options = {"tokenizer": data_tokenizer(out), "seq_length": args.seq_length, "seed": args.seed}
    keeps = {"curated": keep}
    for seed in range(1, args.random_seeds + 1):
        keeps[random_name(seed)] = [scored[i] for i in random_drop(len(scored), kept, args.seed + seed).tolist()]
    retrain = {}
    for name, keep in keeps.items():
        job = repack(out, name, index, keep, **options)
        retrain[name] = {**job, "size": [job["num_samples"], len(keep)]}
        print(f"{name}: {len(keep)} documents packed into {job['num_samples']} sequences", flush=True)
    return retrain


def report(out: Path) -> None:
    """Losses, steps to reach the full run's final loss (per run; mean and spread of the random
    draws), the corruption found; the last line is ``steps_saved=<fraction>``."""
    num_samples = len(read_ids(out / "all_ids.txt"))
    arms = json.loads((out / "arms.json").read_text())
    by_document = arms["granularity"] == "document"
    if by_document:
        dropped_ids, dropped_documents = None, read_documents_list(out / "dropped_documents.jsonl")
    else:
        dropped_ids, dropped_documents = read_ids(out / "dropped_ids.txt"), None
    randoms = sorted(name for name in arms["sizes"] if name.startswith("random-"))
    runs = ["full", "full-seed2", "curated", *randoms]
    curves = {name: loss_curve(out / name, EVAL) for name in runs}
    level = curves["full"][-1]
    reach = {name: steps_to_reach(curve, level) for name, curve in curves.items()}
    final = {name: float(curve[-1]) for name, curve in curves.items()}
    found = corruption_report(out / "full" / "merged", dropped_ids)
    found_documents = document_corruption_report(out / "full" / "merged", dropped=dropped_documents)
    tokenizer = data_tokenizer(out)
    texts = [json.loads(line)["text"] for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    eval_texts = [json.loads(line)["text"] for line in (out / "data" / "eval.jsonl").read_text().splitlines()]
    unigram = unigram_loss(texts, eval_texts, tokenizer)

    print(f"\nplanted corruption found by low values in the view {VIEW!r} (a sequence's value as a multiple of its")
    print("step's mean |value|, averaged over its visits), AUROC of 'lower value = corrupted';")
    print(f"curate uses the Adam-aware value ({SELECT}{ADAM_ROW_SUFFIX}), the SGD value ({SELECT}) is shown beside it:")
    demo_report.print_table("", found["auroc"])
    if not by_document:
        print("dropped by curate: " + ", ".join(f"{d} of {n} {k}" for k, (d, n) in found["dropped_of"].items()))
    print(f"\nthe same per training document (inrun-scores by-document, view {VIEW!r}: the mean over a document's")
    print("span rows of each span's value as a multiple of its step's mean |span value|); a document is of one kind:")
    demo_report.print_table("", found_documents["document_auroc"])
    counted = found_documents["documents_of"][f"{SELECT}{ADAM_ROW_SUFFIX}"]
    print("documents scored: " + ", ".join(f"{n} {k}" for k, n in counted.items()))
    if by_document:
        dropped_of = found_documents["dropped_documents_of"]
        print("dropped by curate --by-document: " + ", ".join(f"{d} of {n} {k}" for k, (d, n) in dropped_of.items()))
    print(f"\nvalidation loss on '{EVAL}' (nats/token; token frequencies alone: {unigram:.3f});")
    print(f"curate and the random drops drop {arms['granularity']}s:")
    header = f"  {'run':<12}{'documents':>10}{'sequences':>10}{'steps':>8}{'final loss':>12}"
    print(f"{header}{'steps to reach full final':>28}")
    documents = sum(counted.values())  # every training document: the full runs train on all of them
    sizes = {"full": [num_samples, documents], "full-seed2": [num_samples, documents], **arms["sizes"]}
    for name, curve in curves.items():
        where = "never" if reach[name] is None else str(reach[name])
        sequences, documents = sizes[name]
        documents = "?" if documents is None else documents
        print(f"  {name:<12}{documents:>10}{sequences:>10}{len(curve):>8}{final[name]:>12.4f}{where:>28}")
    random_arm = {
        "steps_to_reach": spread([reach[n] for n in randoms]),
        "final_loss": spread([final[n] for n in randoms]),
    }
    steps_arm, loss_arm = random_arm["steps_to_reach"], random_arm["final_loss"]
    print(f"  random, {len(randoms)} draws: steps to reach {steps_arm['mean']:.1f} ± {steps_arm['std']:.1f}"
          f" (min {steps_arm['min']:.0f}, max {steps_arm['max']:.0f}, never {steps_arm['missing']}),"
          f" final loss {loss_arm['mean']:.4f} ± {loss_arm['std']:.4f} (min {loss_arm['min']:.4f})")  # fmt: skip
    summary = {
        "num_samples": num_samples,
        "granularity": arms["granularity"],
        "sizes": sizes,
        "curated_on": f"{SELECT}{ADAM_ROW_SUFFIX}",
        "view": VIEW,
        "final_loss": final,
        "steps": {n: len(c) for n, c in curves.items()},
        "steps_to_reach": reach,
        "random_arm": random_arm,
        "unigram_loss": unigram,
        **found,
        **found_documents,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nnumbers in {out / 'summary.json'}")
    print(f"steps_saved={steps_saved(reach['curated'], reach['full']):.3f}")


if __name__ == "__main__":
    main()

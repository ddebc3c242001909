"""The pieces of the curation loop (tools/curate_demo.py, ``make curate-demo``) on a tiny setting:
a scored run on the demo corpus over two epochs, ``inrun-scores curate`` on the Adam-aware value,
the corruption report of both values (per sequence, and per document against a hand computation
from the document rows), a retraining through ``data.train_ids`` that trains on exactly the kept
sequences, and ``curate --by-document`` with a retraining on exactly the kept documents packed
again; the random drops keep as many; the runs go side by side; held-out pieces fit a sequence;
steps to reach a loss and the spread of the random arm. Not the 30-minute demo itself."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from inrun_megatron.data.datasets import WithSampleIds, read_train_ids

from pretrain_common import read_rows, run_pretrain, tiny_config

spec = importlib.util.spec_from_file_location("curate_demo", Path(__file__).parents[1] / "tools" / "curate_demo.py")
curate_demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(curate_demo)


def _ok(proc) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    return proc.stdout


def _demo_data(root: Path) -> Path:
    """A small demo corpus (a third of its documents corrupted), tokenized by bytes, under ``root/data``."""
    from inrun_megatron.data import Tokenizer
    from inrun_megatron.data.demo_corpus import build_corpus
    from inrun_megatron.data.indexed import preprocess

    build_corpus(root / "corpus.jsonl", documents=30, corrupted=0.3)
    preprocess([root / "corpus.jsonl"], root / "data", Tokenizer({"type": "bytes"}))
    return root / "data"


#: Two epochs of 16 sequences, as the demo's full run (data.train_ids = all): steps, batch, sequences.
STEPS, BATCH, N = 4, 8, 16
SEQ_LENGTH = 32  # tiny_config's


def _data_config(data_dir: Path, **more) -> dict:
    """The data section of the tiny runs, as configs/curate-demo.yaml's: unweighted sources of
    ``data_dir``, no validation split (the targets are held-out JSON lines), reset masks."""
    return {
        "tokenizer": {"type": "bytes"},
        "sources": [{"name": s, "prefix": str(data_dir / s)} for s in curate_demo.SOURCES],
        "split": "100,0,0",
        "reset_attention_mask": True,
        "reset_position_ids": True,
        **more,
    }


def _tiny_run(root: Path, data_dir: Path, name: str, ids: Path, num_samples: int, heldout: Path, **sections) -> Path:
    """One tiny run ``root/name`` on the sample ids ``ids`` of the ``num_samples``-sequence dataset
    under ``data_dir``, measuring the target ``heldout-a`` (the JSON lines ``heldout``)."""
    config = tiny_config(
        data_dir,
        root / name,
        parallel={"tensor_model_parallel_size": 1},
        training={"train_iters": STEPS, "global_batch_size": BATCH},
        data=_data_config(data_dir, train_ids=str(ids), train_samples=num_samples),
        validation={"targets": [{"name": "heldout-a", "jsonl": str(heldout)}]},
        **sections,
    )
    _ok(run_pretrain(config, 1))
    return root / name


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory) -> Path:
    """The demo's scored full run, tiny: every one of the first ``N`` sequences, two epochs, document
    values on, against a held-out target of pieces of one sequence (``tmp/heldout.jsonl``)."""
    from inrun_megatron.data import Tokenizer
    from inrun_megatron.data.demo_corpus import build_corpus

    root = tmp_path_factory.mktemp("curate")
    data_dir = _demo_data(root)
    held = root / "held.jsonl"
    build_corpus(held, documents=1, corrupted=0.0, seed=1)
    texts = [json.loads(line)["text"] for line in held.read_text(encoding="utf-8").splitlines()]
    pieces = curate_demo.sequence_pieces(texts[0], Tokenizer({"type": "bytes"}), SEQ_LENGTH)[:4]
    (root / "heldout.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in pieces))
    curate_demo.write_ids(root / "all.txt", np.arange(N))
    scoring = {"flush_every": 3, "document_values": True}  # as the demo's scored run
    return _tiny_run(root, data_dir, "scored", root / "all.txt", N, root / "heldout.jsonl", scoring=scoring)


@pytest.mark.megatron
def test_curating_on_the_adam_value_and_retraining_on_exactly_the_kept_ids(scored_run, tmp_path):
    from inrun_megatron.analysis.commands import curate
    from inrun_megatron.analysis.inputs import Scores

    steps, batch, n = STEPS, BATCH, N
    root = scored_run.parent
    with Scores(scored_run / "merged") as scores:
        row = curate_demo.curate_row(scores, "heldout-a")
        report = curate(
            scores,
            tmp_path / "keep.txt",
            target=row,
            drop_fraction=0.25,
            view=curate_demo.VIEW,
            dropped_out=tmp_path / "drop.txt",
        )
    assert row == "heldout-a:adam"  # Adam runs: the Adam-aware value (docs/DESIGN.md §1.5)
    kept, dropped = curate_demo.read_ids(tmp_path / "keep.txt"), curate_demo.read_ids(tmp_path / "drop.txt")
    # the first step has no Adam-aware value, but the second epoch gives its sequences one: curate
    # sees every sequence (the demo checks this before it retrains)
    assert (report.data["kept"], report.data["dropped"]) == (len(kept), len(dropped)) == (12, 4)
    np.testing.assert_array_equal(np.union1d(kept, dropped), np.arange(n))

    # the corruption report: both values' AUROC, and the dropped sequences by kind
    assert report.data["granularity"] == "sequence"
    found = curate_demo.corruption_report(scored_run / "merged", dropped, "heldout-a")
    assert list(found["auroc"]) == ["heldout-a:adam", "heldout-a"]
    cells_adam, cells_sgd = found["auroc"].values()
    assert list(cells_adam) == list(cells_sgd) and not math.isnan(cells_adam["all kinds"])  # corrupted and clean
    for cells in found["auroc"].values():
        assert all(0.0 <= auroc <= 1.0 for auroc in cells.values() if not math.isnan(auroc))
    assert sum(d for d, _ in found["dropped_of"].values()) <= len(dropped)
    assert sum(m for _, m in found["dropped_of"].values()) <= n

    # the same per document: by-document's values in the view, against the corpus's own labels
    per_document = curate_demo.document_corruption_report(scored_run / "merged", "heldout-a")
    assert list(per_document["document_auroc"]) == ["heldout-a:adam", "heldout-a"]
    for row, cells in per_document["document_auroc"].items():
        by_hand, documents, clean = _document_aurocs_by_hand(scored_run / "merged", row, root / "corpus.jsonl")
        assert not math.isnan(by_hand["all kinds"])  # both corrupted and clean documents were trained on
        assert cells == pytest.approx(by_hand, nan_ok=True)
        counted = per_document["documents_of"][row]
        assert (sum(counted.values()), counted["clean"]) == (documents, clean)

    # retrain from scratch on the kept ids: the run sees them in increasing order, repeated to fill its steps
    _tiny_run(tmp_path, root / "data", "retrain", tmp_path / "keep.txt", n, root / "heldout.jsonl")
    rows = read_rows(tmp_path / "retrain").filter(ds.field("target") == "heldout-a")
    trained = rows.sort_by([("step", "ascending"), ("sample_id", "ascending")])["sample_id"].to_numpy()
    in_order = np.resize(kept, steps * batch).reshape(steps, batch)
    np.testing.assert_array_equal(trained, np.sort(in_order, axis=1).ravel())  # rows sorted by id within a step
    assert not np.isin(trained, dropped).any()
    assert len(curate_demo.loss_curve(tmp_path / "retrain", "heldout-a")) == steps

    # the random drops keep as many ids, all different, of the same training data; one draw per seed
    draws = [curate_demo.random_drop(n, len(kept), seed=seed) for seed in (3, 4)]
    for draw in draws:
        assert len(np.unique(draw)) == len(kept) and draw.min() >= 0 and draw.max() < n
    np.testing.assert_array_equal(draws[0], curate_demo.random_drop(n, len(kept), seed=3))
    assert not np.array_equal(draws[0], draws[1])


@pytest.mark.megatron
def test_curating_documents_and_retraining_on_exactly_the_kept_documents(scored_run, tmp_path):
    from inrun_megatron.analysis.cli import main as inrun_scores
    from inrun_megatron.analysis.commands import curate
    from inrun_megatron.analysis.documents import by_document
    from inrun_megatron.analysis.dump import DumpError
    from inrun_megatron.analysis.inputs import Scores
    from inrun_megatron.data import Tokenizer

    root = scored_run.parent
    with Scores(scored_run / "merged") as scores:
        row = curate_demo.curate_row(scores, "heldout-a")
        every = curate_demo.training_documents(scores.index())
        values = by_document(scores, target=row, view=curate_demo.VIEW, k=0).data["documents"]
        report = curate(scores, tmp_path / "keep.jsonl", target=row, drop_fraction=0.25, view=curate_demo.VIEW,
                        dropped_out=tmp_path / "drop.jsonl", by_document=True)  # fmt: skip
        accumulated = by_document(scores, target=row, k=0).data["documents"]  # some are negative here
        negative = curate(scores, tmp_path / "positive.jsonl", target=row, drop_negative=True, by_document=True)
        index = scores.index()
    value_of = {(d["source"], d["document_id"]): d["value"] for d in values}
    kept = curate_demo.read_documents_list(tmp_path / "keep.jsonl")
    dropped = curate_demo.read_documents_list(tmp_path / "drop.jsonl")
    # every scored document (of the 16 sequences trained on) is listed once, kept or dropped
    assert sorted(value_of) == sorted(kept + dropped) and set(value_of) < set(every)
    assert len(dropped) == round(0.25 * len(value_of)) == report.data["dropped"]
    assert max(value_of[d] for d in dropped) <= min(value_of[d] for d in kept)  # the lowest went
    assert kept == sorted(kept) and dropped == sorted(dropped)  # in (source, document id) order
    lines = [json.loads(line) for line in (tmp_path / "keep.jsonl").read_text().splitlines()]
    assert all(r["value"] == value_of[(r["source"], r["document_id"])] for r in lines)
    assert report.data["granularity"] == "document" and report.data["view"]["name"] == curate_demo.VIEW
    assert report.data["kept_value"] == pytest.approx(sum(value_of[d] for d in kept))
    # --drop-negative drops exactly the documents with a negative value
    accumulated_of = {(d["source"], d["document_id"]): d["value"] for d in accumulated}
    positive = set(curate_demo.read_documents_list(tmp_path / "positive.jsonl"))
    assert positive == {d for d, v in accumulated_of.items() if v >= 0}
    assert negative.data["dropped"] == sum(v < 0 for v in accumulated_of.values()) > 0

    # the command line writes the same file
    argv = ["curate", str(scored_run / "merged"), "--target", "heldout-a", "--value", "adam", "--quiet", "--view",
            curate_demo.VIEW, "--drop-fraction", "0.25", "--by-document", "-o", str(tmp_path / "c.jsonl")]  # fmt: skip
    assert inrun_scores(argv) == 0
    assert (tmp_path / "c.jsonl").read_text() == (tmp_path / "keep.jsonl").read_text()

    # retrain from scratch on the kept documents only, packed again: every document of every trained
    # sequence is the text of a kept document, and every kept document was tokenized into the new data
    job = curate_demo.repack(tmp_path, "curated", index, kept, tokenizer=Tokenizer({"type": "bytes"}),
                             seq_length=SEQ_LENGTH, seed=7)  # fmt: skip
    corpus = (root / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    line_of = {(s, d["document_id"]): d["line"] for s in curate_demo.SOURCES for d in index.documents(s).to_pylist()}
    kept_texts = sorted(json.loads(corpus[line_of[d] - 1])["text"] for d in kept)
    repacked = (job["data_dir"] / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert sorted(json.loads(line)["text"] for line in repacked) == kept_texts
    assert job["num_samples"] < curate_demo.training_sequences(
        root / "data", Tokenizer({"type": "bytes"}), SEQ_LENGTH, 7, tmp_path / "all-cache"
    )
    retrain = _tiny_run(tmp_path, job["data_dir"], "retrain", job["ids"], job["num_samples"], root / "heldout.jsonl")
    with Scores(retrain) as scores:
        trained = np.unique(read_rows(retrain)["sample_id"].to_numpy())
        new_index = scores.index()
        samples = new_index.lookup(trained).to_pylist()
        new_line = {s: new_index.documents(s).column("line").to_pylist() for s in curate_demo.SOURCES}
    seen = {json.loads(repacked[new_line[s["source"]][d] - 1])["text"] for s in samples for d in s["document_ids"]}
    assert seen and seen <= set(kept_texts)
    assert not seen & {json.loads(corpus[line_of[d] - 1])["text"] for d in dropped}

    # a run without document values is refused before anything is written
    with Scores(retrain) as scores, pytest.raises(DumpError, match="recorded none"):
        curate(scores, tmp_path / "never.jsonl", target="heldout-a", drop_negative=True, view=curate_demo.VIEW,
               by_document=True)  # fmt: skip
    assert not (tmp_path / "never.jsonl").exists()

    # the random drops of documents: as many documents, all different, one draw per seed
    draw = curate_demo.random_drop(len(every), len(kept), seed=3)
    assert len(np.unique(draw)) == len(kept) and draw.max() < len(every)


def _document_aurocs_by_hand(run_dir: Path, row: str, corpus: Path) -> tuple[dict[str, float], int, int]:
    """The document AUROCs of the demo's report, computed from the document rows directly: each span
    row's value over its step's mean |value| (step-scaled), averaged per (source, document id) over
    its trained rows, labelled from the corpus file, and every (corrupted, clean) pair compared;
    with the number of documents and of clean ones."""
    from inrun_megatron.analysis.documents import document_rows
    from inrun_megatron.analysis.inputs import Scores

    assert curate_demo.VIEW == "step-scaled"
    with Scores(run_dir) as scores:
        rows = document_rows(scores, row).to_pylist()
        samples = scores.index().lookup(np.unique([r["sample_id"] for r in rows])).to_pylist()
    sample_of = {s["sample_id"]: s for s in samples}
    trained = [r for r in rows if not r["skipped"]]
    step_scale = {}
    for step in {r["step"] for r in trained}:
        magnitudes = [abs(r["value"]) for r in trained if r["step"] == step]
        step_scale[step] = sum(magnitudes) / len(magnitudes)
    scaled = {}
    for r in rows:  # a document only in skipped rows gets the view's neutral 0
        sample = sample_of[r["sample_id"]]
        mine = scaled.setdefault((sample["source"], sample["document_ids"][r["span"]]), [])
        if not r["skipped"]:  # a step of all-zero values (learning rate 0 at the first step) scales to 0
            mine.append(r["value"] / step_scale[r["step"]] if step_scale[r["step"]] else 0.0)
    records = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    kind = {}
    for source in curate_demo.SOURCES:  # document ids count each source's documents in file order
        for i, record in enumerate(r for r in records if r["source"] == source):
            kind[(source, i)] = record["corrupted"]
    value = {key: sum(v) / len(v) if v else 0.0 for key, v in scaled.items()}
    clean = [v for key, v in value.items() if kind[key] is None]

    def lower_is_corrupted(corrupted: list[float]) -> float:
        if not corrupted or not clean:
            return math.nan
        pairs = [(c < k) + 0.5 * (c == k) for c in corrupted for k in clean]
        return sum(pairs) / len(pairs)

    kinds = sorted({k for key, k in kind.items() if key in value and k})
    cells = {"all kinds": lower_is_corrupted([v for key, v in value.items() if kind[key]])}
    for k in kinds:
        cells[f"{k} vs clean"] = lower_is_corrupted([v for key, v in value.items() if kind[key] == k])
    return cells, len(value), len(clean)


def test_train_ids_select_sequences_of_the_dataset():
    dataset = [{key: np.full(4, i) for key in ("tokens", "labels", "loss_mask", "position_ids")} for i in range(10)]
    items = WithSampleIds(dataset, np.array([2, 5, 9, 2]))
    assert len(items) == 4
    assert [int(items[k]["sample_ids"]) for k in range(4)] == [2, 5, 9, 2]
    assert [int(items[k]["tokens"][0]) for k in range(4)] == [2, 5, 9, 2]


def test_bad_train_ids_are_refused(tmp_path):
    path = tmp_path / "ids.txt"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_train_ids(path, 10)
    for text, message in [("", "no sample id"), ("1\n1\n", "more than once"), ("3\n10\n", r"outside \[0, 10\)"),
                          ("1\nx\n", "integer sample ids")]:  # fmt: skip
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_train_ids(path, 10)
    path.write_text("7\n0\n3\n")
    np.testing.assert_array_equal(read_train_ids(path, 10), [0, 3, 7])


def test_heldout_pieces_fit_one_sequence():
    from inrun_megatron.data.tokenizer import Tokenizer

    tokenizer = Tokenizer({"type": "bytes"})
    text = "short line\n" + "x" * 70 + "\n" + "a much longer line " * 12 + "\nend"
    pieces = curate_demo.sequence_pieces(text, tokenizer, 32)
    assert all(len(tokenizer.tokenize(p)) <= 32 for p in pieces)
    assert "".join(pieces).replace("\n", "") == text.replace("\n", "")


def test_steps_to_reach_and_steps_saved():
    curve = np.array([5.0, 4.0, 3.5, 3.0, 3.2, 2.9])
    assert curate_demo.steps_to_reach(curve, 3.0) == 3
    assert curate_demo.steps_to_reach(curve, 2.0) is None
    assert curate_demo.steps_saved(4, 5) == pytest.approx(0.2)
    assert math.isnan(curate_demo.steps_saved(None, 5))


def test_spread_of_the_random_arm_leaves_out_runs_that_never_reached():
    cells = curate_demo.spread([10, None, 14])
    assert (cells["n"], cells["missing"], cells["min"], cells["max"]) == (3, 1, 10.0, 14.0)
    assert cells["mean"] == 12.0 and cells["std"] == pytest.approx(math.sqrt(8.0))
    assert math.isnan(curate_demo.spread([None, None])["mean"]) and math.isnan(curate_demo.spread([5])["std"])


def test_runs_go_side_by_side_in_order_and_a_failure_stops_them(tmp_path):
    started = []

    def start(name: str, code: int) -> subprocess.Popen:
        started.append(name)
        return subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])

    curate_demo.run_side_by_side({"a": {"code": 0}, "b": {"code": 0}, "c": {"code": 0}}, 2, start)
    assert started == ["a", "b", "c"]
    started.clear()
    with pytest.raises(SystemExit, match="the b run failed"):
        curate_demo.run_side_by_side({"a": {"code": 0}, "b": {"code": 3}, "c": {"code": 0}}, 2, start)
    assert started == ["a", "b"]  # c is not started after b failed

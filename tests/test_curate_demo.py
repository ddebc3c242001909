"""The pieces of the curation loop (tools/curate_demo.py, ``make curate-demo``) on a tiny setting:
a scored run, ``inrun-scores curate``, and a retraining through ``data.train_ids`` that trains on
exactly the kept sequences; the random drop keeps as many; held-out pieces fit a sequence;
steps to reach a loss. Not the 30-minute demo itself."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from inrun_megatron.data.datasets import WithSampleIds, read_train_ids

from pretrain_common import prepare_data, read_rows, run_pretrain, tiny_config

spec = importlib.util.spec_from_file_location("curate_demo", Path(__file__).parents[1] / "tools" / "curate_demo.py")
curate_demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(curate_demo)


def _ok(proc) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    return proc.stdout


@pytest.mark.megatron
def test_retraining_trains_exactly_the_ids_curate_kept(tmp_path):
    from inrun_megatron.analysis.commands import curate
    from inrun_megatron.analysis.inputs import Scores

    data_dir = prepare_data(tmp_path)
    single = {"tensor_model_parallel_size": 1}
    steps, batch = 4, 8
    scored = tiny_config(
        data_dir, tmp_path / "scored", parallel=single, training={"train_iters": steps, "global_batch_size": batch}
    )
    _ok(run_pretrain(scored, 1))
    with Scores(tmp_path / "scored" / "merged") as scores:
        report = curate(
            scores,
            tmp_path / "keep.txt",
            target="heldout-a",
            drop_fraction=0.25,
            view=curate_demo.VIEW,
            dropped_out=tmp_path / "drop.txt",
        )
    kept, dropped = curate_demo.read_ids(tmp_path / "keep.txt"), curate_demo.read_ids(tmp_path / "drop.txt")
    n = steps * batch
    assert (report.data["kept"], report.data["dropped"]) == (len(kept), len(dropped)) == (24, 8)
    np.testing.assert_array_equal(np.union1d(kept, dropped), np.arange(n))

    # retrain from scratch on the kept ids: the run sees them in increasing order, repeated to fill its steps
    retrain = tiny_config(
        data_dir,
        tmp_path / "retrain",
        parallel=single,
        training={"train_iters": steps, "global_batch_size": batch},
        data={**scored["data"], "train_ids": str(tmp_path / "keep.txt"), "train_samples": n},
    )
    _ok(run_pretrain(retrain, 1))
    rows = read_rows(tmp_path / "retrain").filter(ds.field("target") == "heldout-a")
    trained = rows.sort_by([("step", "ascending"), ("sample_id", "ascending")])["sample_id"].to_numpy()
    np.testing.assert_array_equal(trained, np.resize(kept, n))
    assert not np.isin(trained, dropped).any()

    # the random drop keeps as many ids, all different, of the same training data
    random_kept = curate_demo.random_drop(n, len(kept), seed=3)
    assert len(np.unique(random_kept)) == len(kept) and random_kept.min() >= 0 and random_kept.max() < n
    np.testing.assert_array_equal(random_kept, curate_demo.random_drop(n, len(kept), seed=3))


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

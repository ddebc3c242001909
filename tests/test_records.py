"""Score dumps: schema, atomic parts, append-only streams, resume without double counting."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

from inrun_megatron.records import ScoreWriter, read_manifest, temporary_path, write_manifest
from inrun_megatron.scores import ValueAccumulator
from inrun_megatron.step_result import StepResult, make_step_result

from common import manifest_for_tests


def _result(step: int, skipped: bool = False) -> StepResult:
    raw = torch.arange(6, dtype=torch.float64).reshape(1, 2, 3) + step
    ids = torch.arange(6).reshape(2, 3) + 100 * step
    return make_step_result(
        step=step,
        raw=raw,
        sample_ids=ids,
        n_tokens=torch.full((2, 3), 7),
        lr=0.5,
        clip_coef=0.8,
        skipped=skipped,
        dp_rank=0,
        validation_losses={"val": 3.0},
        batch_dots={"val": float(raw.sum())},
    )


def _records(step: int, skipped: bool = False):
    return _result(step, skipped).records


def _write(run, steps, *, resume_step=None, flush_every=2, skipped=()):
    writer = ScoreWriter(run, dp_rank=0, flush_every=flush_every, resume_step=resume_step)
    for s in steps:
        writer.write(_result(s, s in skipped))
    writer.close()


def test_rows_round_trip_with_contract(tmp_path):
    write_manifest(tmp_path, manifest_for_tests(config={"lr": 0.5}, targets=[{"name": "val"}]))
    _write(tmp_path, range(5), skipped={3})
    table = ds.dataset(tmp_path / "scores", format="parquet").to_table().sort_by([("step", "ascending")])
    assert table.num_rows == 30
    rows = table.to_pydict()
    assert rows["value"][0] == pytest.approx(0.5 * 0.8 * rows["raw"][0])
    skipped = [i for i, s in enumerate(rows["step"]) if s == 3]
    assert all(np.isnan(rows["raw"][i]) and rows["value"][i] == 0.0 and rows["skipped"][i] for i in skipped)
    steps = ds.dataset(tmp_path / "steps", format="parquet").to_table()
    assert sorted(steps["step"].to_pylist()) == [0, 1, 2, 3, 4]
    manifest = read_manifest(tmp_path)
    assert "positive = the sample lowered the validation loss" in manifest.contract["sign"]
    assert manifest.config == {"lr": 0.5} and manifest.targets == [{"name": "val"}]
    assert "nats" in manifest.columns["scores"]["value"] and "<g_t, G_t>" in manifest.columns["steps"]["batch_dot"]


def test_half_written_part_is_ignored_and_cleaned(tmp_path):
    write_manifest(tmp_path, manifest_for_tests())
    _write(tmp_path, range(2))
    debris = temporary_path(tmp_path / "scores" / "dp00000" / "part-s00000002-s00000003.parquet")
    debris.write_bytes(b"PAR1 truncated")
    table = ds.dataset(tmp_path / "scores", format="parquet").to_table()  # plain reader skips the debris
    assert table.num_rows == 12
    _write(tmp_path, range(2, 4), resume_step=1)
    assert not debris.exists()


def test_resume_drops_steps_after_the_checkpoint(tmp_path):
    write_manifest(tmp_path, manifest_for_tests())
    _write(tmp_path, range(7), flush_every=3)  # parts 0-2, 3-5, 6-6
    _write(tmp_path, range(5, 9), resume_step=4)  # crash after step 6, checkpoint at step 4
    table = ds.dataset(tmp_path / "scores", format="parquet").to_table()
    steps = table["step"].to_numpy()
    assert sorted(set(steps.tolist())) == list(range(9))
    assert all((steps == s).sum() == 6 for s in range(9))  # every step exactly once


def test_existing_stream_needs_resume_step(tmp_path):
    write_manifest(tmp_path, manifest_for_tests())
    _write(tmp_path, range(2))
    with pytest.raises(FileExistsError, match="resume_step"):
        ScoreWriter(tmp_path, dp_rank=0)


def test_accumulator_skips_skipped_steps():
    acc = ValueAccumulator()
    acc.add(_records(0))
    acc.add(_records(0, skipped=True))
    values = acc.values("val")
    assert values[4] == pytest.approx(0.5 * 0.8 * 4.0)


def test_step_result_facts_are_those_of_its_rows():
    result = _result(3, skipped=True)
    c = result.records.columns
    assert (result.step, result.lr, result.clip_coef, result.skipped) == (3, 0.5, 0.8, True)
    assert (c["step"] == 3).all() and (c["lr"] == 0.5).all() and (c["clip_coef"] == 0.8).all() and c["skipped"].all()
    assert result.targets == ["val"] and set(c["target"]) == {"val"}
    with pytest.raises(ValueError, match=r"batch_dots are for targets \['other'\]"):
        make_step_result(
            step=0,
            raw=torch.zeros(1, 1, 1, dtype=torch.float64),
            sample_ids=torch.zeros(1, 1, dtype=torch.int64),
            n_tokens=torch.ones(1, 1, dtype=torch.int64),
            lr=0.5,
            clip_coef=1.0,
            skipped=False,
            dp_rank=0,
            validation_losses={"val": 3.0},
            batch_dots={"other": 0.0},
        )


def test_an_adam_step_result_carries_both_dots_and_rows():
    """A step with Adam-aware rows (docs/DESIGN.md §1.5): its batch_dots name every score row, the
    records and the steps table have a row per score row, the Adam row's loss is its target's."""
    from inrun_megatron.records import step_table

    def result(batch_dots: dict[str, float]) -> StepResult:
        return make_step_result(
            step=1,
            raw=torch.tensor([[[1.0]], [[2.0]]], dtype=torch.float64),
            sample_ids=torch.zeros(1, 1, dtype=torch.int64),
            n_tokens=torch.ones(1, 1, dtype=torch.int64),
            lr=0.5,
            clip_coef=1.0,
            skipped=False,
            dp_rank=0,
            validation_losses={"val": 3.0},
            batch_dots=batch_dots,
        )

    adam = result({"val": 1.0, "val:adam": 2.0})
    assert adam.targets == ["val"] and adam.score_rows == ["val", "val:adam"]
    assert adam.records.columns["target"].tolist() == ["val", "val:adam"]
    assert adam.records.columns["raw"].tolist() == [1.0, 2.0]
    table = step_table(adam)
    assert table.column("target").to_pylist() == ["val", "val:adam"]
    assert table.column("validation_loss").to_pylist() == [3.0, 3.0]
    assert table.column("batch_dot").to_pylist() == [1.0, 2.0]
    for wrong in ({"val": 1.0, "other:adam": 2.0}, {"val:adam": 2.0, "val": 1.0}):
        with pytest.raises(ValueError, match=r"batch_dots are for targets"):
            result(wrong)


def test_manifest_round_trips_and_malformed_ones_are_named(tmp_path):
    import json

    from inrun_megatron.optimizer_values import ADAM, SGD, values_manifest
    from inrun_megatron.records import MANIFEST, SCHEMA_VERSION, RunLayout

    written = manifest_for_tests(
        2,
        data={"sources": []},
        scoring_path="rules",
        launcher="torchrun",
        values=values_manifest(["validation"], [SGD, ADAM]),  # typed again as RunValues
        loss_normalisation="global_batch_tokens",
    )
    write_manifest(tmp_path, written)
    assert read_manifest(tmp_path) == written  # every field, the layout typed again
    path = tmp_path / MANIFEST
    for change, message in (
        ({"schema_version": SCHEMA_VERSION - 1}, f"schema version {SCHEMA_VERSION - 1}, this inrun_megatron reads"),
        ({"format": "something.else"}, "not an inrun_megatron.scores manifest"),
        ({"parallel_layout": {}}, r"unknown fields \['parallel_layout'\]"),
        ({"targets": [{"sequences": 3}]}, "every entry of targets needs a name"),
        ({"layout": {"world_size": 2, "dp": 2}}, "bad layout"),
        ({"values": {"kinds": ["sgd"]}}, "bad values"),
        ({"loss_normalisation": "per_sequence"}, r"manifest.json: unknown loss_normalisation 'per_sequence'"),
    ):
        path.write_text(json.dumps(written.to_dict() | change))
        with pytest.raises(ValueError, match=message):
            read_manifest(tmp_path)
    path.write_text(json.dumps({k: v for k, v in written.to_dict().items() if k != "config"}))
    with pytest.raises(ValueError, match=r"missing fields \['config'\]"):
        read_manifest(tmp_path)
    assert written.layout == RunLayout(world_size=2, data_parallel=2)
    for normalisation in ("microbatch_tokens", "global_batch_tokens"):  # the dump defines what its field names
        assert f"{normalisation}: l_z = s_z / (loss tokens of" in written.contract["loss_normalisations"]


def test_a_scorer_refuses_a_sink_without_the_sink_methods():
    from inrun_megatron.scorer import Scorer

    scorer = Scorer([{"tokens": torch.zeros(1, 2, dtype=torch.int64)}], None)
    with pytest.raises(TypeError, match=r"needs write\(result\), flush\(\) and close\(\).*got list"):
        scorer.sink = []

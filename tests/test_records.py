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

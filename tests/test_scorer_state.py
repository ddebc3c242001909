"""What a scorer keeps does not grow with the samples it has seen (docs/DESIGN.md §2.7): through the
API over many steps, in the pretraining entry point at every checkpoint, and when loading the
checkpoints of earlier versions, which carried accumulated values per sample."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import yaml

from common import load_canonical_weights, make_data, retained_bytes, scored_forward_backward
from launcher import TESTS, torchrun
from pretrain_common import accumulate_from_rows, prepare_data, read_rows, tiny_config

pytestmark = pytest.mark.megatron

STEPS = 40
MEASURED_AFTER = (2, 10, 40)  # steps; the first measurement is after the first steps ran once


def _train(config_kwargs: dict) -> tuple[list[int], list[int], object]:
    """Train a tiny GPT for STEPS scored steps through the API (4 new sample ids per step); return the
    pickled state_dict's and the scorer's retained bytes after each step of MEASURED_AFTER."""
    import torch

    from inrun_megatron.config import ScoringConfig
    from inrun_megatron.megatron import MegatronScorer
    from inrun_megatron.megatron.model import GPTShape, build_gpt

    shape = GPTShape(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=8)
    model = build_gpt(shape)
    load_canonical_weights(model, seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scorer = MegatronScorer(model, make_data(shape, 1, 2, seed=3, first_id=10**6), ScoringConfig(**config_kwargs))
    state_sizes, retained = [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        scored_forward_backward(scorer, model, shape, make_data(shape, 2, 2, seed=10 + step, first_id=4 * step))
        optimizer.step()
        scorer.end_step(lr=0.1)
        if step + 1 in MEASURED_AFTER:
            state_sizes.append(len(pickle.dumps(scorer.state_dict())))
            retained.append(retained_bytes(scorer))
    scorer.detach()
    return state_sizes, retained, scorer


def test_api_scorer_state_does_not_grow_with_steps(megatron_world):
    state_sizes, retained, scorer = _train({})
    assert scorer.step == STEPS and scorer.state_dict() == {"step": STEPS}
    assert len(set(state_sizes)) == 1, f"state_dict bytes after {MEASURED_AFTER} steps: {state_sizes}"
    assert len(set(retained)) == 1, f"bytes the scorer keeps after {MEASURED_AFTER} steps: {retained}"
    with pytest.raises(RuntimeError, match=r"ScoringConfig\(accumulate_values=True\)"):
        scorer.values()

    # The measurement sees per-sample state where there is some: the opt-in accumulator grows.
    _, grown, accumulating = _train({"accumulate_values": True})
    assert grown[0] < grown[1] < grown[2], grown
    assert len(accumulating.values()) == 4 * STEPS
    assert accumulating.state_dict() == {"step": STEPS}  # never in the checkpoint


def test_checkpoint_of_an_earlier_version_loads_without_its_accumulator(megatron_world):
    from inrun_megatron.megatron import MegatronScorer
    from inrun_megatron.megatron.model import GPTShape, build_gpt
    from inrun_megatron.scores import ValueAccumulator, make_step_records

    shape = GPTShape(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=8)
    import torch

    old = ValueAccumulator()
    old.add(
        make_step_records(
            step=0,
            targets=["validation"],
            raw=torch.ones(1, 2, 2, dtype=torch.float64),
            sample_ids=torch.arange(4).view(2, 2),
            n_tokens=torch.full((2, 2), 8),
            lr=0.1,
            clip_coef=1.0,
            skipped=False,
            dp_rank=0,
        )
    )
    scorer = MegatronScorer(build_gpt(shape), make_data(shape, 1, 2, seed=3, first_id=10**6))
    with pytest.warns(UserWarning, match=r"holds in-memory accumulated values of 4 \(sample, target\) pairs"):
        scorer.load_state_dict({"step": 7, "accumulator": old.state_dict()})
    assert scorer.step == 7 and scorer.state_dict() == {"step": 7} and scorer.accumulator is None
    scorer.detach()


@pytest.mark.slow
def test_entry_point_checkpoints_do_not_grow_with_steps(tmp_path):
    """Two data-parallel replicas, a checkpoint every 4 of 16 steps: at each, the scorer's state and
    what it keeps are the same size, and so are the checkpoints on disk. At the end rank 0 merged the
    run's rows into RUN/merged."""
    data_dir = prepare_data(tmp_path)
    run = tmp_path / "run"
    config = tiny_config(
        data_dir,
        run,
        parallel={"tensor_model_parallel_size": 1},
        training={"train_iters": 16},
        checkpoint={"save_interval": 4},
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    (tmp_path / "state").mkdir()
    worker = TESTS / "workers" / "pretrain_scorer_state.py"
    proc = torchrun(worker, 2, "--config", str(path), env={"INRUN_STATE_OUT": str(tmp_path / "state")})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    for rank in range(2):
        seen = json.loads((tmp_path / "state" / f"rank{rank}.json").read_text())
        assert [s["iteration"] for s in seen] == [4, 8, 12, 16]
        assert len({s["state_dict_bytes"] for s in seen}) == 1, seen
        assert len({s["retained_bytes"] for s in seen}) == 1, seen
    sizes = {
        i: sum(f.stat().st_size for f in (run / "checkpoints" / f"iter_{i:07d}").rglob("*") if f.is_file())
        for i in (4, 8, 12, 16)
    }
    assert len(set(sizes.values())) == 1, f"checkpoint bytes per iteration: {sizes}"

    assert "merged into" in proc.stdout
    rows = read_rows(run)
    merged = read_rows(run, "values")
    # The run trains with Adam: each target's SGD row and, from the second step on, its Adam-aware row.
    adam = np.char.endswith(merged["target"].to_numpy(zero_copy_only=False).astype(str), ":adam")
    assert (~adam).sum() == 16 * 8 and adam.sum() == 15 * 8
    values = dict(zip(zip(merged["target"].to_pylist(), merged["sample_id"].to_pylist()), merged["value"].to_pylist()))
    assert values == accumulate_from_rows(rows)
    assert np.array_equal(np.sort(merged["sample_id"].to_numpy()[~adam]), np.arange(16 * 8))

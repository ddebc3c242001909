"""Run configs: the shipped ones load and fit their layouts; bad keys, values and layouts are
refused by name before anything starts (the entry point exits with the message)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from inrun_megatron.pretrain.config import ConfigError, check_layout, load_run_config, unresumable_changes
from inrun_megatron.pretrain.train import main, padded_vocab_size, parameter_count

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# config, world size it is planned for, parameters (millions) with a GPT-2-sized tokenizer
SHIPPED = [
    ("demo-cpu", 4, None),
    ("curate-demo", 1, None),
    ("gpt-125m", 8, 125),
    ("gpt-1.3b", 16, 1300),
    ("gpt-7b", 64, 7000),
]


@pytest.mark.parametrize(("name", "world", "millions"), SHIPPED)
def test_shipped_configs_fit_their_layout(name, world, millions):
    config = load_run_config(CONFIGS / f"{name}.yaml")
    layout = check_layout(config, world)
    assert layout.dp * layout.tp * layout.pp == world
    if millions:
        vocab = padded_vocab_size(50257, config.model.make_vocab_size_divisible_by, layout.tp)
        assert parameter_count(config, vocab) == pytest.approx(millions * 1e6, rel=0.05)
    # every shipped config trains with Adam and records the Adam-aware value, which the analysis reads by
    # default (docs/DESIGN.md §1.5; the entry point hands its optimizer to the scorer: test_pretrain)
    assert config.optimizer.type == "adam" and config.scoring.enabled and config.scoring.optimizer_values


def _raw() -> dict:
    return yaml.safe_load((CONFIGS / "demo-cpu.yaml").read_text())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.hiden_size=64"], "model.hiden_size: unknown key; did you mean 'hidden_size'?"),
        (["optimiser.lr=0.1"], "optimiser: unknown key; did you mean 'optimizer'?"),
        (["training.train_iters=ten"], "training.train_iters: expected int, got 'ten'"),
        (["data.sources.1.wieght=2"], "data.sources.1.wieght: unknown key; did you mean 'weight'?"),
        (["data.sources.5.weight=2"], "data.sources.5 is not an item of a 3-item list"),
        (["model.normalization=BatchNorm"], "model.normalization: 'BatchNorm' is not one of"),
        (["parallel.tensor_model_parallel_size=8"], "must divide model.num_attention_heads (4)"),
        (["parallel.tensor_model_parallel_size=3"], "must divide model.num_attention_heads (4)"),
        (["validation.targets.0.source=wiki"], "validation.targets.0.source: 'wiki' is not one of data.sources"),
        (["data.split=100,0,0"], "needs a validation part in data.split"),
        (["optimizer.lr_warmup_iters=500"], "must be smaller than the decay length"),
        (["scoring.flush_every=0"], "scoring.flush_every: must be positive"),
        (["scoring.path=ghost"], "scoring.path: 'ghost' is not one of"),
        (["scoring.path=microbatch"], "one sequence's only with training.micro_batch_size 1 (got 4)"),
        (
            ["training.micro_batch_size=1", "scoring.path=microbatch", "scoring.document_values=true"],
            "scoring.document_values needs each token's part of the score",
        ),
        (
            ["model.precision=bf16", "scoring.second_order=true"],
            "scoring.second_order needs fp32 weights, got model.precision 'bf16'",
        ),
        (
            ["scoring.second_order=true", "scoring.document_values=true"],
            "scoring.second_order and scoring.document_values cannot both be on",
        ),
        (["training.micro_batch_size"], "expected key=value"),
        (
            ["data.reset_attention_mask=true", "parallel.virtual_pipeline_model_parallel_size=2"],
            "data.reset_attention_mask: the 4 pipeline stages (pipeline x virtual pipeline) include some that hold"
            " neither the embedding nor the output layer",
        ),
    ],
)
def test_bad_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_run_config(None, overrides, raw=_raw())
    assert message in str(error.value)


def test_reset_masks_are_off_by_default_and_run_on_two_pipeline_stages():
    """Off unless asked for; accepted on a two-stage pipeline, whose stages both read batches."""
    assert not load_run_config(None, [], raw=_raw()).data.reset_attention_mask
    on = load_run_config(None, ["data.reset_attention_mask=true", "data.reset_position_ids=true"], raw=_raw())
    assert on.parallel.pipeline_model_parallel_size == 2 and on.data.reset_attention_mask and on.data.reset_position_ids


def test_scoring_choices_come_from_scoring_config():
    """The run config accepts exactly the scoring options ScoringConfig accepts, bfloat16 score GEMMs
    (benchmarked in the README) included."""
    import torch

    from inrun_megatron.config import PROJECTION_DTYPES, ScoringConfig, projection_dtype

    for name in PROJECTION_DTYPES:
        config = load_run_config(None, [f"scoring.projection_dtype={name}"], raw=_raw())
        scoring = ScoringConfig(projection_dtype=projection_dtype(config.scoring.projection_dtype))
        assert scoring.projection_dtype == getattr(torch, name)
    assert "bfloat16" in PROJECTION_DTYPES
    with pytest.raises(ConfigError, match=r"scoring\.projection_dtype: 'int8' is not one of"):
        load_run_config(None, ["scoring.projection_dtype=int8"], raw=_raw())
    with pytest.raises(ValueError, match="projection_dtype must be None or one of"):
        ScoringConfig(projection_dtype=torch.int8)


def test_overrides_reach_nested_keys_and_list_items():
    overrides = ["data.sources.2.weight=0.5", "training.train_iters=70", "validation.targets=[]", "scoring.enabled=0"]
    with pytest.raises(ConfigError, match=r"scoring\.enabled: expected bool, got 0"):
        load_run_config(None, overrides, raw=_raw())
    config = load_run_config(None, [*overrides[:3], "scoring.enabled=false"], raw=_raw())
    assert config.data.sources[2].weight == 0.5 and config.training.train_iters == 70
    assert config.validation.targets == [] and not config.scoring.enabled


@pytest.mark.parametrize(
    ("world", "message"),
    [
        (3, "world size (3 processes) is not divisible by tensor x pipeline parallel size (2 x 2 = 4)"),
        (12, "global_batch_size (16) must be divisible by micro_batch_size x data-parallel size (4 x 3)"),
    ],
)
def test_impossible_layouts(world, message):
    with pytest.raises(ConfigError) as error:
        check_layout(load_run_config(CONFIGS / "demo-cpu.yaml"), world)
    assert message in str(error.value)


def test_entry_point_stops_before_starting(monkeypatch, capsys):
    """Config and layout errors stop every rank at once, before any process group exists."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(CONFIGS / "demo-cpu.yaml")])
    assert stop.value.code == 2
    assert "world size (3 processes) is not divisible" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(CONFIGS / "demo-cpu.yaml"), "model.num_attention_heads=3"])
    assert "must be divisible by model.num_attention_heads (3)" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "4")
    main(["--config", str(CONFIGS / "gpt-7b.yaml"), "--check", "--world-size", "64"])
    assert '"dp": 8' in capsys.readouterr().out


def test_resume_allows_only_harmless_changes():
    old = load_run_config(CONFIGS / "demo-cpu.yaml").to_dict()
    moved = ["output.run_dir=/elsewhere/demo", "scoring.flush_every=5", "logging.log_interval=5"]
    harmless = load_run_config(CONFIGS / "demo-cpu.yaml", moved)
    assert unresumable_changes(old, harmless.to_dict()) == []
    other = load_run_config(
        CONFIGS / "demo-cpu.yaml", ["optimizer.lr=0.1", "data.sources.0.weight=3", "training.train_iters=400"]
    )
    assert unresumable_changes(old, other.to_dict()) == ["data.sources", "optimizer.lr", "training.train_iters"]


def test_ranks_come_from_torchrun_deepspeed_or_srun(monkeypatch):
    from inrun_megatron.pretrain.environment import read_process_env

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "0")  # so that monkeypatch restores what read_process_env() exports
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(ConfigError, match="under srun, export MASTER_ADDR in the batch script"):
        read_process_env()
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    env = read_process_env()
    assert (env.rank, env.world_size, env.launcher) == (5, 16, "srun")
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"]) == ("5", "1")  # for torch.distributed's env://
    monkeypatch.setenv("RANK", "3")  # torchrun and the deepspeed launcher win over Slurm's variables
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert read_process_env().rank == 3

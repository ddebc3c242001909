"""GPT pretraining with megatron-core and In-Run Data Shapley scoring (``launch/pretrain_gpt.py``).

The loop is megatron's: megatron-core datasets and pretraining sampler, ``GPTModel`` chunks in
megatron DDP, megatron's optimizer and LR schedule, ``get_forward_backward_func()`` for the
parallel layout; the scorer runs each step's forward/backward (validation pass, then the scored
training pass) and one rank per data-parallel replica streams its rows to the run directory::

    RUN/manifest.json        units, sign, config, parallel layout, versions, targets, data map
    RUN/scores/dpNNNNN/      score rows of DP replica NNNNN (append-only Parquet parts)
    RUN/steps/               per step: lr, clip coefficient, skipped, validation losses
    RUN/merged/              accumulated values per sample and target, merged from scores/ at the
                             end of training (``inrun-scores merge``; ``scoring.merge_values``)
    RUN/checkpoints/         megatron distributed checkpoints (scorer state included: its step)
    RUN/data_cache/          megatron's dataset indices (the sample-id map reads them)

Running the same command again resumes from the last checkpoint; rows of steps after it that
were written before a crash are dropped and written again, so nothing is counted twice.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from inrun_megatron.config import ScoringConfig, projection_dtype
from inrun_megatron.data.datasets import (
    Source,
    TrainingData,
    batch_iterator,
    build_training_data,
    check_sources,
    read_train_ids,
)
from inrun_megatron.data.tokenizer import Tokenizer
from inrun_megatron.data.validation_sets import build_targets, describe_targets, jsonl_sequences
from inrun_megatron.pretrain.config import (
    ConfigError,
    Layout,
    RunConfig,
    check_layout,
    load_run_config,
    unresumable_changes,
)
from inrun_megatron.pretrain.environment import (
    ProcessEnv,
    agree_on_errors,
    fail,
    init_distributed,
    read_process_env,
)
from inrun_megatron.pretrain.progress import (
    IntervalStats,
    ScalarSink,
    StepTimes,
    check_scalar_backends,
    mean_loss,
    progress_line,
    value_statistics,
)
from inrun_megatron.records import (
    MANIFEST,
    Manifest,
    RunLayout,
    ScoreWriter,
    library_versions,
    read_manifest,
    write_manifest,
)
from inrun_megatron.step_result import StepResult

#: Where the run's accumulated values are merged at the end (an ``inrun-scores merge`` output).
MERGED = "merged"


def padded_vocab_size(tokenizer_vocab: int, divisible_by: int, tp: int) -> int:
    """megatron's padding of the vocabulary so that every tensor-parallel shard is alike."""
    multiple = divisible_by * tp
    return int(math.ceil(tokenizer_vocab / multiple) * multiple)


def parameter_count(config: RunConfig, vocab_size: int) -> int:
    """Number of trainable parameters of the configured GPT (all ranks together)."""
    m = config.model
    h, ffn, n_layers = m.hidden_size, m.ffn_hidden_size or 4 * m.hidden_size, m.num_layers
    bias = int(m.add_bias_linear)
    norm = 2 * h if m.normalization == "LayerNorm" else h
    mlp_in = 2 * ffn if m.swiglu else ffn
    layer = (3 * h * h + 3 * h * bias) + (h * h + h * bias) + (h * mlp_in + mlp_in * bias) + (ffn * h + h * bias)
    layer += 2 * norm
    total = vocab_size * h + n_layers * layer + norm
    if m.position_embedding_type == "learned_absolute":
        total += m.seq_length * h
    if not m.share_embeddings_and_output_weights:
        total += vocab_size * h
    return total


def _cpu_mode():
    """megatron's optimizer assumes CUDA; on a CPU-only machine its calls run in the CPU shims' mode."""
    if torch.cuda.is_available():
        return contextlib.nullcontext()
    from inrun_megatron import cpu_shims

    return cpu_shims.CudaToCpuMode()


# --------------------------------------------------------------------------------------
# batches: read on tensor-parallel rank 0 of the stages that need data, broadcast over TP


def get_batch(data_iterator, model) -> dict[str, torch.Tensor] | None:
    """This microbatch on a stage that needs data (first or last), else None (megatron's get_batch)."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.utils import get_attr_wrapped_model

    if not (get_attr_wrapped_model(model, "pre_process") or get_attr_wrapped_model(model, "post_process")):
        return None
    batch = next(data_iterator) if parallel_state.get_tensor_model_parallel_rank() == 0 else None
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return batch
    # whether this batch carries megatron's reset attention mask (training batches with
    # data.reset_attention_mask, held-out targets cut from them; not jsonl targets) travels with it
    if batch is not None:
        batch = {**batch, "has_attention_mask": torch.tensor([int("attention_mask" in batch)])}
    ints = tensor_parallel.broadcast_data(
        ["tokens", "labels", "position_ids", "has_attention_mask"], batch, torch.int64
    )
    floats = tensor_parallel.broadcast_data(["loss_mask"], batch, torch.float32)
    out = {**floats, **{k: v for k, v in ints.items() if k != "has_attention_mask"}}
    if ints["has_attention_mask"].item():
        if batch is not None:
            batch["attention_mask"] = batch["attention_mask"].to(torch.uint8)
        out["attention_mask"] = tensor_parallel.broadcast_data(["attention_mask"], batch, torch.uint8)[
            "attention_mask"
        ].bool()
    return out


def forward_step(data_iterator, model):
    """The forward step handed to megatron's schedules (the scorer's validation pass uses it too)."""
    from inrun_megatron.megatron.model import gpt_forward_step

    batch = get_batch(data_iterator, model)
    return gpt_forward_step(None if batch is None else iter([batch]), model)


# --------------------------------------------------------------------------------------


class Pretraining:
    """One pretraining run at one parallel layout (see the module docstring)."""

    def __init__(self, config: RunConfig, layout: Layout, env: ProcessEnv):
        self.config, self.layout, self.env = config, layout, env
        self.run_dir = config.run_dir
        self.scorer = None
        self.writer: ScoreWriter | None = None

    # ------------------------------------------------------------------ setup

    def _check_inputs(self) -> tuple[Tokenizer, int | None, bool]:
        """Everything that can be checked without the model, on every rank; returns the
        tokenizer, the checkpoint iteration to resume from (None: none) and whether the run
        directory already holds this run."""
        c = self.config
        for what, directory in (("output.run_dir", self.run_dir), ("data.cache_dir", c.cache_dir)):
            try:
                directory.mkdir(parents=True, exist_ok=True)
                probe = directory / f".write-test-{self.env.rank}"
                probe.write_text("ok")
                probe.unlink()
            except OSError as e:
                raise ConfigError(
                    f"{what} {directory} is not writable ({e.strerror or e}); choose another directory"
                ) from e
        tokenizer = Tokenizer(c.data.tokenizer)
        check_sources([Source(s.name, s.prefix, s.weight) for s in c.data.sources], tokenizer)
        for spec in c.validation.targets:
            if spec.jsonl:
                jsonl_sequences(spec, tokenizer, c.model.seq_length)
        if c.model.vocab_size is not None and c.model.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size ({c.model.vocab_size}) is smaller than the tokenizer's vocabulary"
                f" ({tokenizer.vocab_size}); leave it unset to use the tokenizer's (padded)"
            )
        check_scalar_backends(c.logging.tensorboard, c.logging.wandb_project)
        return tokenizer, self._resume_point(), (self.run_dir / MANIFEST).exists()

    def _resume_point(self) -> int | None:
        """The checkpoint to resume from; refuses a run directory of a different run."""
        from inrun_megatron.pretrain import checkpoint

        new = self.config.to_dict()
        iteration = checkpoint.latest_iteration(self.config.checkpoint_dir)
        old = None
        if iteration is not None:
            old = checkpoint.saved_config(self.config.checkpoint_dir, iteration)
        elif (self.run_dir / MANIFEST).exists():
            old = read_manifest(self.run_dir).config
        if old is not None:
            changed = unresumable_changes(old, new)
            if changed:
                raise ConfigError(
                    f"{self.run_dir} holds a run with a different config ({', '.join(changed[:6])} differ);"
                    " resume it with its own config, or choose a new output.run_dir"
                )
        return iteration

    def _build_model(self, vocab_size: int) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.transformer.module import Float16Module

        from inrun_megatron.megatron.model import GPTShape, build_gpt_chunks

        c = self.config
        m = c.model
        half = None if m.precision == "fp32" else m.precision
        # the config's model section uses GPTShape's names; the rest is the entry point's own
        shared = {f.name for f in dataclasses.fields(GPTShape)} & {f.name for f in dataclasses.fields(m)}
        shape = GPTShape(
            **{name: getattr(m, name) for name in shared - {"vocab_size"}},
            vocab_size=vocab_size,
            extra_config={
                "sequence_parallel": c.parallel.sequence_parallel,
                "bf16": half == "bf16",
                "fp16": half == "fp16",
                "calculate_per_token_loss": c.training.calculate_per_token_loss,
            },
        )
        self.models = build_gpt_chunks(shape)
        model_config = self.models[0].config
        # megatron's mixed precision: half-precision compute, fp32 main params in the optimizer
        compute = [Float16Module(model_config, model) for model in self.models] if half else self.models
        ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=c.parallel.use_distributed_optimizer)
        self.chunks = [DistributedDataParallel(model_config, ddp_config, model) for model in compute]
        model_config.finalize_model_grads_func = finalize_model_grads
        o = c.optimizer
        megatron_options = {f.name for f in dataclasses.fields(OptimizerConfig)}  # most keys share names
        opt_config = OptimizerConfig(
            optimizer=o.type,
            **{k: v for k, v in dataclasses.asdict(o).items() if k in megatron_options},
            use_distributed_optimizer=c.parallel.use_distributed_optimizer,
            bf16=half == "bf16",
            fp16=half == "fp16",
            params_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(half, torch.float32),
        )
        with _cpu_mode():
            self.optimizer = get_megatron_optimizer(opt_config, self.chunks)
        model_config.grad_scale_func = self.optimizer.scale_loss
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=o.lr,
            min_lr=o.min_lr,
            lr_warmup_steps=o.lr_warmup_iters,
            lr_decay_steps=o.lr_decay_iters or c.training.train_iters,
            lr_decay_style=o.lr_decay_style,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=c.training.train_iters,
            wd_incr_style="constant",
        )

    def setup(self) -> None:
        c, env = self.config, self.env
        init_distributed(self.layout, c.training.seed)
        from megatron.core import parallel_state

        self.tokenizer, resume, existing_run = agree_on_errors(env, self._check_inputs)
        t = c.training
        sources = [Source(s.name, s.prefix, s.weight) for s in c.data.sources]
        self.data: TrainingData = build_training_data(
            sources,
            self.tokenizer,
            seq_length=c.model.seq_length,
            seed=t.seed,
            split=c.data.split,
            train_samples=c.data.train_samples or t.train_iters * t.global_batch_size,
            cache_dir=c.cache_dir,
            reset_attention_mask=c.data.reset_attention_mask,
            reset_position_ids=c.data.reset_position_ids,
        )
        self.train_ids = None  # the training order: the dataset's own, or data.train_ids repeated
        if c.data.train_ids:
            chosen = agree_on_errors(env, lambda: read_train_ids(c.data.train_ids, len(self.data.train)))
            self.train_ids = np.resize(chosen, t.train_iters * t.global_batch_size)
        mbs = t.micro_batch_size
        targets = agree_on_errors(
            env,
            lambda: build_targets(
                c.validation.targets, self.data, self.tokenizer, seq_length=c.model.seq_length, micro_batch_size=mbs
            ),
        )
        vocab = c.model.vocab_size or padded_vocab_size(
            self.tokenizer.vocab_size, c.model.make_vocab_size_divisible_by, self.layout.tp
        )
        self._build_model(vocab)
        if c.scoring.enabled:
            from inrun_megatron.megatron import MegatronScorer

            projection = projection_dtype(c.scoring.projection_dtype)
            # nothing in memory grows with the samples seen: rows stream to the dump, values are merged from it
            scoring = ScoringConfig(
                validation_split=c.scoring.validation_split,
                projection_dtype=projection,
                path=c.scoring.path,
                accumulate_values=False,
                optimizer_values=c.scoring.optimizer_values,
                document_eod=self.tokenizer.eod if c.scoring.document_values else None,
                second_order=c.scoring.second_order,
            )
            self.scorer = MegatronScorer(
                self.chunks, targets, scoring, micro_batch_size=t.micro_batch_size, optimizer=self.optimizer
            )
            self.scorer.pass_clock = time.perf_counter  # each step's result times its training pass
        self.iteration = 0
        if resume is not None:
            from inrun_megatron.pretrain import checkpoint

            state = checkpoint.load_checkpoint(
                c.checkpoint_dir, resume, self.models, self.optimizer, self.scheduler, self.scorer
            )
            self.iteration = state.iteration
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_group = parallel_state.get_data_parallel_group()
        last_stage = parallel_state.is_pipeline_last_stage()
        self.is_writer = last_stage and self.tp_rank == 0  # one rank per data-parallel replica
        self.is_logger = self.is_writer and self.dp_rank == 0
        if env.rank == 0:
            self._write_manifest(targets, vocab, resume)
        dist.barrier()
        if self.scorer is not None and self.is_writer:
            # a resumed run rewrites every step after its checkpoint; a run restarted before its
            # first checkpoint rewrites everything
            resume_step = None if resume is None and not existing_run else self.iteration - 1
            self.writer = ScoreWriter(
                self.run_dir, dp_rank=self.dp_rank, flush_every=c.scoring.flush_every, resume_step=resume_step
            )
            self.scorer.sink = self.writer  # end_step writes each step's rows
        self.scalars_on = bool(c.logging.tensorboard or c.logging.wandb_project)
        self.sink = None
        if self.is_logger and self.scalars_on:
            self.sink = ScalarSink(self.run_dir, c.logging.tensorboard, c.logging.wandb_project, c.to_dict())
        self.iterators = self._data_iterators()
        if self.is_logger:
            n_params = parameter_count(c, vocab)
            resumed = f", resumed at step {self.iteration}" if resume is not None else ""
            print(
                f"pretrain_gpt: {n_params / 1e6:.1f}M parameters | world {self.layout.world_size} = TP"
                f" {self.layout.tp} x PP {self.layout.pp} x DP {self.layout.dp} | {t.train_iters} steps of"
                f" {t.global_batch_size} x {c.model.seq_length} tokens | scoring"
                f" {self._scoring_summary(targets)} | {self.run_dir}{resumed}",
                flush=True,
            )

    def _scoring_summary(self, targets: dict) -> str:
        if self.scorer is None:
            return "off"
        path = self.scorer.path_for(self.config.training.micro_batch_size)
        return f"on ({path} path): {', '.join(targets)}"

    def _write_manifest(self, targets: dict, vocab: int, resume: int | None) -> None:
        import megatron.core

        c = self.config
        previous = read_manifest(self.run_dir) if (self.run_dir / MANIFEST).exists() else None
        tokenizer_spec = self.tokenizer.spec()
        if self.tokenizer.path is not None:  # keep the run directory self-contained
            shutil.copyfile(self.tokenizer.path, self.run_dir / "tokenizer.json")
            tokenizer_spec["path"] = "tokenizer.json"
        layout = self.layout
        manifest = Manifest(
            entry_point="launch/pretrain_gpt.py",
            config=c.to_dict(),
            layout=RunLayout(
                world_size=layout.world_size,
                data_parallel=layout.dp,
                tensor_parallel=layout.tp,
                pipeline_parallel=layout.pp,
                virtual_pipeline=layout.vpp,
                micro_batch_size=c.training.micro_batch_size,
                num_microbatches=layout.num_microbatches,
                global_batch_size=c.training.global_batch_size,
            ),
            targets=describe_targets(c.validation.targets, targets),
            values=None if self.scorer is None else self.scorer.values_manifest,
            scoring=None if self.scorer is None else self.scorer.config.to_dict(),
            scoring_path=None if self.scorer is None else self.scorer.path_for(c.training.micro_batch_size),
            data=self.data.manifest_section(tokenizer_spec, self.run_dir),
            model={"vocab_size": vocab, "parameters": parameter_count(c, vocab)},
            loss_normalisation=None if self.scorer is None else self.scorer.loss_normalisation,
            versions=library_versions(megatron_core=megatron.core.__version__),
            launcher=self.env.launcher,
        )
        if previous is not None:  # the same run, resumed: its identity and history carry over
            manifest = dataclasses.replace(
                manifest, run_id=previous.run_id, created=previous.created, resumed_from=previous.resumed_from
            )
        if resume is not None:
            manifest = dataclasses.replace(manifest, resumed_from=(*manifest.resumed_from, resume))
        write_manifest(self.run_dir, manifest)

    def _data_iterators(self):
        from megatron.core import parallel_state
        from megatron.core.utils import get_attr_wrapped_model

        c = self.config
        iterators = []
        for chunk in self.chunks:
            needs_data = get_attr_wrapped_model(chunk, "pre_process") or get_attr_wrapped_model(chunk, "post_process")
            if needs_data and parallel_state.get_tensor_model_parallel_rank() == 0:
                iterators.append(
                    batch_iterator(
                        self.data.train,
                        consumed=self.iteration * c.training.global_batch_size,
                        micro_batch_size=c.training.micro_batch_size,
                        dp_rank=self.dp_rank,
                        dp_size=self.layout.dp,
                        num_workers=c.data.num_workers,
                        ids=self.train_ids,
                    )
                )
            else:
                iterators.append(None)
        return iterators

    # ------------------------------------------------------------------ training

    def train_step(self, times: StepTimes) -> tuple[list, StepResult | None]:
        """One optimizer step; returns (megatron's losses, the scorer's step result or None).

        The scorer's sink (this rank's writer, if any) has the step's rows when it returns."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        c = self.config
        forward_backward = get_forward_backward_func()
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        several = len(self.chunks) > 1
        kwargs = dict(
            forward_step_func=forward_step,
            data_iterator=self.iterators if several else self.iterators[0],
            model=self.chunks if several else self.chunks[0],
            num_microbatches=self.layout.num_microbatches,
            seq_length=c.model.seq_length,
            micro_batch_size=c.training.micro_batch_size,
        )
        if self.scorer is None:
            start = time.perf_counter()
            losses = forward_backward(**kwargs)
            times.training_pass = time.perf_counter() - start
        else:
            losses = self.scorer.forward_backward(forward_backward, **kwargs)
        with _cpu_mode():
            update = self.optimizer.step()
        result = None
        if self.scorer is not None:
            result = self.scorer.end_optimizer_step(self.optimizer, update)
            times.training_pass = result.timings.training
        self.scheduler.step(1)
        return losses, result

    def save(self) -> None:
        from inrun_megatron.pretrain import checkpoint

        if self.writer is not None:
            self.writer.flush()  # rows up to this step are durable before the checkpoint claims them
        state = checkpoint.TrainingState(
            self.iteration, self.iteration * self.config.training.global_batch_size, self.config.to_dict()
        )
        checkpoint.save_checkpoint(
            self.config.checkpoint_dir, self.models, self.optimizer, self.scheduler, self.scorer, state
        )

    def train(self) -> None:
        c = self.config
        total, interval = c.training.train_iters, IntervalStats()
        while self.iteration < total:
            times = StepTimes()
            start = time.perf_counter()
            losses, result = self.train_step(times)
            lr = float(self.optimizer.param_groups[0]["lr"]) if result is None else result.lr
            step_stats = None
            if result is not None and self.writer is not None and self.scalars_on:
                # statistics over every replica's rows: all writers take part
                step_stats = value_statistics(result.records, self.dp_group)
            self.iteration += 1
            times.step = time.perf_counter() - start
            save_interval = c.checkpoint.save_interval
            if self.iteration == total or (save_interval and self.iteration % save_interval == 0):
                self.save()
            if self.is_writer:  # the last pipeline stage has the loss
                loss_sum, loss_tokens = mean_loss(losses, self.dp_group)
                validation = result.validation_losses if result is not None else {}
                interval.add(times, loss_sum, loss_tokens, validation)
                if self.sink is not None:
                    self._log_scalars(times, loss_sum / max(loss_tokens, 1.0), lr, validation, step_stats)
                if self.iteration % c.logging.log_interval == 0 or self.iteration == total:
                    if self.is_logger:
                        print(self._progress(interval), flush=True)
                    interval = IntervalStats()

    def _rows_written(self) -> int:
        """Score rows durably written by every replica (each writes as many per step)."""
        return self.writer.rows_written * self.layout.dp if self.writer else 0

    def _progress(self, interval: IntervalStats) -> str:
        c = self.config
        tokens_per_step = c.training.global_batch_size * c.model.seq_length
        return progress_line(
            self.iteration, c.training.train_iters, interval, tokens_per_step, self._rows_written(), bool(self.scorer)
        )

    def _log_scalars(self, times: StepTimes, loss: float, lr: float, validation: dict, step_stats: dict | None) -> None:
        c = self.config
        scalars = {
            "train/loss": loss,
            "train/lr": lr,
            "train/tokens_per_second": c.training.global_batch_size * c.model.seq_length / times.step,
            "scores/rows_written": self._rows_written(),
        }
        for name, value in validation.items():
            scalars[f"validation/{name}/loss"] = value
        for target, stats in (step_stats or {}).items():
            for key, value in stats.items():
                scalars[f"scores/{target}/{key}"] = value
        self.sink.log(self.iteration, scalars)

    # ------------------------------------------------------------------ end

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.sink is not None:
            self.sink.close()
        dist.barrier()  # every replica's rows are durable
        if self.is_logger:
            where = f"score rows in {self.run_dir / 'scores'}" if self.scorer else "no scores (scoring off)"
            print(f"pretrain_gpt: done; {where}; checkpoint {self.config.checkpoint_dir}", flush=True)
        merge = self.scorer is not None and self.config.scoring.merge_values and self.env.rank == 0
        dist.destroy_process_group()  # the other ranks are done; the merge needs no peers
        if merge:
            self._merge_values()

    def _merge_values(self) -> None:
        """Sum the dump into accumulated values per sample and target (``inrun-scores merge RUN -o
        RUN/merged``), out of core in this one process; replaces the output of an earlier finish."""
        from inrun_megatron.analysis.dump import ScoreDump
        from inrun_megatron.analysis.merge import merge

        out = self.run_dir / MERGED
        start = time.perf_counter()
        if out.exists():  # derived data of this run directory, e.g. from a run finished before
            shutil.rmtree(out)
        report = merge(ScoreDump.open(self.run_dir), out)
        samples = ", ".join(f"{n} for {t}" for t, n in report.samples.items())
        print(
            f"pretrain_gpt: accumulated values of {report.rows} score rows merged into {out} in"
            f" {time.perf_counter() - start:.1f} s (samples: {samples}); e.g. `inrun-scores top {out}`",
            flush=True,
        )


# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pretrain_gpt.py",
        description="megatron-core GPT pretraining with In-Run Data Shapley scoring. Start it with torchrun,"
        " the deepspeed launcher or srun; run again with the same config to resume.",
    )
    parser.add_argument("--config", required=True, help="a YAML run config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. training.train_iters=50")
    parser.add_argument("--check", action="store_true", help="check the config and layout, print the plan, exit")
    parser.add_argument("--world-size", type=int, help="with --check: the number of processes to plan for")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    from inrun_megatron.megatron import quiet_library_warnings

    quiet_library_warnings()
    args = parse_args(argv)
    try:
        env = read_process_env()
    except ConfigError as e:
        fail(ProcessEnv(0, 1, "unknown"), str(e))
    try:
        config = load_run_config(args.config, args.overrides)
        layout = check_layout(config, args.world_size or env.world_size)
    except ConfigError as e:
        fail(env, str(e))
    if args.check:
        if env.rank == 0:
            print(json.dumps({"layout": vars(layout), "config": config.to_dict()}, indent=2, default=str))
        return
    run = Pretraining(config, layout, env)
    run.setup()
    run.train()
    run.finish()

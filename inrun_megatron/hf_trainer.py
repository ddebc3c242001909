"""In-Run Data Shapley for a Hugging Face ``Trainer`` run, with or without its DeepSpeed integration.

Usage::

    trainer = ScoringTrainer(
        model=model, args=TrainingArguments(...),  # optionally deepspeed="configs/deepspeed/zero2.json"
        train_dataset=train, data_collator=collator, processing_class=tokenizer,
        validation={"held_out": ["a text", "another text"]}, run_dir="RUN",
    )
    trainer.train()   # RUN holds the records, manifest and steps of every scored step

Sample ids are the training dataset's indices: the dataset is wrapped so each example carries its
index as ``sample_ids``, which the Trainer's sampler (shuffled or not) and collator carry to the
training step, and which the model never sees. The training loss is the Trainer's own
(``compute_loss`` with ``num_items_in_batch``, its scaling for gradient accumulation and across
processes), so ``l_z`` is sample ``z``'s term of exactly the loss whose gradient the optimizer steps
with (``docs/DESIGN.md`` §1.1).

* Under DeepSpeed each optimizer step runs through :class:`~inrun_megatron.deepspeed.DeepSpeedScorer`:
  the validation pass, then the step's micro-batches through the engine.
* Without it (one process, or several under DDP) the Trainer's own training step runs unchanged,
  scored by :class:`~inrun_megatron.torch_scorer.TorchScorer`: the validation pass before the step's
  first micro-batch, the scores collected during the Trainer's backwards, the step closed after its
  optimizer step with the clipping coefficient of the norm the Trainer clipped with.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from inrun_megatron.config import ScoringConfig
from inrun_megatron.records import Manifest, RunLayout, ScoreWriter, library_versions, write_manifest
from inrun_megatron.scorer import clip_coefficient
from inrun_megatron.step_result import StepResult
from inrun_megatron.token_losses import hf_causal_lm_token_losses
from inrun_megatron.validation import Batch, make_batch

SAMPLE_ID_COLUMN = "sample_ids"
VALIDATION_FIRST_ID = 10**9
ValidationSet = Sequence[str] | Sequence[Mapping[str, Any]]


class IndexedDataset(torch.utils.data.Dataset):
    """``dataset`` whose example ``i`` also carries ``sample_ids = i``: the sampler's index reaches the
    collator, so the recorded sample id is the index the sampler chose."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.dataset[index]
        if not isinstance(example, Mapping):
            raise TypeError(f"training example {index} is a {type(example).__name__}; scoring needs dict examples")
        return {**example, SAMPLE_ID_COLUMN: index}


def validation_batches(examples: ValidationSet, tokenizer, batch_size: int) -> list[Batch]:
    """Batches of ``batch_size`` sequences in the scorer's format from texts (tokenized with the
    Trainer's ``processing_class``) or tokenized examples (``input_ids``), padded on the right to the
    longest sequence with loss mask 0 on the padding (causal attention never sees it)."""
    sequences = []
    for i, example in enumerate(examples):
        if isinstance(example, str):
            if tokenizer is None:
                raise ValueError("validation texts need the Trainer's processing_class (a tokenizer) to tokenize them")
            ids = tokenizer(example)["input_ids"]
        elif isinstance(example, Mapping) and "input_ids" in example:
            ids = example["input_ids"]
        else:
            raise TypeError(f"validation example {i} is neither a text nor a dict with 'input_ids'")
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if ids.numel() < 2:
            raise ValueError(f"validation example {i} has {ids.numel()} token(s); a next-token loss needs at least 2")
        sequences.append(ids)
    if not sequences or len(sequences) % batch_size:
        raise ValueError(
            f"a validation target has {len(sequences)} sequences; give a positive multiple of the batch size"
            f" {batch_size} (per_device_train_batch_size)"
        )
    longest = max(len(s) for s in sequences)
    tokens = torch.zeros(len(sequences), longest, dtype=torch.int64)
    mask = torch.zeros(len(sequences), longest - 1)
    for row, ids in enumerate(sequences):
        tokens[row, : len(ids)] = ids
        mask[row, : len(ids) - 1] = 1.0
    ids = torch.arange(len(sequences)) + VALIDATION_FIRST_ID
    return [
        make_batch(tokens[i : i + batch_size], ids[i : i + batch_size], mask[i : i + batch_size])
        for i in range(0, len(sequences), batch_size)
    ]


def _scoring_batch(inputs: dict[str, Any], accepts_position_ids: bool) -> Batch:
    """The scorer's view of a Trainer micro-batch: the Trainer's inputs ride along unchanged under
    ``trainer_inputs`` (the loss is computed from them); ``labels``/``loss_mask`` are the next-token
    targets the model's loss counts (Hugging Face shifts ``labels`` by one, -100 = ignored)."""
    inputs = dict(inputs)
    sample_ids = inputs.pop(SAMPLE_ID_COLUMN)
    labels = inputs.get("labels")
    if labels is None:
        raise ValueError("the training batches have no 'labels'; use a collator that sets them")
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    if accepts_position_ids and "position_ids" not in inputs:
        # The positions the model would default to, with a batch dimension: a position embedding
        # looked up for [1, s] is broadcast over the batch and has no per-sequence gradient.
        b, s = inputs["input_ids"].shape
        positions = torch.arange(s, device=inputs["input_ids"].device)
        inputs["position_ids"] = positions.unsqueeze(0).expand(b, s)
    return {
        "tokens": inputs["input_ids"],
        "labels": shifted.clamp(min=0),
        "loss_mask": (shifted != -100).float(),
        "sample_ids": sample_ids,
        "trainer_inputs": inputs,
    }


class ScoringTrainer(Trainer):
    """A ``transformers.Trainer`` that records exact per-sample In-Run Data Shapley scores.

    Args (besides the Trainer's own):
        validation: the validation set, or ``{target name: set}``; a set is a list of texts or of
            tokenized examples (dicts with ``input_ids``, e.g. a ``datasets.Dataset``).
        run_dir: where the records and manifest go (the layout of ``inrun_megatron.records``,
            read by ``inrun-scores``).
        scoring: scoring options.

    Runs with the Trainer's DeepSpeed integration (``TrainingArguments(deepspeed=...)``) or without it,
    in one process or several (DDP). Every step's validation loss and ``<g, G>`` per target are added
    to the Trainer's training logs.
    """

    def __init__(
        self,
        *args,
        validation: ValidationSet | Mapping[str, ValidationSet],
        run_dir: str | Path,
        scoring: ScoringConfig | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        refused = {
            "fp16 without DeepSpeed (its gradient scaler; use bf16, fp32 or DeepSpeed's fp16)": (
                self.args.fp16 and not self.is_deepspeed_enabled
            ),
            "FSDP (use DDP or DeepSpeed)": self.is_fsdp_enabled,
            "ScoringConfig(validation_split='split') without DeepSpeed (every process runs the whole validation set)": (
                scoring is not None and scoring.validation_split == "split" and not self.is_deepspeed_enabled
            ),
            "compute_loss_func (scores need the model's own per-sample loss terms; remove it)": (
                self.compute_loss_func is not None
            ),
            "torch.nn.DataParallel over several GPUs in one process (launch one process per GPU)": self.args.n_gpu > 1,
            "no training dataset (pass train_dataset)": self.train_dataset is None,
        }
        if any(refused.values()):
            names = "; ".join(name for name, on in refused.items() if on)
            raise NotImplementedError(f"ScoringTrainer cannot score this run; unsupported: {names}")
        examples = len(self.train_dataset)
        per_step = self.args.per_device_train_batch_size * self.args.world_size
        if examples % per_step and not self.args.dataloader_drop_last:
            raise ValueError(
                f"the training set's {examples} examples leave a last batch smaller than {per_step}"
                " (per_device_train_batch_size x processes), which the dataloader would fill with repeated"
                " examples: set TrainingArguments(dataloader_drop_last=True)"
            )
        sets = validation if isinstance(validation, Mapping) else {"validation": validation}
        self.validation = {
            name: validation_batches(v, self.processing_class, self.args.per_device_train_batch_size)
            for name, v in sets.items()
        }
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        for name, batches in self.validation.items():
            length = batches[0]["tokens"].shape[1] + 1
            if limit is not None and length > limit:
                raise ValueError(
                    f"validation target {name!r} has a sequence of {length} tokens, more than the model's"
                    f" max_position_embeddings ({limit}): shorten or truncate it"
                )
        self.train_dataset = IndexedDataset(self.train_dataset)
        self.run_dir = Path(run_dir)
        self.scoring = scoring or ScoringConfig()
        self.scorer = None
        self.writer: ScoreWriter | None = None
        self.last_result: StepResult | None = None
        self._window: list[dict] = []
        self._window_losses: list[float] = []
        self._num_items_in_batch = None
        self._scored_micro_batches: list[Batch] = []  # the plain Trainer's step: its micro-batches
        self._trained_micro_batches = 0  # and how many of them it has trained on
        self._clip_coef = 1.0
        self.add_callback(_ScorerLifetime(self))

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the sample ids through ``remove_unused_columns`` (they never reach the model)."""
        super()._set_signature_columns_if_needed()
        if SAMPLE_ID_COLUMN not in self._signature_columns:
            self._signature_columns.append(SAMPLE_ID_COLUMN)

    def attach_scorer(self) -> None:
        """Attach to the model the Trainer prepared (the DeepSpeed engine, or the model DDP wraps);
        write the manifest (rank 0)."""
        if self.is_deepspeed_enabled:
            import deepspeed

            from inrun_megatron.deepspeed import DeepSpeedScorer

            engine = self.model_wrapped
            scorer = DeepSpeedScorer(engine, self.validation, hf_causal_lm_token_losses, self.scoring)
            mbs, gas, zero_stage = (
                engine.train_micro_batch_size_per_gpu(),
                engine.gradient_accumulation_steps(),
                scorer.zero_stage,
            )
            config = {"training_args": self.args.to_dict(), "deepspeed": engine.config}
            versions = library_versions(deepspeed=deepspeed.__version__)
        else:
            from inrun_megatron.torch_scorer import TorchScorer

            mbs, gas, zero_stage = self.args.per_device_train_batch_size, self.args.gradient_accumulation_steps, None
            scorer = TorchScorer(
                self.model,
                self.validation,
                hf_causal_lm_token_losses,
                self.scoring,
                micro_batch_size=mbs,
                optimizer=getattr(self.optimizer, "optimizer", self.optimizer),  # inside Accelerate's wrapper
                vocab_size=self.model.config.vocab_size,
            )
            config = {"training_args": self.args.to_dict()}
            versions = library_versions()
        distributed = dist.is_initialized()
        if not distributed or dist.get_rank() == 0:
            manifest = Manifest(
                entry_point="inrun_megatron.hf_trainer.ScoringTrainer",
                config=config,
                layout=RunLayout(
                    world_size=dist.get_world_size() if distributed else 1,
                    data_parallel=scorer.dp_size,
                    zero_stage=zero_stage,
                    micro_batch_size=mbs,
                    num_microbatches=gas,
                    global_batch_size=mbs * gas * scorer.dp_size,
                ),
                targets=[t.describe() for t in scorer.targets],
                scoring=self.scoring.to_dict(),
                scoring_path=scorer.path,
                values=scorer.values_manifest,
                model={"class": type(self.model).__name__, "vocab_size": self.model.config.vocab_size},
                versions=versions,
            )
            write_manifest(self.run_dir, manifest)
        if distributed:
            dist.barrier()
        self.writer = ScoreWriter(self.run_dir, dp_rank=scorer.dp_rank)
        scorer.sink = self.writer
        self.scorer = scorer

    def detach_scorer(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.scorer is not None:
            self.scorer.detach()
        self.scorer = self.writer = None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Keep the optimizer step's micro-batches: the scorer runs them together at its first micro-step."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._window, self._num_items_in_batch = list(batch_samples), num_items_in_batch
        self._window_losses = []
        return batch_samples, num_items_in_batch

    def _trainer_loss(self, model, batch: Batch) -> torch.Tensor:
        """The loss ``Trainer.training_step`` backpropagates: ``compute_loss`` with the step's
        ``num_items_in_batch``, divided by the accumulation steps where the Trainer divides it."""
        num_items = self._num_items_in_batch
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, batch["trainer_inputs"], num_items_in_batch=num_items)
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = self.model_accepts_loss_kwargs and num_items is not None
        return loss if scaled else loss / self.current_gradient_accumulation_steps

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Score the step's micro-batches: through the DeepSpeed engine (:meth:`_deepspeed_training_step`)
        or inside the plain Trainer's own training step (:meth:`_plain_training_step`)."""
        if self.scorer is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.is_deepspeed_enabled:
            return self._deepspeed_training_step(model, inputs)
        return self._plain_training_step(model, inputs, num_items_in_batch)

    def _step_batches(self, inputs) -> list[Batch]:
        """The scorer's view of the step's micro-batches (checked to be the ones the Trainer trains on)."""
        if inputs is not self._window[0]:
            raise RuntimeError("training_step got a micro-batch get_batch_samples did not collect")
        accepts_position_ids = "position_ids" in inspect.signature(self.model.forward).parameters
        return [_scoring_batch(self._prepare_inputs(b), accepts_position_ids) for b in self._window]

    def _deepspeed_training_step(self, model, inputs) -> torch.Tensor:
        """At an optimizer step's first micro-batch, score all of its micro-batches (validation pass,
        then each micro-batch's forward and backward through the engine, without DeepSpeed dividing
        the Trainer's already normalised loss by the accumulation steps again); at its last, step the
        engine (what Accelerate's DeepSpeed backward does) and close the step's records."""
        if not self._window_losses:
            model.train()
            losses = self.scorer.forward_backward(self._step_batches(inputs), self._trainer_loss, scale_wrt_gas=False)
            self._window_losses = list(reversed(losses))
        loss = self._window_losses.pop()
        if not self._window_losses:
            self.model_wrapped.step()
            self.last_result = self.scorer.end_step()
        return torch.tensor(loss, device=self.args.device)

    def _plain_training_step(self, model, inputs, num_items_in_batch) -> torch.Tensor:
        """The Trainer's own training step, scored: the validation pass before the step's first
        micro-batch, the scores reduced after its last backward (DDP has averaged the gradients,
        nothing is clipped yet); :meth:`_close_plain_step` closes the step after the optimizer's."""
        if not self._scored_micro_batches:
            self._scored_micro_batches = self._step_batches(inputs)
            self._trained_micro_batches = 0
            self.scorer.begin_step(len(self._window), self.args.per_device_train_batch_size)
        batches = self._scored_micro_batches
        loss = super().training_step(model, batches[self._trained_micro_batches]["trainer_inputs"], num_items_in_batch)
        self._trained_micro_batches += 1
        if self._trained_micro_batches == len(batches):
            self._scored_micro_batches = []
            sample_ids = torch.stack([torch.as_tensor(b["sample_ids"]).reshape(-1) for b in batches])
            n_tokens = torch.stack([b["loss_mask"].sum(-1) for b in batches]).round()
            self.scorer.finish_step(sample_ids, n_tokens)
        return loss

    def _clip_grad_norm(self, model):
        """The Trainer's clipping (``max_grad_norm > 0``), keeping the factor it multiplied the gradient by:
        torch's ``clip_grad_norm_`` scales by ``min(1, max_norm / (norm + 1e-6))`` of the norm it returns."""
        norm = super()._clip_grad_norm(model)
        if self.scorer is not None and not self.is_deepspeed_enabled:  # DeepSpeed clips in its own step
            self._clip_coef = clip_coefficient(float(norm), self.args.max_grad_norm)
        return norm

    def _close_plain_step(self) -> None:
        """After the plain Trainer's optimizer step: the step's records, with its clipping coefficient."""
        clip_coef, self._clip_coef = self._clip_coef, 1.0
        skipped = self.accelerator.optimizer_step_was_skipped
        self.last_result = self.scorer.end_step(clip_coef=clip_coef, skipped=skipped)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Training logs also carry the last scored step's validation loss and ``<g, G>`` per target."""
        if self.last_result is not None and "loss" in logs:
            for target, value in self.last_result.validation_losses.items():
                logs[f"inrun/validation_loss/{target}"] = value
            for target, value in self.last_result.batch_dots.items():
                logs[f"inrun/batch_dot/{target}"] = value
        super().log(logs, *args, **kwargs)


class _ScorerLifetime(TrainerCallback):
    """Attaches the scorer once the Trainer has prepared the model, closes the plain Trainer's steps
    after its optimizer steps, and the scorer when training ends."""

    def __init__(self, trainer: ScoringTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.attach_scorer()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.scorer is not None and not self.trainer.is_deepspeed_enabled:
            self.trainer._close_plain_step()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.detach_scorer()

"""A real ``transformers.Trainer`` run with ScoringTrainer under DeepSpeed (tests/test_hf_trainer.py).

argv: OUT_DIR RUN_DIR DEEPSPEED_CONFIG. A tiny GPT-2 (random weights, a character tokenizer built
here, nothing downloaded) trains ``STEPS`` steps on texts of different lengths (so the Trainer's
``num_items_in_batch`` differs from step to step) with the shuffling sampler. Each rank saves the
dataset indices its dataset was asked for, in order (what the sampler chose), the model's weights at
the start of every step, the Trainer's ``num_items_in_batch`` of every step, its log history and,
on rank 0, what the brute-force check needs; then the plain Trainer repeats the run, and each rank
saves which weights scoring changed (none may).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models

from inrun_megatron import cpu_shims
from inrun_megatron.hf_trainer import ScoringTrainer

STEPS = 2
ALPHABET = "abcdefghijklmnopqrstuvwxyz "
SEQ_LENGTH = 12


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per character; ``<pad>`` is id 0."""
    vocab = {"<pad>": 0, **{c: i + 1 for i, c in enumerate(ALPHABET)}}
    fast = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=fast, pad_token="<pad>")


def texts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, SEQ_LENGTH + 1, (1,), generator=g))
        out.append("".join(ALPHABET[int(i)] for i in torch.randint(0, len(ALPHABET), (length,), generator=g)))
    return out


class LoggedDataset(torch.utils.data.Dataset):
    """Tokenized texts padded to ``SEQ_LENGTH``; remembers every index it was asked for."""

    def __init__(self, examples: list[dict]):
        self.examples = examples
        self.requested: list[int] = []

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        self.requested.append(int(index))
        return dict(self.examples[index])


def main() -> None:
    out_dir, run_dir, ds_config = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
    cpu_shims.install_deepspeed()
    ds_config.pop("scheduler", None)  # the Trainer's own (linear decay) schedule
    tok = tokenizer()
    examples = [dict(tok(t, padding="max_length", max_length=SEQ_LENGTH)) for t in texts(24, seed=1)]
    dataset = LoggedDataset(examples)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(tok), n_embd=16, n_layer=1, n_head=4, n_positions=SEQ_LENGTH,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=ds_config["train_micro_batch_size_per_gpu"],
        gradient_accumulation_steps=ds_config["gradient_accumulation_steps"],
        max_grad_norm=ds_config["gradient_clipping"],
        max_steps=STEPS,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=3,
        deepspeed=ds_config,
    )
    weights = []

    class KeepWeights(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    num_items = []

    class RecordingTrainer(ScoringTrainer):
        """Records the Trainer's own ``num_items_in_batch`` of each step (the brute force divides by it)."""

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, n_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            num_items.append(float(n_items))
            return batches, n_items

    validation = {"held_out": texts(4, seed=2), "tokenized": [dict(e) for e in examples[:2]]}
    trainer = RecordingTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=transformers.DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
        validation=validation,
        run_dir=run_dir,
        callbacks=[KeepWeights()],
    )
    trainer.train()
    scored_weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()  # a second Trainer in this process gets its own DeepSpeed plugin
    GradientState._reset_state()
    torch.manual_seed(0)
    plain = transformers.Trainer(
        model=transformers.GPT2LMHeadModel(config),
        args=args,
        train_dataset=examples,
        data_collator=transformers.DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
    )
    plain.train()
    rank = torch.distributed.get_rank()
    saved = dict(
        requested=dataset.requested,
        weights=weights,
        num_items=num_items,
        log_history=trainer.state.log_history,
        # the same run by the plain Trainer: scoring must not change training
        changed_by_scoring=[k for k, v in plain.model.state_dict().items() if not torch.equal(v, scored_weights[k])],
        losses=[e["loss"] for e in trainer.state.log_history if "loss" in e],
        plain_losses=[e["loss"] for e in plain.state.log_history if "loss" in e],
    )
    if rank == 0:
        saved.update(
            config=config.to_dict(), examples=examples, validation={k: v for k, v in trainer.validation.items()}
        )
    torch.save(saved, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()

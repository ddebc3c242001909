"""Real ``transformers.Trainer`` runs with ScoringTrainer (tests/test_hf_trainer.py), with and without DeepSpeed.

argv: OUT_DIR CASES_JSON, a list of cases run one after the other in this launch, each
``{"name", "run_dir", "deepspeed": config path or null, "mbs", "gas", "max_grad_norm", "optim"}``
(under DeepSpeed the config's micro-batch size, accumulation and clipping). A tiny GPT-2 (random
weights, a character tokenizer built here, nothing downloaded) trains ``STEPS`` steps on texts of
different lengths (so the Trainer's ``num_items_in_batch`` differs from step to step) with the
shuffling sampler. For each case each rank saves the dataset indices its dataset was asked for, in
order (what the sampler chose), the model's weights (and an Adam optimizer's state) at the start of
every step, the Trainer's ``num_items_in_batch`` of every step, its log history and, on rank 0, what
the brute-force check needs; then the plain Trainer repeats the run, and each rank saves which
weights scoring changed (none may). :func:`run_case` also runs in the test's own process (no
torch.distributed).
"""

from __future__ import annotations

import json
import os
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


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's weights, gathered from their ZeRO-3 partitions where partitioned."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _reset_accelerate(*, next_case: bool) -> None:
    """A later Trainer in this process gets its own Accelerate state (and DeepSpeed plugin). Before the
    next case also what marks the process as a DeepSpeed run (its distributed state, kept for this
    case's TrainingArguments whose state it is, and the environment variable Accelerate sets) and the
    ZeRO-3 config the Trainer registers globally (models are built for it while it is set)."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=next_case)
    GradientState._reset_state()
    if next_case:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        unset_hf_deepspeed_config()


def run_case(case: dict, out_dir: Path) -> dict:
    """One case: the scored run, then the plain Trainer's; what this rank saves of them."""
    ds_config = json.loads(Path(case["deepspeed"]).read_text()) if case.get("deepspeed") else None
    if ds_config is not None:
        cpu_shims.install_deepspeed()
        ds_config.pop("scheduler", None)  # the Trainer's own (linear decay) schedule
        mbs, gas = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
        max_grad_norm = ds_config["gradient_clipping"]
    else:
        mbs, gas, max_grad_norm = case["mbs"], case["gas"], case["max_grad_norm"]
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
        output_dir=str(out_dir / "trainer" / case["name"]),
        per_device_train_batch_size=mbs,
        gradient_accumulation_steps=gas,
        max_grad_norm=max_grad_norm,
        max_steps=STEPS,
        optim=case.get("optim", "sgd"),
        learning_rate=0.5 if case.get("optim", "sgd") == "sgd" else 0.01,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=3,
        deepspeed=ds_config,
    )
    weights, optimizer_states, num_items = [], [], []

    class KeepWeights(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            weights.append(full_state(model))
            if ds_config is None:  # the plain Trainer's torch optimizer: what Adam's preconditioner reads
                inner = getattr(optimizer, "optimizer", optimizer)
                names = {id(p): n for n, p in model.named_parameters()}
                optimizer_states.append(
                    {
                        names[id(p)]: {k: v.clone() if torch.is_tensor(v) else v for k, v in inner.state[p].items()}
                        for group in inner.param_groups
                        for p in group["params"]
                        if p in inner.state
                    }
                )

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
        run_dir=case["run_dir"],
        callbacks=[KeepWeights()],
    )
    trainer.train()
    scored_weights = full_state(trainer.model)
    _reset_accelerate(next_case=False)
    torch.manual_seed(0)
    plain = transformers.Trainer(
        model=transformers.GPT2LMHeadModel(config),
        args=args,
        train_dataset=examples,
        data_collator=transformers.DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
    )
    plain.train()
    plain_weights = full_state(plain.model)
    _reset_accelerate(next_case=True)
    distributed = torch.distributed.is_initialized()
    saved = dict(
        requested=dataset.requested,
        weights=weights,
        final_weights=scored_weights,
        optimizer_states=optimizer_states,
        num_items=num_items,
        log_history=trainer.state.log_history,
        # the same run by the plain Trainer: scoring must not change training
        changed_by_scoring=[k for k, v in plain_weights.items() if not torch.equal(v, scored_weights[k])],
        losses=[e["loss"] for e in trainer.state.log_history if "loss" in e],
        plain_losses=[e["loss"] for e in plain.state.log_history if "loss" in e],
        wrapped=type(trainer.model_wrapped).__name__,  # what the Trainer trained: DDP, a DeepSpeed engine, the model
        mbs=mbs,
        gas=gas,
        max_grad_norm=max_grad_norm,
    )
    if not distributed or torch.distributed.get_rank() == 0:
        saved.update(
            config=config.to_dict(), examples=examples, validation={k: v for k, v in trainer.validation.items()}
        )
    return saved


def main() -> None:
    out_dir, cases = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    saved = {case["name"]: run_case(case, out_dir) for case in cases}
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0  # one plain process: rank 0
    torch.save(saved, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()

"""Worker: ``launch/pretrain_gpt.py``'s main on one process, with brute-force values of its first step.

Right after the model is built (before the scorer attaches any hook, before any update) it builds a
second model of the same shape with the run's weights. Before the first training step it computes
on that one, by brute force (tests/oracle.py: one backward per sequence and per document), each
validation target's gradient and every sequence's and every document's raw score of the first
global batch, read from the run's own training dataset, and writes them to ``$INRUN_ORACLE_OUT`` as
JSON: ``{"documents": [[target, sample_id, span, raw], ...], "sequences": [[target, sample_id,
raw], ...], "batch_has_attention_mask": bool}``. The second model is needed because megatron's DDP
moves the run's gradients into its buffers.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from inrun_megatron import cpu_shims

cpu_shims.install()

from inrun_megatron.data.datasets import WithSampleIds, stack_items  # noqa: E402
from inrun_megatron.data.validation_sets import build_targets  # noqa: E402
from inrun_megatron.megatron import model as gpt  # noqa: E402
from inrun_megatron.pretrain import train  # noqa: E402

import oracle  # noqa: E402
from common import token_losses  # noqa: E402


def brute_force_first_step() -> None:
    build_model, train_step = train.Pretraining._build_model, train.Pretraining.train_step
    build_chunks, shapes = gpt.build_gpt_chunks, []

    def build_chunks_and_keep_shape(shape, *args, **kwargs):
        shapes.append(shape)
        return build_chunks(shape, *args, **kwargs)

    def build_and_copy(self, vocab_size: int) -> None:
        build_model(self, vocab_size)
        assert len(self.models) == 1 and self.layout.dp == 1, "one process, one model chunk"
        (self.oracle_model,) = build_chunks(shapes[-1])
        self.oracle_model.load_state_dict(self.models[0].state_dict())

    def brute_force_then_step(self, times):
        if self.iteration == 0:
            c = self.config
            mbs, gbs = c.training.micro_batch_size, c.training.global_batch_size
            items = WithSampleIds(self.data.train, self.train_ids)
            batches = stack_items([items[i] for i in range(gbs)], mbs)  # the sampler's first global batch
            targets = build_targets(
                c.validation.targets, self.data, self.tokenizer, seq_length=c.model.seq_length, micro_batch_size=mbs
            )
            model, eod = self.oracle_model, self.tokenizer.eod
            documents, sequences = [], []
            for name, validation in targets.items():
                g_val = oracle.validation_gradient(model, validation, token_losses)
                for (sid, span), raw in oracle.per_document_raw(model, batches, token_losses, g_val, eod).items():
                    documents.append([name, sid, span, raw])
                for sid, raw in oracle.per_sample_raw(model, batches, token_losses, g_val).items():
                    sequences.append([name, sid, raw])
            found = {
                "documents": documents,
                "sequences": sequences,
                "batch_has_attention_mask": "attention_mask" in batches[0],
            }
            Path(os.environ["INRUN_ORACLE_OUT"]).write_text(json.dumps(found))
        return train_step(self, times)

    gpt.build_gpt_chunks = build_chunks_and_keep_shape
    train.Pretraining._build_model = build_and_copy
    train.Pretraining.train_step = brute_force_then_step


if __name__ == "__main__":
    brute_force_first_step()
    train.main(sys.argv[1:])

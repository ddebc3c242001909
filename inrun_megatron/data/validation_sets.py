"""Named validation sets ("targets") for scoring, from the run's data or from a user's JSONL file.

* ``source: <name>, sequences: n`` — the first ``n`` sequences of that training source's held-out
  split (megatron's ``split``; its documents never appear in training), in megatron's own order.
* ``jsonl: <file>`` — one document per line (JSON with a text field); each document becomes one
  sequence, padded to the sequence length with a zero loss mask. A document longer than the
  sequence length is an error rather than being silently cut.

Each target is a list of batches in megatron's GPT batch format, the same on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from inrun_megatron.data.datasets import OPTIONAL_BATCH_KEYS, TrainingData, stack_items
from inrun_megatron.data.indexed import read_documents
from inrun_megatron.data.tokenizer import Tokenizer
from inrun_megatron.validation import ValidationTarget


@dataclass
class TargetSpec:
    """One validation target as a run config states it (exactly one of ``source``/``jsonl``)."""

    name: str
    source: str | None = None
    sequences: int | None = None
    jsonl: str | None = None
    text_key: str = "text"


def jsonl_sequences(spec: TargetSpec, tokenizer: Tokenizer, seq_length: int) -> list[dict[str, torch.Tensor]]:
    """Tokenize a JSONL target into GPT items; refuse documents that do not fit a sequence."""
    items = []
    for doc in read_documents(spec.jsonl, text_key=spec.text_key):
        ids = [*tokenizer.tokenize(doc.text), tokenizer.eod]
        if len(ids) > seq_length + 1:
            raise ValueError(
                f"validation target {spec.name!r}: {doc.input_path}:{doc.line} has {len(ids) - 1} tokens (plus the"
                f" end-of-document token) but the sequence length is {seq_length}; every validation document must"
                " fit one sequence: split long documents, or raise model.seq_length"
            )
        n = len(ids) - 1
        tokens = torch.full((seq_length + 1,), tokenizer.eod, dtype=torch.int64)
        tokens[: len(ids)] = torch.tensor(ids)
        loss_mask = torch.zeros(seq_length)
        loss_mask[:n] = 1.0
        items.append(
            {
                "tokens": tokens[:-1].clone(),
                "labels": tokens[1:].clone(),
                "loss_mask": loss_mask,
                "position_ids": torch.arange(seq_length),
            }
        )
    if not items:
        raise ValueError(f"validation target {spec.name!r}: {spec.jsonl} holds no document")
    return items


def heldout_sequences(spec: TargetSpec, data: TrainingData) -> list[dict[str, torch.Tensor]]:
    dataset = data.heldout.get(spec.source)
    available = 0 if dataset is None else len(dataset)
    if spec.sequences > available:
        raise ValueError(
            f"validation target {spec.name!r} asks for {spec.sequences} held-out sequences of source"
            f" {spec.source!r}, but its held-out split holds {available}; ask for fewer or enlarge the"
            " validation part of data.split"
        )
    keys = ("tokens", "labels", "loss_mask", "position_ids", *OPTIONAL_BATCH_KEYS)
    # with data.reset_attention_mask the held-out sequences carry megatron's mask as training ones do
    return [{k: torch.as_tensor(v) for k, v in dataset[i].items() if k in keys} for i in range(spec.sequences)]


def build_targets(
    specs: Sequence[TargetSpec],
    data: TrainingData,
    tokenizer: Tokenizer,
    *,
    seq_length: int,
    micro_batch_size: int,
) -> dict[str, list[dict[str, torch.Tensor]]]:
    """``{target name: batches}`` for :class:`~inrun_megatron.megatron.MegatronScorer`."""
    targets = {}
    for spec in specs:
        items = jsonl_sequences(spec, tokenizer, seq_length) if spec.jsonl else heldout_sequences(spec, data)
        targets[spec.name] = stack_items(items, min(micro_batch_size, len(items)))
    return targets


def describe_targets(specs: Sequence[TargetSpec], targets: dict[str, list]) -> list[dict]:
    """The manifest's description of each target (where it came from, its size in tokens)."""
    out = []
    for spec in specs:
        entry = ValidationTarget(spec.name, targets[spec.name]).describe()
        entry.update({"source": spec.source, "split": "heldout"} if spec.source else {"jsonl": spec.jsonl})
        out.append(entry)
    return out

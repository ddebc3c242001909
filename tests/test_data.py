"""Data pipeline: JSONL -> indexed datasets -> megatron GPTDataset/BlendedDataset with sample ids,
held-out validation targets, and the sample index that maps ids back to documents and text."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from inrun_megatron.data import Tokenizer, open_sample_index, train_bpe
from inrun_megatron.data.datasets import (
    PretrainingSampler,
    Source,
    WithSampleIds,
    batch_iterator,
    build_training_data,
    check_sources,
)
from inrun_megatron.data.indexed import preprocess
from inrun_megatron.data.validation_sets import TargetSpec, build_targets
from inrun_megatron.records import write_manifest

from common import manifest_for_tests

pytestmark = pytest.mark.megatron

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "cats",
    "sleep",
    "in",
    "warm",
    "sun",
    "ünïcode",
    "✓",
]


def _corpus(path, n_docs=240, sources=("a", "b", "c")):
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 50)))
            f.write(json.dumps({"text": text, "source": sources[i % len(sources)], "id": f"doc{i}", "n": i}) + "\n")
        f.write("\n")  # blank lines are skipped


def _texts(path):
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    _corpus(root / "c.jsonl")
    texts = _texts(root / "c.jsonl")
    tok = train_bpe(texts, 300, root / "tokenizer.json")
    infos = preprocess([root / "c.jsonl"], root / "ds", tok)
    return root, tok, infos


def test_bpe_and_bytes_round_trip(corpus):
    _, tok, _ = corpus
    for t in (tok, Tokenizer({"type": "bytes"})):
        text = "the lazy dog ünïcode ✓ sleeps"
        assert t.detokenize(t.tokenize(text)) == text
        assert t.eod not in t.tokenize(text) and 0 <= t.eod < t.vocab_size


def test_preprocess_writes_one_dataset_per_source(corpus):
    root, tok, infos = corpus
    assert sorted(infos) == ["a", "b", "c"]
    assert all(info["documents"] == 80 for info in infos.values())
    import pyarrow.parquet as pq

    docs = pq.read_table(root / "ds" / "b.documents.parquet").to_pylist()
    assert docs[0]["id"] == "doc1" and docs[0]["line"] == 2 and json.loads(docs[0]["meta"]) == {"n": 1}
    texts = _texts(root / "c.jsonl")
    assert docs[0]["tokens"] == len(tok.tokenize(texts[1])) + 1  # + end of document


@pytest.mark.parametrize("weights", [None, (0.5, 0.3, 0.2)])
def test_sample_index_maps_every_id_to_its_tokens(megatron_world, corpus, tmp_path, weights):
    root, tok, _ = corpus
    names = ("a",) if weights is None else ("a", "b", "c")
    sources = [
        Source(n, str(root / "ds" / n), None if weights is None else w) for n, w in zip(names, weights or [None])
    ]
    check_sources(sources, tok)
    data = build_training_data(
        sources, tok, seq_length=16, seed=7, split="90,10,0", train_samples=300, cache_dir=tmp_path / "cache"
    )
    write_manifest(tmp_path, manifest_for_tests(data=data.manifest_section(tok.spec(), tmp_path)))
    index = open_sample_index(tmp_path)
    ids = np.arange(len(data.train))
    table = index.lookup(ids[::-1]).to_pylist()[::-1]
    dataset = WithSampleIds(data.train)
    documents = {n: index.documents(n).to_pylist() for n in names}
    for i in ids:
        item = dataset[int(i)]
        assert int(item["sample_ids"]) == i
        expected = np.concatenate([item["tokens"].numpy(), item["labels"].numpy()[-1:]])
        row = table[i]
        assert row["sample_id"] == i and row["source"] in names
        assert sum(row["document_tokens"]) == 17
        np.testing.assert_array_equal(index.token_ids(int(i)), expected)
        # documents come from the training split only (the first 90% of each source's documents)
        n_docs = len(documents[row["source"]])
        assert all(d < round(0.9 * n_docs) for d in row["document_ids"])
    if weights is not None:
        counts = np.bincount([r["dataset_id"] for r in table], minlength=3) / len(table)
        np.testing.assert_allclose(counts, weights, atol=0.02)
    full = tok.detokenize(index.token_ids(3))
    assert index.text(3, max_chars=10**4) == full and len(full) > 10
    assert index.text(3, max_chars=10) == full[:9] + "…"
    with pytest.raises(ValueError, match="outside this run's training data"):
        index.lookup(np.array([len(data.train)]))


def test_sampler_order_and_resume(megatron_world, corpus, tmp_path):
    sampler = PretrainingSampler(total=40, consumed=8, micro_batch_size=2, dp_rank=1, dp_size=2)
    assert list(sampler)[:3] == [[10, 11], [14, 15], [18, 19]]
    root, tok, _ = corpus
    data = build_training_data(
        [Source("a", str(root / "ds" / "a"))], tok, seq_length=8, seed=1, split="90,10,0", train_samples=40,
        cache_dir=tmp_path,
    )  # fmt: skip
    it = batch_iterator(data.train, consumed=8, micro_batch_size=2, dp_rank=1, dp_size=2)
    batch = next(it)
    assert batch["sample_ids"].tolist() == [10, 11] and batch["tokens"].shape == (2, 8)
    torch.testing.assert_close(batch["tokens"][1], data.train[11]["tokens"])


def test_validation_targets_heldout_and_jsonl(megatron_world, corpus, tmp_path):
    root, tok, _ = corpus
    sources = [Source(n, str(root / "ds" / n), 1.0) for n in ("a", "b")]
    data = build_training_data(
        sources, tok, seq_length=16, seed=7, split="80,20,0", train_samples=50, cache_dir=tmp_path / "cache"
    )
    jsonl = tmp_path / "val.jsonl"
    jsonl.write_text(json.dumps({"text": "the lazy dog"}) + "\n" + json.dumps({"text": "cats sleep"}) + "\n")
    specs = [TargetSpec("held", source="b", sequences=5), TargetSpec("mine", jsonl=str(jsonl))]
    targets = build_targets(specs, data, tok, seq_length=16, micro_batch_size=4)
    held = targets["held"]
    assert [b["tokens"].shape for b in held] == [(4, 16), (4, 16)]
    assert held[1]["loss_mask"][1:].sum() == 0  # padding rows add nothing
    torch.testing.assert_close(held[0]["tokens"][2], data.heldout["b"][2]["tokens"])
    mine = targets["mine"][0]
    n = len(tok.tokenize("the lazy dog"))
    assert mine["loss_mask"][0].sum() == n  # every token predicts the next, the last one predicts <eod>
    assert mine["labels"][0, n - 1] == tok.eod
    too_long = tmp_path / "long.jsonl"
    too_long.write_text(json.dumps({"text": " ".join(["jumps"] * 40)}) + "\n")
    with pytest.raises(ValueError, match=r"long.jsonl:1 has \d+ tokens .* sequence length is 16"):
        build_targets([TargetSpec("long", jsonl=str(too_long))], data, tok, seq_length=16, micro_batch_size=4)
    with pytest.raises(ValueError, match="held-out split holds"):
        build_targets([TargetSpec("big", source="a", sequences=10**4)], data, tok, seq_length=16, micro_batch_size=4)


def _documents_of(tokens: torch.Tensor, eod: int) -> list[int]:
    """Which document of the row each position's input token belongs to, written out here: a
    document runs through its end-of-document token."""
    documents, current = [], 0
    for token in tokens.tolist():
        documents.append(current)
        current += token == eod
    return documents


def test_reset_masks_and_positions_are_per_document_and_change_nothing_when_off(megatron_world, corpus, tmp_path):
    """``reset_attention_mask``/``reset_position_ids`` (docs/DESIGN.md §2.9): every item carries a mask that
    lets a position see the earlier positions of its own document only, and positions that restart in every
    document; tokens, labels and loss masks, and so what a sample id names, are the same as without; off,
    the items are megatron's default (no mask, positions 0..s-1). Batches and held-out targets carry the mask."""
    root, tok, _ = corpus
    sources = [Source(n, str(root / "ds" / n), 1.0) for n in ("a", "b")]

    def build(reset: bool):
        return build_training_data(
            sources, tok, seq_length=16, seed=7, split="80,20,0", train_samples=50, cache_dir=tmp_path / str(reset),
            reset_attention_mask=reset, reset_position_ids=reset,
        )  # fmt: skip

    plain, reset = build(False), build(True)
    assert len(plain.train) == len(reset.train)
    cut = 0
    for i in range(len(plain.train)):
        off, on = WithSampleIds(plain.train)[i], WithSampleIds(reset.train)[i]
        assert sorted(off) == ["labels", "loss_mask", "position_ids", "sample_ids", "tokens"]
        assert torch.equal(off["position_ids"], torch.arange(16))
        assert sorted(on) == ["attention_mask", *sorted(off)]
        for key in off:
            if key != "position_ids":
                assert torch.equal(on[key], off[key]), key
        documents = _documents_of(on["tokens"], tok.eod)
        sees = torch.tensor([[k <= q and documents[k] == documents[q] for k in range(16)] for q in range(16)])
        assert on["attention_mask"].shape == (1, 16, 16) and on["attention_mask"].dtype == torch.bool
        assert torch.equal(~on["attention_mask"][0], sees)  # megatron's mask: True where masked
        starts = [documents.index(d) for d in documents]
        assert on["position_ids"].tolist() == [q - starts[q] for q in range(16)]
        cut += documents[-1] > 0
    assert cut >= 10, "the data must pack several documents into many sequences"
    batch = next(batch_iterator(reset.train, consumed=0, micro_batch_size=2, dp_rank=0, dp_size=1))
    assert batch["attention_mask"].shape == (2, 1, 16, 16)
    jsonl = tmp_path / "val.jsonl"
    jsonl.write_text(json.dumps({"text": "the lazy dog"}) + "\n")
    specs = [TargetSpec("held", source="b", sequences=3), TargetSpec("mine", jsonl=str(jsonl))]
    targets = build_targets(specs, reset, tok, seq_length=16, micro_batch_size=4)
    assert torch.equal(targets["held"][0]["attention_mask"][1], reset.heldout["b"][1]["attention_mask"])
    assert "attention_mask" not in targets["mine"][0]  # one document per sequence: the causal mask is its own
    assert "attention_mask" not in build_targets(specs, plain, tok, seq_length=16, micro_batch_size=4)["held"][0]


def test_sources_are_checked(corpus, tmp_path):
    root, tok, _ = corpus
    with pytest.raises(FileNotFoundError, match=r"nope\.bin does not exist"):
        check_sources([Source("x", str(root / "ds" / "nope"))], tok)
    with pytest.raises(ValueError, match="tokenized with"):
        check_sources([Source("a", str(root / "ds" / "a"))], Tokenizer({"type": "bytes"}))

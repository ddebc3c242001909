"""From a training sample id back to its source, documents, token offsets and text.

Rebuilt from what a run directory stores: the manifest's ``data`` section (written by the
pretraining entry point) and megatron-core's own dataset index arrays that it points to::

    sample id --(blend: dataset_index, dataset_sample_index)--> (source, index in the source)
              --(source: shuffle_index, sample_index, document_index)--> documents + first offset

A sample of ``seq_length + 1`` tokens starts ``first_token_offset`` tokens into its first document
and runs through the following documents of megatron's (shuffled) document order. Only numpy and
pyarrow are needed for :meth:`SampleIndex.lookup`; :meth:`SampleIndex.text` also reads the tokens.

Example::

    index = open_sample_index("runs/demo")
    index.lookup(np.array([0, 17]))    # pyarrow.Table, one row per id
    index.text(17)                     # the sequence's text, cut to 200 characters
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from inrun_megatron.data.indexed import DOCUMENTS_SUFFIX, megatron_datasets_module
from inrun_megatron.data.tokenizer import Tokenizer
from inrun_megatron.records import read_manifest

LOOKUP_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.int64()),
        pa.field("source", pa.string()),
        pa.field("dataset_id", pa.int32()),  # position of the source in the manifest's data.sources
        pa.field("dataset_sample", pa.int64()),  # index of the sample within its source's GPTDataset
        pa.field("document_ids", pa.list_(pa.int64())),  # megatron document ids (= rows of documents())
        pa.field("document_tokens", pa.list_(pa.int64())),  # tokens the sample takes from each document
        pa.field("first_token_offset", pa.int64()),  # where in its first document the sample starts
    ]
)


class _SourceIndex:
    """One source's megatron ``GPTDataset`` index arrays (memory-mapped) and, lazily, its tokens."""

    def __init__(self, entry: dict, resolve):
        self.name = entry["name"]
        self.prefix = entry["prefix"]
        index = entry["index"]
        self.document_index = np.load(resolve(index["document_index"]), mmap_mode="r")
        self.sample_index = np.load(resolve(index["sample_index"]), mmap_mode="r")
        self.shuffle_index = np.load(resolve(index["shuffle_index"]), mmap_mode="r")

    def __len__(self) -> int:
        return len(self.shuffle_index)

    @cached_property
    def tokens(self):
        """megatron's ``IndexedDataset`` of this source (one megatron sequence per document)."""
        return megatron_datasets_module().IndexedDataset(self.prefix, multimodal=False, mmap=True)

    @cached_property
    def document_lengths(self) -> np.ndarray:
        return np.asarray(self.tokens.sequence_lengths, dtype=np.int64)


class SampleIndex:
    """Maps training sample ids of one run to where their tokens came from."""

    def __init__(self, run_dir: str | Path, data: dict):
        self.run_dir = Path(run_dir)
        self.data = data
        self.seq_length = int(data["seq_length"])
        self.extra_token = int(bool(data.get("add_extra_token", True)))
        self.num_samples = int(data["num_samples"])
        self.sources = [_SourceIndex(entry, self._resolve) for entry in data["sources"]]
        blend = data.get("blend")
        self._dataset_index = np.load(self._resolve(blend["dataset_index"]), mmap_mode="r") if blend else None
        self._dataset_sample_index = (
            np.load(self._resolve(blend["dataset_sample_index"]), mmap_mode="r") if blend else None
        )

    def _resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.run_dir / p

    @cached_property
    def tokenizer(self) -> Tokenizer:
        spec = dict(self.data["tokenizer"])
        if spec.get("path"):
            spec["path"] = str(self._resolve(spec["path"]))
        return Tokenizer(spec)

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def _check_ids(self, sample_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.num_samples)]
        if bad.size:
            raise ValueError(
                f"sample ids {bad[:5].tolist()} are outside this run's training data [0, {self.num_samples})"
            )
        return ids

    def lookup(self, sample_ids: np.ndarray) -> pa.Table:
        """One row per id, in the order given (columns: :data:`LOOKUP_SCHEMA`)."""
        ids = self._check_ids(sample_ids)
        if self._dataset_index is None:
            dataset_id = np.zeros(len(ids), dtype=np.int32)
            dataset_sample = ids.copy()
        else:
            dataset_id = np.asarray(self._dataset_index[ids], dtype=np.int32)
            dataset_sample = np.asarray(self._dataset_sample_index[ids], dtype=np.int64)
        n_docs = np.zeros(len(ids), dtype=np.int64)
        first_offset = np.zeros(len(ids), dtype=np.int64)
        doc_lists: list[np.ndarray | None] = [None] * len(ids)
        tok_lists: list[np.ndarray | None] = [None] * len(ids)
        for k, source in enumerate(self.sources):
            rows = np.nonzero(dataset_id == k)[0]
            if rows.size == 0:
                continue
            docs, toks, offsets = self._spans(source, dataset_sample[rows])
            first_offset[rows] = offsets
            for row, d, t in zip(rows, docs, toks):
                doc_lists[row], tok_lists[row] = d, t
                n_docs[row] = len(d)
        offsets = np.concatenate([[0], np.cumsum(n_docs)])
        flat_docs = np.concatenate(doc_lists) if len(ids) else np.zeros(0, dtype=np.int64)
        flat_toks = np.concatenate(tok_lists) if len(ids) else np.zeros(0, dtype=np.int64)
        names = np.array(self.source_names, dtype=object)
        return pa.Table.from_arrays(
            [
                pa.array(ids, pa.int64()),
                pa.array(names[dataset_id] if len(ids) else [], pa.string()),
                pa.array(dataset_id, pa.int32()),
                pa.array(dataset_sample, pa.int64()),
                pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat_docs, pa.int64())),
                pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat_toks, pa.int64())),
                pa.array(first_offset, pa.int64()),
            ],
            schema=LOOKUP_SCHEMA,
        )

    def _spans(self, source: _SourceIndex, local: np.ndarray):
        """Documents, tokens per document and first offset of samples ``local`` of one source,
        following megatron's ``GPTDataset._query_document_sample_shuffle_indices``."""
        idx = np.asarray(source.shuffle_index[local], dtype=np.int64)
        begin = np.asarray(source.sample_index[idx], dtype=np.int64)
        end = np.asarray(source.sample_index[idx + 1], dtype=np.int64)
        docs, toks = [], []
        for (b_pos, b_off), (e_pos, e_off) in zip(begin, end):
            doc_ids = np.asarray(source.document_index[b_pos : e_pos + 1], dtype=np.int64)
            if b_pos == e_pos:
                counts = np.array([e_off - b_off + self.extra_token], dtype=np.int64)
            else:
                counts = source.document_lengths[doc_ids].copy()
                counts[0] -= b_off
                counts[-1] = e_off + self.extra_token
            docs.append(doc_ids)
            toks.append(counts)
        return docs, toks, begin[:, 1] if len(begin) else np.zeros(0, dtype=np.int64)

    def token_ids(self, sample_id: int) -> np.ndarray:
        """The ``seq_length + 1`` token ids of a sample (shorter only at the very end of the data)."""
        row = self.lookup(np.array([sample_id])).to_pylist()[0]
        source = self.sources[row["dataset_id"]]
        parts, offset = [], row["first_token_offset"]
        for doc, count in zip(row["document_ids"], row["document_tokens"]):
            parts.append(np.asarray(source.tokens.get(int(doc), offset=int(offset), length=int(count))))
            offset = 0
        return np.concatenate(parts)

    def text(self, sample_id: int, max_chars: int = 200) -> str:
        """The sample's text (detokenized), cut to ``max_chars`` characters."""
        text = self.tokenizer.detokenize(self.token_ids(sample_id))
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

    def documents(self, source: str) -> pa.Table:
        """A source's document table from preprocessing: ``document_id``, input file, line, ``id``,
        ``meta`` (other JSON fields, as JSON text), ``tokens``."""
        if source not in self.source_names:
            raise KeyError(f"no source {source!r} in this run; sources: {self.source_names}")
        prefix = self.sources[self.source_names.index(source)].prefix
        return pq.read_table(prefix + DOCUMENTS_SUFFIX)


def open_sample_index(run_dir: str | Path) -> SampleIndex:
    """The sample index of a pretraining run directory (see the module docstring)."""
    manifest = read_manifest(run_dir)
    data = manifest.data
    if not data or "sources" not in data:
        raise ValueError(
            f"{run_dir}: the manifest has no 'data' section; only runs of launch/pretrain_gpt.py record"
            " where their samples came from"
        )
    return SampleIndex(run_dir, data)

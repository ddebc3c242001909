"""Raw text or JSONL -> megatron-core indexed datasets, one per source.

Every input line is one document: a JSON object with a text field (``"text"``), an optional
source field (``"source"``, else the input file's stem) and optional ``"id"``; or, for ``.txt``
inputs, the line itself. Each document is tokenized, ends with the end-of-document token and is
appended to its source's megatron ``IndexedDataset`` (``<out>/<source>.bin/.idx``), one megatron
"sequence" per document, so megatron's document ids are the documents' order in that source.

Next to each dataset:

* ``<source>.documents.parquet`` — per document id: the input file and line it came from, its
  ``id`` field and any other JSON fields (``meta``, as JSON text), so scores can be traced back to
  the raw data;
* ``<source>.json`` — the tokenizer (spec + fingerprint) and counts. A run refuses a dataset
  tokenized with another tokenizer than its own.

Files are written under temporary names and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from inrun_megatron.data.tokenizer import Tokenizer, train_bpe

SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DOCUMENTS_SUFFIX = ".documents.parquet"
INFO_SUFFIX = ".json"


def megatron_datasets_module():
    """``megatron.core.datasets.indexed_dataset``, importable on a CPU-only machine too."""
    import torch

    with warnings.catch_warnings():  # megatron warns on import about GPU kernels reading data never uses
        warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
        if not torch.cuda.is_available():
            from inrun_megatron import cpu_shims

            cpu_shims.install()  # megatron-core >= 0.17 needs its triton-only module stubbed first
        from megatron.core.datasets import indexed_dataset

    return indexed_dataset


@dataclass
class Document:
    source: str
    text: str
    input_path: str
    line: int
    doc_id: str | None
    meta: dict = field(default_factory=dict)


def read_documents(path: str | Path, *, text_key: str = "text", source_key: str = "source") -> Iterator[Document]:
    """The documents of one ``.jsonl`` (or ``.txt``: one document per line) file; blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    default_source = path.name.split(".")[0]
    as_text = path.suffix == ".txt"
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if as_text:
                yield Document(default_source, line.rstrip("\n"), str(path), line_no, None)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e}); expected one JSON object per line") from e
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise ValueError(f"{path}:{line_no}: expected a JSON object with a string field {text_key!r}")
            source = str(record.get(source_key, default_source))
            if not SOURCE_NAME.match(source):
                raise ValueError(
                    f"{path}:{line_no}: source {source!r} is not a usable dataset name (letters, digits, '_', '.', '-')"
                )
            doc_id = record.get("id")
            meta = {k: v for k, v in record.items() if k not in (text_key, source_key, "id")}
            yield Document(source, record[text_key], str(path), line_no, None if doc_id is None else str(doc_id), meta)


class _SourceWriter:
    """One source's indexed dataset and document table, written under temporary names."""

    def __init__(self, prefix: Path, tokenizer: Tokenizer):
        self.prefix = prefix
        self.tmp_prefix = prefix.with_name(prefix.name + ".tmp")
        indexed = megatron_datasets_module()
        dtype = indexed.DType.optimal_dtype(tokenizer.vocab_size)
        self.builder = indexed.IndexedDatasetBuilder(indexed.get_bin_path(str(self.tmp_prefix)), dtype=dtype)
        self.rows: dict[str, list] = {"document_id": [], "input": [], "line": [], "id": [], "meta": [], "tokens": []}

    def add(self, doc: Document, tokens: list[int]) -> None:
        import torch

        self.builder.add_item(torch.tensor(tokens, dtype=torch.int64))
        self.builder.end_document()
        rows = self.rows
        rows["document_id"].append(len(rows["document_id"]))
        rows["input"].append(doc.input_path)
        rows["line"].append(doc.line)
        rows["id"].append(doc.doc_id)
        rows["meta"].append(json.dumps(doc.meta, sort_keys=True) if doc.meta else None)
        rows["tokens"].append(len(tokens))

    def finish(self, tokenizer: Tokenizer, source: str) -> dict:
        indexed = megatron_datasets_module()
        self.builder.finalize(indexed.get_idx_path(str(self.tmp_prefix)))
        table = pa.table(
            {
                "document_id": pa.array(self.rows["document_id"], pa.int64()),
                "input": pa.array(self.rows["input"], pa.string()),
                "line": pa.array(self.rows["line"], pa.int64()),
                "id": pa.array(self.rows["id"], pa.string()),
                "meta": pa.array(self.rows["meta"], pa.string()),
                "tokens": pa.array(self.rows["tokens"], pa.int64()),
            }
        )
        pq.write_table(table, str(self.tmp_prefix) + DOCUMENTS_SUFFIX)
        info = {
            "source": source,
            "tokenizer": tokenizer.spec(),
            "documents": table.num_rows,
            "tokens": int(np.sum(self.rows["tokens"])),
        }
        Path(str(self.tmp_prefix) + INFO_SUFFIX).write_text(json.dumps(info, indent=2))
        for suffix in (".bin", ".idx", DOCUMENTS_SUFFIX, INFO_SUFFIX):
            os.replace(str(self.tmp_prefix) + suffix, str(self.prefix) + suffix)
        return info


def preprocess(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    tokenizer: Tokenizer,
    *,
    text_key: str = "text",
    source_key: str = "source",
) -> dict[str, dict]:
    """Tokenize ``inputs`` into one indexed dataset per source under ``output_dir``.

    Returns ``{source: info}`` (the contents of each ``<source>.json``).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    writers: dict[str, _SourceWriter] = {}
    for path in inputs:
        for doc in read_documents(path, text_key=text_key, source_key=source_key):
            writer = writers.get(doc.source)
            if writer is None:
                writer = writers[doc.source] = _SourceWriter(output_dir / doc.source, tokenizer)
            writer.add(doc, [*tokenizer.tokenize(doc.text), tokenizer.eod])
    if not writers:
        raise ValueError(f"no documents in {', '.join(map(str, inputs))}")
    return {source: writer.finish(tokenizer, source) for source, writer in sorted(writers.items())}


def read_source_info(prefix: str | Path) -> dict:
    """The ``<prefix>.json`` written next to an indexed dataset by :func:`preprocess`."""
    path = Path(str(prefix) + INFO_SUFFIX)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {prefix} was not made by the preprocessing tool (tools/preprocess_data.py),"
            " which records the tokenizer next to the data"
        )
    return json.loads(path.read_text())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Tokenize JSONL/text files (one document per line) into megatron-core indexed datasets,"
        " one per source."
    )
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl files (or .txt: one document per line)")
    parser.add_argument("--output-dir", required=True, help="writes <source>.bin/.idx/.documents.parquet/.json")
    tok = parser.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="'bytes', or a tokenizers JSON file")
    tok.add_argument(
        "--train-bpe", type=int, metavar="VOCAB", help="train a byte-level BPE of this size on the inputs first"
    )
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--source-key", default="source")
    args = parser.parse_args(argv)
    if args.train_bpe:
        texts = (d.text for p in args.input for d in read_documents(p, text_key=args.text_key))
        tokenizer = train_bpe(texts, args.train_bpe, Path(args.output_dir) / "tokenizer.json")
        print(f"trained a {tokenizer.vocab_size}-token BPE: {tokenizer.path}")
    elif args.tokenizer == "bytes":
        tokenizer = Tokenizer({"type": "bytes"})
    else:
        tokenizer = Tokenizer({"type": "json", "path": args.tokenizer})
    infos = preprocess(args.input, args.output_dir, tokenizer, text_key=args.text_key, source_key=args.source_key)
    for source, info in infos.items():
        print(f"{source}: {info['documents']} documents, {info['tokens']} tokens -> {Path(args.output_dir) / source}")


if __name__ == "__main__":
    main()

"""The demo corpus: built from the local Python installation, with planted corrupted documents.

Every machine that runs this project has a Python standard library, so the corpus needs no
download and is the same wherever the Python version is the same. Three sources:

* ``prose`` — paragraphs of the language reference shipped with Python (``pydoc_data.topics``);
* ``code`` — chunks of standard-library modules;
* ``docstrings`` — the docstrings of standard-library functions and classes.

A fraction of each source's documents is **corrupted**: its words shuffled (``"shuffled"``: word
frequencies kept, order lost) or its characters replaced by random letters of other scripts
(``"random"``: encoding garbage, tokens no clean text uses); the JSONL field ``corrupted`` says which. The
corrupted documents sit in the first 90% of each source, so held-out slices taken from the end of
a source (``data.split`` with up to 10% validation) stay clean.

    python -m inrun_megatron.data.demo_corpus --output corpus.jsonl
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

#: Documents per source and the corrupted fraction of the demo corpus.
DEFAULT_DOCUMENTS = 400
DEFAULT_CORRUPTED = 0.1
CLEAN_TAIL = 0.1  # the last 10% of each source's documents are never corrupted


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _pack(pieces: Iterator[str], low: int, high: int) -> Iterator[str]:
    """Join consecutive pieces into documents of ``low``..``high`` characters."""
    doc = ""
    for piece in pieces:
        piece = piece.strip()
        if not piece:
            continue
        doc = f"{doc}\n\n{piece}" if doc else piece
        if len(doc) >= low:
            yield doc[:high]
            doc = ""


def prose() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield from _pack(iter(topics[name].split("\n\n")), 300, 900)


def _modules() -> list[Path]:
    return sorted(p for p in _stdlib().glob("*.py") if not p.name.startswith("_"))


def code() -> Iterator[str]:
    for path in _modules():
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        yield from _pack(("\n".join(lines[i : i + 12]) for i in range(0, len(lines), 12)), 300, 900)


def docstrings() -> Iterator[str]:
    for path in _modules():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)))
        yield from _pack((ast.get_docstring(n) or "" for n in nodes), 200, 900)


SOURCES = {"prose": prose, "code": code, "docstrings": docstrings}


#: Greek and Cyrillic letters: what mis-decoded bytes look like, and nothing the clean corpus uses.
GARBAGE = [chr(c) for c in range(0x3B1, 0x3CA)] + [chr(c) for c in range(0x430, 0x450)]


def corrupt(text: str, kind: str, rng: random.Random) -> str:
    if kind == "shuffled":
        words = text.split()
        rng.shuffle(words)
        return " ".join(words)
    return "".join(c if c.isspace() else rng.choice(GARBAGE) for c in text)


def build_corpus(path: str | Path, *, documents: int = DEFAULT_DOCUMENTS, corrupted: float = DEFAULT_CORRUPTED,
                 seed: int = 0) -> dict[str, int]:  # fmt: skip
    """Write the demo corpus as JSONL; returns documents per source."""
    rng = random.Random(seed)
    chosen = {}
    for source, pieces in SOURCES.items():
        available = list(pieces())
        if len(available) < documents:
            raise ValueError(f"only {len(available)} {source} documents in this Python, need {documents}")
        chosen[source] = [available[i] for i in sorted(rng.sample(range(len(available)), documents))]
    counts = {}
    with open(path, "w", encoding="utf-8") as f:
        for source, docs in chosen.items():
            n_bad = round(corrupted * documents)
            bad = set(rng.sample(range(int(documents * (1 - CLEAN_TAIL))), n_bad))
            for i, text in enumerate(docs):
                kind = rng.choice(("shuffled", "random")) if i in bad else None
                text = corrupt(text, kind, rng) if kind else text
                record = {"text": text, "source": source, "id": f"{source}-{i:05d}", "corrupted": kind}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            counts[source] = documents
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the demo corpus (JSONL) from the local Python installation.")
    parser.add_argument("--output", required=True)
    parser.add_argument("--documents", type=int, default=DEFAULT_DOCUMENTS, help="documents per source")
    parser.add_argument("--corrupted", type=float, default=DEFAULT_CORRUPTED, help="fraction of corrupted documents")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = build_corpus(args.output, documents=args.documents, corrupted=args.corrupted, seed=args.seed)
    print(f"demo corpus {args.output}: " + ", ".join(f"{n} {s} documents" for s, n in counts.items()))


if __name__ == "__main__":
    main()

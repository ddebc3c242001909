"""Tokenizers that work offline: raw bytes, or any ``tokenizers`` JSON file (e.g. a BPE trained here).

One small class serves preprocessing, validation JSONL files, text snippets of scored samples and
megatron's dataset config (which reads ``eod``, ``pad``, ``vocab_size`` and ``unique_identifiers``).
A tokenizer is described by a plain spec, ``{"type": "bytes"}`` or ``{"type": "json", "path": ...}``,
stored with every indexed dataset and in the run manifest, so a run refuses data tokenized with
another tokenizer and a score dump can be turned back into text later.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

#: Special tokens of every tokenizer this module trains: end of document, padding.
EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

TOKENIZER_TYPES = ("bytes", "json")


class Tokenizer:
    """Text <-> token ids.

    ``bytes``: ids 0-255 are the UTF-8 bytes, 256 ends a document, 257 pads (vocabulary 258).
    ``json``: a ``tokenizers`` JSON file; it must define the end-of-document token
    (``<|endoftext|>`` unless ``eod_token`` names another) and may define a pad token.
    """

    def __init__(self, spec: Mapping):
        kind = spec.get("type")
        if kind not in TOKENIZER_TYPES:
            raise ValueError(f"tokenizer type must be one of {TOKENIZER_TYPES}, got {kind!r}")
        self.kind = kind
        self.path: Path | None = None
        if kind == "bytes":
            self._vocab_size, self.eod, self.pad = 258, 256, 257
            self.fingerprint = "bytes"
            return
        if not spec.get("path"):
            raise ValueError("a 'json' tokenizer needs 'path': a tokenizers JSON file")
        self.path = Path(spec["path"])
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file {self.path} does not exist")
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(str(self.path))
        eod_token = spec.get("eod_token", EOD_TOKEN)
        eod = self._tok.token_to_id(eod_token)
        if eod is None:
            raise ValueError(f"tokenizer {self.path} has no end-of-document token {eod_token!r}; set 'eod_token'")
        pad = self._tok.token_to_id(spec.get("pad_token", PAD_TOKEN))
        self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = eod
        self.pad = -1 if pad is None else pad  # megatron's "no pad token"
        self.fingerprint = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What megatron hashes into its dataset cache names."""
        return OrderedDict(type=self.kind, fingerprint=self.fingerprint)

    def spec(self) -> dict:
        """The spec that rebuilds this tokenizer (plus its fingerprint, to check identity)."""
        spec = {"type": self.kind, "fingerprint": self.fingerprint}
        if self.path is not None:
            spec["path"] = str(self.path)
        return spec

    def tokenize(self, text: str) -> list[int]:
        if self.kind == "bytes":
            return list(text.encode("utf-8"))
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "bytes":
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self._tok.decode([i for i in ids if i != self.pad], skip_special_tokens=False)


def same_tokenizer(a: Mapping, b: Mapping) -> bool:
    """Whether two tokenizer specs (as stored with datasets and runs) denote the same tokenizer."""
    return a.get("type") == b.get("type") and a.get("fingerprint") == b.get("fingerprint")


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` locally and save it as a ``tokenizers`` JSON file."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return Tokenizer({"type": "json", "path": str(path)})

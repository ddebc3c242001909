"""Training data through megatron-core's own datasets, with the global sample id on every sequence.

megatron's ``BlendedMegatronDatasetBuilder`` builds one ``GPTDataset`` per source (documents split
into train/validation/test by ``split``) and, for several sources, a ``BlendedDataset`` over their
training splits. The **global sample id** of a training sequence is its index into that top-level
dataset; :class:`WithSampleIds` adds it to each item (megatron does not return it), and
:class:`PretrainingSampler` hands the ids out in megatron's pretraining order, so a run resumed
after ``consumed`` samples sees exactly the sequences it would have seen.

megatron writes its index arrays (document, sample and shuffle index per source; dataset and
dataset-sample index of a blend) to ``cache_dir``. :meth:`TrainingData.manifest_section` records
where, which is all :mod:`inrun_megatron.data.sample_index` needs to map a sample id back to its
source, documents and token offsets.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inrun_megatron.data.indexed import megatron_datasets_module, read_source_info
from inrun_megatron.data.tokenizer import Tokenizer, same_tokenizer

#: What a sample id is, as the manifest states it.
SAMPLE_ID_DEFINITION = (
    "index of the training sequence in the run's top-level megatron-core training dataset (BlendedDataset over"
    " the sources, or the single source's GPTDataset); each id is one sequence of seq_length + 1 tokens"
)

#: The keys of a training batch (megatron's GPTDataset items plus ``sample_ids``); with
#: ``reset_attention_mask`` also megatron's ``attention_mask`` (``[1, s, s]`` per item, True: masked).
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "sample_ids")
OPTIONAL_BATCH_KEYS = ("attention_mask",)


@dataclass
class Source:
    """One training source: an indexed dataset made by :mod:`inrun_megatron.data.indexed`."""

    name: str
    prefix: str
    weight: float | None = None


def check_sources(sources: Sequence[Source], tokenizer: Tokenizer) -> list[dict]:
    """Refuse missing data or data tokenized with another tokenizer; return each source's info."""
    if not sources:
        raise ValueError("data.sources is empty: give at least one indexed dataset")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"data.sources names must be unique, got {names}")
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise ValueError("data.sources: give a weight to every source or to none")
    infos = []
    for source in sources:
        where = f"data source {source.name!r}"
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(source.prefix + suffix):
                raise FileNotFoundError(
                    f"{where}: {source.prefix + suffix} does not exist; 'prefix' names an indexed dataset"
                    " (<prefix>.bin/.idx) made by tools/preprocess_data.py"
                )
        if source.weight is not None and not source.weight > 0:
            raise ValueError(f"{where}: weight must be positive, got {source.weight}")
        info = read_source_info(source.prefix)
        if not same_tokenizer(info["tokenizer"], tokenizer.spec()):
            raise ValueError(
                f"{where} was tokenized with {info['tokenizer']}, but the run's tokenizer is {tokenizer.spec()};"
                " re-tokenize it or use the same tokenizer"
            )
        infos.append(info)
    return infos


def read_train_ids(path: str | Path, num_samples: int) -> np.ndarray:
    """The sample ids of a file (one per line, as ``inrun-scores curate -o`` writes them), sorted:
    training on a chosen subset keeps megatron's order among the chosen sequences."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.train_ids: {path} does not exist; give a file of sample ids, one per line")
    try:
        ids = np.loadtxt(path, dtype=np.int64, ndmin=1)
    except ValueError as e:
        raise ValueError(f"data.train_ids: {path} is not a file of integer sample ids, one per line ({e})") from e
    if ids.size == 0:
        raise ValueError(f"data.train_ids: {path} lists no sample id")
    unique = np.unique(ids)
    if unique.size != ids.size:
        raise ValueError(f"data.train_ids: {path} lists {ids.size - unique.size} sample ids more than once")
    if unique[0] < 0 or unique[-1] >= num_samples:
        raise ValueError(
            f"data.train_ids: {path} lists ids outside [0, {num_samples}), the training dataset of"
            f" data.train_samples = {num_samples} sequences; give the train_samples of the run whose ids they are"
        )
    return unique


class WithSampleIds(torch.utils.data.Dataset):
    """A megatron dataset whose items also carry their index as ``sample_ids``; with ``ids``, item
    ``k`` is the dataset's sequence ``ids[k]`` (and carries that id), so a run on a chosen subset
    records the same sample ids as the run that chose it."""

    def __init__(self, dataset: torch.utils.data.Dataset, ids: np.ndarray | None = None):
        self.dataset = dataset
        self.ids = ids

    def __len__(self) -> int:
        return len(self.dataset) if self.ids is None else len(self.ids)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        sample_id = idx if self.ids is None else int(self.ids[idx])
        item = self.dataset[sample_id]
        keys = [key for key in BATCH_KEYS if key != "sample_ids"] + [k for k in OPTIONAL_BATCH_KEYS if k in item]
        out = {key: torch.as_tensor(item[key]) for key in keys}
        out["sample_ids"] = torch.tensor(sample_id, dtype=torch.int64)
        return out


class PretrainingSampler:
    """megatron's pretraining order: microbatch ``k`` of data-parallel rank ``r`` after ``consumed``
    samples holds ids ``consumed + k*mbs*dp + r*mbs + [0, mbs)``; every global batch is consecutive."""

    def __init__(self, total: int, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.total, self.consumed = total, consumed
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.mbs * self.dp_size
        for start in range(self.consumed, self.total - step + 1, step):
            first = start + self.dp_rank * self.mbs
            yield list(range(first, first + self.mbs))

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.mbs * self.dp_size)


def batch_iterator(
    dataset: torch.utils.data.Dataset,
    *,
    consumed: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int = 0,
    ids: np.ndarray | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Microbatches of this DP rank from ``consumed`` on, each with ``sample_ids``; with ``ids``,
    the training order is ``ids`` (see :class:`WithSampleIds`)."""
    items = WithSampleIds(dataset, ids)
    sampler = PretrainingSampler(len(items), consumed, micro_batch_size, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(
        items, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0
    )
    return iter(loader)


@dataclass
class TrainingData:
    """The run's datasets: the top-level training dataset and each source's held-out split."""

    sources: list[Source]
    train: torch.utils.data.Dataset
    heldout: dict[str, torch.utils.data.Dataset]
    cache_dir: Path
    seq_length: int

    def _source_datasets(self) -> list:
        return list(self.train.datasets) if hasattr(self.train, "datasets") else [self.train]

    def manifest_section(self, tokenizer_spec: dict, relative_to: Path) -> dict:
        """What :func:`~inrun_megatron.data.sample_index.open_sample_index` needs (paths inside
        ``relative_to`` are stored relative to it, so a run directory can be moved)."""

        def where(kind: str, ds) -> str:
            split = ds.index_split if hasattr(ds, "index_split") else ds.split  # GPTDataset / BlendedDataset
            path = self.cache_dir / f"{ds.unique_description_hash}-{type(ds).__name__}-{split.name}-{kind}.npy"
            if not path.is_file():
                raise FileNotFoundError(
                    f"megatron-core did not write its dataset index {path.name} to {self.cache_dir};"
                    " this megatron-core version stores dataset indices differently"
                )
            path = path.resolve()
            return (
                str(path.relative_to(relative_to.resolve()))
                if path.is_relative_to(relative_to.resolve())
                else str(path)
            )

        sources = []
        for source, ds in zip(self.sources, self._source_datasets()):
            sources.append(
                {
                    "name": source.name,
                    "prefix": str(Path(source.prefix).resolve()),
                    "weight": source.weight,
                    "index": {k: where(k, ds) for k in ("document_index", "sample_index", "shuffle_index")},
                }
            )
        blended = hasattr(self.train, "datasets")
        return {
            "sample_id": SAMPLE_ID_DEFINITION,
            "num_samples": len(self.train),
            "seq_length": self.seq_length,
            "add_extra_token": True,
            "tokenizer": tokenizer_spec,
            "sources": sources,
            "blend": {k: where(k, self.train) for k in ("dataset_index", "dataset_sample_index")} if blended else None,
        }


def build_training_data(
    sources: Sequence[Source],
    tokenizer: Tokenizer,
    *,
    seq_length: int,
    seed: int,
    split: str,
    train_samples: int,
    cache_dir: str | Path,
    reset_attention_mask: bool = False,
    reset_position_ids: bool = False,
) -> TrainingData:
    """Build the datasets on every rank (rank 0 first, the others read its cached indices).

    ``reset_attention_mask`` and ``reset_position_ids`` are megatron's GPTDataset options: items then
    carry an attention mask that stops every token at the last end-of-document token before it, and
    positions that restart after one (docs/DESIGN.md §2.9). Neither changes which tokens a sample
    holds, so sample ids name the same sequences either way.

    Call on every rank, after :func:`check_sources`.
    """
    megatron_datasets_module()
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    cache_dir = Path(cache_dir)
    weights = [s.weight for s in sources] if sources[0].weight is not None and len(sources) > 1 else None
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([s.prefix for s in sources], weights),
        split=split,
        path_to_cache=str(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=False,
        # megatron builds the mask it resets only when asked to create one; without the reset,
        # the model's own causal mask is the same, so no [s, s] mask travels with every item
        create_attention_mask=reset_attention_mask,
    )
    # Size 0 for the held-out split: megatron then builds exactly one epoch of each source's
    # held-out documents (validation targets take their sequences from it).
    train, heldout, _ = BlendedMegatronDatasetBuilder(GPTDataset, [train_samples, 0, 0], lambda: True, config).build()
    if len(train) < train_samples:
        raise ValueError(
            f"the training data has {len(train)} sequences of {seq_length} tokens but the run needs {train_samples}"
            " (train_iters x global_batch_size); give the sources weights (megatron then repeats them) or train less"
        )
    heldout_per_source = {}
    if heldout is not None:
        parts = list(heldout.datasets) if hasattr(heldout, "datasets") else [heldout]
        heldout_per_source = {s.name: ds for s, ds in zip(sources, parts)}
    return TrainingData(list(sources), train, heldout_per_source, cache_dir, seq_length)


def stack_items(items: Sequence[dict[str, torch.Tensor]], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Cut GPT dataset items into batches of ``batch_size``; the last one is padded with
    copies of the first item whose loss mask is zero (so they add nothing to any loss)."""
    batches = []
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        while len(chunk) < batch_size:
            pad = dict(items[0])
            pad["loss_mask"] = torch.zeros_like(pad["loss_mask"])
            chunk.append(pad)
        batches.append({k: torch.stack([torch.as_tensor(it[k]) for it in chunk]) for k in chunk[0]})
    return batches

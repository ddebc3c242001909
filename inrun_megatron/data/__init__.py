"""Data for pretraining runs: offline tokenizers, indexed datasets from text, megatron-core
datasets with global sample ids, validation targets, and the map from a sample id back to its
source, documents and text.

The sample-lookup API (stable; used by offline analysis)::

    from inrun_megatron.data import open_sample_index
    index = open_sample_index(run_dir)
    index.lookup(sample_ids)   # pyarrow.Table: sample_id, source, dataset_id, dataset_sample,
                               #   document_ids, document_tokens, first_token_offset
    index.text(sample_id)      # detokenized snippet
"""

from inrun_megatron.data.sample_index import LOOKUP_SCHEMA, SampleIndex, open_sample_index
from inrun_megatron.data.tokenizer import Tokenizer, train_bpe

__all__ = ["LOOKUP_SCHEMA", "SampleIndex", "Tokenizer", "open_sample_index", "train_bpe"]

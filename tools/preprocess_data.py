"""Tokenize JSONL or text files into megatron-core indexed datasets, one per source.

Same as the ``inrun-preprocess`` command; see :mod:`inrun_megatron.data.indexed`::

    python tools/preprocess_data.py --input corpus.jsonl --output-dir data/mine --train-bpe 4096
"""

from inrun_megatron.data.indexed import main

if __name__ == "__main__":
    main()

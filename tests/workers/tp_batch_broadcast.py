"""Worker: the pretraining entry point's batch reader (``get_batch``) at tensor parallelism 2.

Only tensor-parallel rank 0 reads data; a batch with megatron's reset attention mask and one
without are read there, and every rank saves what it got to ``<out_dir>/rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from inrun_megatron import cpu_shims

cpu_shims.install()

from megatron.core import parallel_state  # noqa: E402

from inrun_megatron.pretrain.train import get_batch  # noqa: E402


class FirstStage(torch.nn.Module):
    """What ``get_batch`` asks of a model chunk: whether it holds the embedding (so it needs data)."""

    pre_process, post_process = True, False


def batches() -> list[dict[str, torch.Tensor]]:
    """Two microbatches of 2 sequences of 6 tokens, the first with a mask that cuts after position 2."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    tokens = torch.tensor([[5, 6, 0, 7, 8, 9], [1, 2, 3, 4, 0, 3]])
    plain = {
        "tokens": tokens,
        "labels": tokens.roll(-1, 1),
        "loss_mask": torch.ones(2, 6),
        "position_ids": torch.arange(6).expand(2, 6).contiguous(),
    }
    masks, positions = zip(*(_get_ltor_masks_and_position_ids(row, 0, True, True, False, True)[::2] for row in tokens))
    return [{**plain, "attention_mask": torch.stack(masks), "position_ids": torch.stack(positions)}, plain]


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(2)
    rank0 = parallel_state.get_tensor_model_parallel_rank() == 0
    with cpu_shims.CudaToCpuMode():  # as inside megatron's schedules, which call the forward step
        got = [get_batch(iter([batch]) if rank0 else None, FirstStage()) for batch in batches()]
    torch.save({"sent": batches(), "got": got}, out_dir / f"rank{dist.get_rank()}.pt")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

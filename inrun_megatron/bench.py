"""``inrun-bench``: plain vs scored training steps of a megatron-core GPT, side by side.

Both kinds of step run in the same process on the same model, alternating (plain, scored,
plain, ...), so slow drifts of the machine affect both alike. Reported per kind: median step
time, FLOPs counted by ``torch.utils.flop_counter`` for one step, and peak memory above the
pre-step level (CUDA allocator peak on a GPU; sampled RSS on the CPU). The last line is
``overhead_ratio=<scored / plain median step time>``.

The validation set is at most 1/8 of a step's training tokens by default; the ratio is printed.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from inrun_megatron.config import PROJECTION_DTYPES
from inrun_megatron.distributed import free_port


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakMemory:
    """Peak memory of a block above its starting level (GPU allocator or sampled process RSS)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = self._max = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _rss_bytes()) - self._start


def _init_single_process() -> torch.device:
    cuda = torch.cuda.is_available()
    if not cuda:
        from inrun_megatron import cpu_shims

        cpu_shims.install()
    from megatron.core import parallel_state

    if not dist.is_initialized():  # a free loopback port: several benchmarks may run at once
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    from megatron.core import tensor_parallel

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="inrun-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--val-fraction", type=float, default=1 / 8, help="validation tokens / training tokens per step")
    p.add_argument("--steps", type=int, default=6, help="timed steps of each kind")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument(
        "--projection-dtype",
        choices=PROJECTION_DTYPES,
        default=None,
        help="dtype of the score GEMMs (ScoringConfig.projection_dtype); default: the library's choice",
    )
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from inrun_megatron.megatron import quiet_library_warnings

    quiet_library_warnings()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = _init_single_process()

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from inrun_megatron.config import ScoringConfig, projection_dtype
    from inrun_megatron.megatron import MegatronScorer
    from inrun_megatron.megatron.model import GPTShape, build_gpt, gpt_forward_step, make_batch

    shape = GPTShape(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        vocab_size=args.vocab,
        seq_length=args.seq,
        recompute=args.recompute,
        params_dtype=getattr(torch, args.dtype),
        extra_config={"bf16": True} if args.dtype == "bfloat16" else {},
    )
    model = build_gpt(shape)
    if args.dtype == "bfloat16":  # megatron's mixed precision: bf16 compute inside Float16Module
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    mbs, n_micro = args.micro_batch_size, args.microbatches
    train_tokens = mbs * n_micro * args.seq
    n_val = max(1, int(train_tokens * args.val_fraction) // args.seq)
    g = torch.Generator().manual_seed(0)

    def batches(n: int, size: int, first: int) -> list[dict]:
        out = []
        for i in range(n):
            tokens = torch.randint(0, args.vocab, (size, args.seq + 1), generator=g)
            ids = torch.arange(first + i * size, first + (i + 1) * size)
            out.append({k: v.to(device) for k, v in make_batch(tokens, ids).items()})
        return out

    val_mbs = math.gcd(n_val, mbs)  # validation in micro-batches as large as training's where they fit
    validation = batches(n_val // val_mbs, val_mbs, 10**9)
    data = batches(n_micro, mbs, 0)
    fb = get_forward_backward_func()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    scorer = MegatronScorer(model, validation, ScoringConfig(projection_dtype=projection_dtype(args.projection_dtype)))
    kwargs = dict(
        forward_step_func=gpt_forward_step,
        model=model,
        num_microbatches=n_micro,
        seq_length=args.seq,
        micro_batch_size=mbs,
    )

    def plain_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        fb(data_iterator=iter(data), **kwargs)
        optimizer.step()

    def scored_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        scorer.forward_backward(fb, data_iterator=iter(data), **kwargs)
        optimizer.step()
        scorer.end_step(lr=1e-4)

    def timed(step: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        plain_step()
        scored_step()
    times: dict[str, list[float]] = {"plain": [], "scored": []}
    for _ in range(args.steps):
        times["plain"].append(timed(plain_step))
        times["scored"].append(timed(scored_step))
    flops, memory = {}, {}
    for name, step in (("plain", plain_step), ("scored", scored_step)):
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        flops[name] = counter.get_total_flops()
        with _PeakMemory(device) as peak:
            step()
        memory[name] = peak.peak
    g_bytes = sum(scorer.grads[p].numel() * scorer.grads[p].element_size() for p in scorer.grads.params())
    scorer.detach()

    median = {k: statistics.median(v) for k, v in times.items()}
    ratio = median["scored"] / median["plain"]
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq {args.seq}, vocab {args.vocab},"
        f" {params / 1e6:.1f}M parameters, {args.dtype}, recompute={'on' if args.recompute else 'off'},"
        f" projection dtype {args.projection_dtype or 'default'}, {device}"
    )
    print(
        f"step: {n_micro} microbatches x {mbs} sequences = {train_tokens} training tokens;"
        f" validation {n_val} x {args.seq} = {n_val * args.seq} tokens"
        f" (validation/training tokens = {n_val * args.seq / train_tokens:.3f}); {args.steps} timed steps each"
    )
    print(f"{'':8}{'step time (s)':>15}{'min (s)':>10}{'GFLOP':>10}{'peak mem (MiB)':>16}")
    for name in ("plain", "scored"):
        print(
            f"{name:8}{median[name]:>15.3f}{min(times[name]):>10.3f}{flops[name] / 1e9:>10.2f}"
            f"{memory[name] / 2**20:>16.1f}"
        )
    print(f"validation-gradient store (persistent, not in the peaks above): {g_bytes / 2**20:.1f} MiB")
    print(f"flop_ratio={flops['scored'] / flops['plain']:.3f}")
    print(f"overhead_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()

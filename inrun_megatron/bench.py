"""``inrun-bench``: plain vs scored training steps of a megatron-core GPT, side by side.

Both kinds of step run in the same process on the same model, alternating (plain, scored,
plain, ...), so slow drifts of the machine affect both alike. Reported per kind: median step
time, FLOPs counted by ``torch.utils.flop_counter`` for one step, and peak memory above the
pre-step level (CUDA allocator peak on a GPU; sampled RSS on the CPU). The scored step is broken
down into the validation pass, the scoring inside the training pass (scored minus plain training
pass) and the bookkeeping, each as a share of the plain step, next to the memory of ``G``. The last
line is ``overhead_ratio=<scored / plain median step time>``.

The validation set is 1/8 of a step's training tokens by default, shared by ``--targets`` targets;
the ratio is printed.
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

from inrun_megatron.config import PROJECTION_DTYPES, SCORING_PATHS, ScoringConfig, projection_dtype
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


#: The clocks a benchmark can read (``--clock``).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def validation_layout(train_tokens: int, seq: int, fraction: float, targets: int) -> tuple[int, int]:
    """``(sequences per target, their length)``: a budget of ``fraction`` of a step's training tokens,
    dealt into equal shares, one per target.

    The targets share the budget, so ``--targets`` changes how many validation gradients are
    computed and scored, not how many validation tokens run. A share of at least one training
    sequence is whole training-length sequences; a smaller one is a single shorter sequence.
    """
    share = int(train_tokens * fraction) // targets
    if share < 1:
        raise ValueError(
            f"a validation budget of {fraction} x {train_tokens} training tokens has less than one token for each"
            f" of {targets} targets; raise --val-fraction or lower --targets"
        )
    return (share // seq, seq) if share >= seq else (1, share)


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
    p.add_argument(
        "--targets",
        type=int,
        default=1,
        help="validation targets (K). They share the --val-fraction budget: its tokens are dealt into K equal"
        " sets (shorter sequences where a share is below one sequence), so K changes how many validation"
        " gradients are computed and scored, not how many validation tokens run",
    )
    p.add_argument(
        "--path",
        choices=SCORING_PATHS,
        default="auto",
        help="scoring path (ScoringConfig.path): auto is the microbatch-gradient path at --micro-batch-size 1,"
        " the per-layer rules otherwise",
    )
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
    p.add_argument(
        "--optimizer",
        choices=["sgd", "adam"],
        default="sgd",
        help="the optimizer of both kinds of step; with adam the scored step also scores the Adam-aware value"
        " (docs/DESIGN.md §1.5) unless --sgd-value-only",
    )
    p.add_argument(
        "--sgd-value-only",
        action="store_true",
        help="with --optimizer adam, score the SGD value only (ScoringConfig(optimizer_values=False))",
    )
    p.add_argument(
        "--second-order",
        action="store_true",
        help="also record second-order values (ScoringConfig(second_order=True), docs/DESIGN.md §1.7): the scored"
        " step runs the curvature pass, timed as its own part",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="what a time is: wall-clock seconds, or the CPU seconds of this process (every thread), which on a"
        " CPU shared with other work count this benchmark's own work (use with --threads 1)",
    )
    args = p.parse_args(argv)
    for name in ("micro_batch_size", "microbatches", "targets", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.path == "microbatch" and args.micro_batch_size != 1:
        p.error(
            "--path microbatch scores whole microbatches, so it needs --micro-batch-size 1,"
            f" not {args.micro_batch_size}"
        )
    if args.sgd_value_only and args.optimizer != "adam":
        p.error("--sgd-value-only chooses between the values of an Adam run: it needs --optimizer adam")
    if args.second_order and args.dtype != "float32":
        p.error("--second-order needs fp32 weights (the curvature pass refuses half precision, docs/DESIGN.md §1.7)")
    if args.clock == "cpu" and torch.cuda.is_available():
        p.error("--clock cpu counts CPU work only, not the GPU's; time GPU runs with the wall clock")
    try:
        validation_layout(
            args.micro_batch_size * args.microbatches * args.seq, args.seq, args.val_fraction, args.targets
        )
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> None:
    from inrun_megatron.megatron import quiet_library_warnings

    quiet_library_warnings()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = _init_single_process()

    from megatron.core.pipeline_parallel import get_forward_backward_func

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
    n_val, val_seq = validation_layout(train_tokens, args.seq, args.val_fraction, args.targets)
    val_tokens = args.targets * n_val * val_seq
    g = torch.Generator().manual_seed(0)

    def batches(n: int, size: int, seq: int, first: int) -> list[dict]:
        out = []
        for i in range(n):
            tokens = torch.randint(0, args.vocab, (size, seq + 1), generator=g)
            ids = torch.arange(first + i * size, first + (i + 1) * size)
            out.append({k: v.to(device) for k, v in make_batch(tokens, ids).items()})
        return out

    val_mbs = math.gcd(n_val, mbs)  # validation in micro-batches as large as training's where they fit
    validation = {
        f"target{k}": batches(n_val // val_mbs, val_mbs, val_seq, 10**9 + k * n_val) for k in range(args.targets)
    }
    data = batches(n_micro, mbs, args.seq, 0)
    fb = get_forward_backward_func()
    if args.optimizer == "adam":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    scoring = ScoringConfig(
        projection_dtype=projection_dtype(args.projection_dtype),
        path=args.path,
        optimizer_values=not args.sgd_value_only,
        second_order=args.second_order,
    )
    scorer = MegatronScorer(model, validation, scoring, optimizer=optimizer)
    path = scorer.path_for(mbs)
    kwargs = dict(
        forward_step_func=gpt_forward_step,
        model=model,
        num_microbatches=n_micro,
        seq_length=args.seq,
        micro_batch_size=mbs,
    )

    clock = CLOCKS[args.clock]

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return clock()

    # Seconds of each part, per timed step: the plain training pass (forward_backward_func alone),
    # and the scored step's passes as the scorer timed them, plus its end_step.
    parts: dict[str, list[float]] = {
        "plain training": [],
        "validation": [],
        "scored training": [],
        "curvature": [],
        "bookkeeping": [],
    }
    recording = False

    def plain_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        start = now()
        fb(data_iterator=iter(data), **kwargs)
        if recording:
            parts["plain training"].append(now() - start)
        optimizer.step()

    def scored_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        scorer.forward_backward(fb, data_iterator=iter(data), **kwargs)
        optimizer.step()
        start = now()
        t = scorer.end_step(lr=1e-4).timings
        if recording:
            parts["validation"].append(t.validation)
            parts["scored training"].append(t.training)
            parts["curvature"].append(t.curvature)
            parts["bookkeeping"].append(t.bookkeeping + now() - start)

    def timed(step: Callable[[], None]) -> float:
        start = now()
        step()
        return now() - start

    scorer.pass_clock = clock
    for _ in range(args.warmup):
        plain_step()
        scored_step()
    times: dict[str, list[float]] = {"plain": [], "scored": []}
    recording = True
    for _ in range(args.steps):
        times["plain"].append(timed(plain_step))
        times["scored"].append(timed(scored_step))
    recording = False
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
    part = {k: statistics.median(v) for k, v in parts.items()}
    breakdown = {
        "validation pass": part["validation"],
        "scoring inside the training pass": part["scored training"] - part["plain training"],
        **({"curvature pass": part["curvature"]} if args.second_order else {}),
        "bookkeeping": part["bookkeeping"],
    }
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq {args.seq}, vocab {args.vocab},"
        f" {params / 1e6:.1f}M parameters, {args.dtype}, recompute={'on' if args.recompute else 'off'},"
        f" projection dtype {args.projection_dtype or 'default'}, {device}; optimizer {args.optimizer},"
        f" values scored: {' and '.join(scorer.value_kinds)}"
    )
    print(
        f"step: {n_micro} microbatches x {mbs} sequences = {train_tokens} training tokens, scoring path {path};"
        f" validation {args.targets} target(s) x {n_val} x {val_seq} = {val_tokens} tokens"
        f" (validation/training tokens = {val_tokens / train_tokens:.3f}); {args.steps} timed steps each,"
        f" {args.clock} clock"
    )
    print(f"{'':8}{'step time (s)':>15}{'min (s)':>10}{'GFLOP':>10}{'peak mem (MiB)':>16}")
    for name in ("plain", "scored"):
        print(
            f"{name:8}{median[name]:>15.3f}{min(times[name]):>10.3f}{flops[name] / 1e9:>10.2f}"
            f"{memory[name] / 2**20:>16.1f}"
        )
    notes = {
        "scoring inside the training pass": f"scored training pass {part['scored training']:.3f} s"
        f" - plain training pass {part['plain training']:.3f} s",
        "curvature pass": "H_val g_t by two validation passes, the training microbatches once more",
        "bookkeeping": "score reductions, sample-id checks, end_step",
    }
    print(f"{'scored step by part':34}{'median (s)':>11}{'share of plain step':>21}")
    for name, seconds in breakdown.items():
        print(f"  {name:32}{seconds:>11.3f}{seconds / median['plain']:>21.3f}   {notes.get(name, '')}".rstrip())
    print(
        f"validation-gradient store G (persistent, not in the peaks above): {g_bytes / 2**20:.1f} MiB"
        f" ({g_bytes:,} bytes)"
    )
    print(f"flop_ratio={flops['scored'] / flops['plain']:.3f}")
    print(f"overhead_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()

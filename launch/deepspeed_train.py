"""Train a language model with DeepSpeed and record In-Run Data Shapley scores of every sequence.

Runs under every launcher (see the README for exact command lines)::

    deepspeed --num_gpus 2 launch/deepspeed_train.py --deepspeed_config configs/deepspeed/zero2.json --out RUN
    torchrun --standalone --nproc_per_node 2 launch/deepspeed_train.py --deepspeed_config ... --out RUN
    mpirun -np 2 python launch/deepspeed_train.py --deepspeed_config ... --out RUN

The model is the plain-PyTorch Llama- or GPT-style LM of :mod:`inrun_megatron.deepspeed.model`
(``--model llama|gpt``), a megatron-core GPT (``--model megatron-gpt``) whose layers are tensor
parallel inside the DeepSpeed engine (``--tensor-model-parallel-size N``), or an unmodified Hugging
Face ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` with random weights (``--model hf-llama|hf-gpt2``),
scored by the built-in Hugging Face rules or, at micro-batch size 1, the microbatch-gradient path.
``--scoring-path auto|rules|microbatch`` forces a scoring path (``auto``: the microbatch-gradient
path at micro-batch size 1, the per-layer rules above).

The data is synthetic: sequence ``i`` is drawn from a generator seeded by ``(seed, i)``, so any
layout trains on exactly the same sequences. Step ``t`` trains on sample ids ``[t*N, (t+1)*N)``
(``N`` = micro-batch size x accumulation steps x DP size); DP rank ``r`` takes micro-batches
``r, r + DP, ...`` of them. Scores go to ``--out`` in the record format of
:mod:`inrun_megatron.records`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from inrun_megatron import ScoringConfig
from inrun_megatron.config import SCORING_PATHS
from inrun_megatron.distributed import init_distributed
from inrun_megatron.megatron import quiet_library_warnings
from inrun_megatron.records import Manifest, RunLayout, ScoreWriter, library_versions, write_manifest
from inrun_megatron.validation import make_batch

VALIDATION_FIRST_ID = 10**9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON config (configs/deepspeed/*.json)")
    p.add_argument("--out", required=True, type=Path, help="run directory for the score records")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--model", choices=("llama", "gpt", "megatron-gpt", "hf-llama", "hf-gpt2"), default="llama")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=128)
    p.add_argument("--seq-length", type=int, default=32)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="with --model megatron-gpt")
    p.add_argument("--validation-sequences", type=int, default=8)
    p.add_argument("--validation-split", choices=("replicate", "split"), default="replicate")
    p.add_argument(
        "--scoring-path",
        choices=SCORING_PATHS,
        default="auto",
        help="microbatch: each micro-step's parameter gradient (micro-batch size 1, any model); rules: per-layer"
        " rules (any micro-batch size, supported layers only); auto: microbatch at micro-batch size 1, else rules",
    )
    p.add_argument(
        "--micro-batch-size", type=int, default=None, help="overrides the config's train_micro_batch_size_per_gpu"
    )
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher (unused)")
    args = p.parse_args(argv)
    if args.tensor_model_parallel_size > 1 and args.model != "megatron-gpt":
        p.error("--tensor-model-parallel-size > 1 needs --model megatron-gpt (megatron-core tensor-parallel layers)")
    return args


def sequences(ids: list[int], seq_length: int, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """A batch of the synthetic sequences with the given sample ids."""
    tokens = torch.stack(
        [
            torch.randint(0, vocab_size, (seq_length + 1,), generator=torch.Generator().manual_seed(seed * 7919 + i))
            for i in ids
        ]
    )
    return make_batch(tokens, torch.tensor(ids))


def micro_batches(step: int, *, mbs: int, gas: int, dp_rank: int, dp_size: int, args) -> list[dict]:
    """This DP rank's micro-batches of optimizer step ``step``."""
    first = step * mbs * gas * dp_size
    starts = [first + (m * dp_size + dp_rank) * mbs for m in range(gas)]
    return [sequences(list(range(s, s + mbs)), args.seq_length, args.vocab_size, args.seed) for s in starts]


def validation_batches(args, mbs: int) -> list[dict]:
    ids = list(range(VALIDATION_FIRST_ID, VALIDATION_FIRST_ID + args.validation_sequences))
    return [sequences(ids[i : i + mbs], args.seq_length, args.vocab_size, args.seed) for i in range(0, len(ids), mbs)]


def build_model(args, ds_config: dict):
    """The model, its per-token losses and the mpu DeepSpeed needs (None without megatron).

    Under ZeRO-3 the plain-PyTorch model is built as large models must be, partitioned from the
    start (``deepspeed.zero.Init``), and initialised through gathered parameters; the (tiny) Hugging
    Face models are built whole and partitioned by ``deepspeed.initialize``.
    """
    size = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        vocab_size=args.vocab_size,
        seq_length=args.seq_length,
    )
    import deepspeed

    torch.manual_seed(args.seed)
    if args.model.startswith("hf-"):
        from inrun_megatron.deepspeed.model import hf_causal_lm_token_losses

        return _hugging_face_model(args), hf_causal_lm_token_losses, None
    if args.model != "megatron-gpt":
        from inrun_megatron.deepspeed.model import TransformerLM, llama_shape, lm_token_losses

        gpt2 = dict(
            normalization="LayerNorm", swiglu=False, add_bias_linear=True, position_embedding_type="learned_absolute"
        )
        shape = llama_shape(**size, **(gpt2 if args.model == "gpt" else {}))
        zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
        with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero3):
            model = TransformerLM(shape)
        if zero3:
            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
                model.init_weights()
        return model, lm_token_losses, None
    if not torch.cuda.is_available():  # before megatron-core is first imported
        from inrun_megatron import cpu_shims

        cpu_shims.install()
    from megatron.core import parallel_state, tensor_parallel

    from inrun_megatron.deepspeed import MegatronMPU
    from inrun_megatron.megatron.model import GPTShape, build_gpt

    parallel_state.initialize_model_parallel(args.tensor_model_parallel_size, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    # GPT-2 style; on the CPU megatron draws each weight whole, so every TP size trains the same model.
    model = build_gpt(GPTShape(**size, share_embeddings_and_output_weights=True))

    def gpt_token_losses(model, batch):
        return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    return model, gpt_token_losses, MegatronMPU()


def _hugging_face_model(args) -> torch.nn.Module:
    """A freshly initialised, unmodified Hugging Face causal LM of the requested size."""
    import transformers

    if args.model == "hf-llama":
        config = transformers.LlamaConfig(
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            intermediate_size=4 * args.hidden_size,
            num_hidden_layers=args.num_layers,
            num_attention_heads=args.num_attention_heads,
            max_position_embeddings=args.seq_length,
        )
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(
        vocab_size=args.vocab_size,
        n_embd=args.hidden_size,
        n_layer=args.num_layers,
        n_head=args.num_attention_heads,
        n_positions=args.seq_length,
    )
    return transformers.GPT2LMHeadModel(config)


def main(argv: list[str] | None = None) -> None:
    quiet_library_warnings()  # megatron-core (--model megatron-gpt) warns on import about missing GPU kernels
    args = parse_args(argv)
    launcher = init_distributed()
    if not torch.cuda.is_available():  # fp16 on any CPU; gloo does the collectives (no shm-op build)
        from inrun_megatron import cpu_shims

        cpu_shims.install_deepspeed()
    import deepspeed

    from inrun_megatron.deepspeed import DeepSpeedScorer

    ds_config = json.loads(Path(args.deepspeed_config).read_text())
    if args.micro_batch_size is not None:
        ds_config["train_micro_batch_size_per_gpu"] = args.micro_batch_size
        ds_config.pop("train_batch_size", None)  # DeepSpeed derives it from the micro-batch size
    model, token_losses, mpu = build_model(args, ds_config)
    optimizer_class = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.SGD
    optimizer = optimizer_class(model.parameters(), lr=args.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
    mbs, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    scoring = ScoringConfig(validation_split=args.validation_split, path=args.scoring_path)
    scorer = DeepSpeedScorer(engine, validation_batches(args, mbs), token_losses, scoring)
    dp_rank, dp_size = scorer.dp_rank, scorer.dp_size
    first_of_replica = mpu is None or mpu.get_model_parallel_rank() == 0
    if dist.get_rank() == 0:
        manifest = Manifest(
            entry_point="launch/deepspeed_train.py",
            config={"args": {k: str(v) for k, v in vars(args).items()}, "deepspeed": ds_config},
            layout=RunLayout(
                world_size=dist.get_world_size(),
                data_parallel=dp_size,
                tensor_parallel=args.tensor_model_parallel_size,
                zero_stage=scorer.zero_stage,
                micro_batch_size=mbs,
                num_microbatches=gas,
                global_batch_size=mbs * gas * dp_size,
            ),
            targets=[t.describe() for t in scorer.targets],
            values=scorer.values_manifest,
            scoring=scoring.to_dict(),
            scoring_path=scorer.path,
            versions=library_versions(deepspeed=deepspeed.__version__),
            launcher=launcher,
        )
        write_manifest(args.out, manifest)
    dist.barrier()
    writer = ScoreWriter(args.out, dp_rank=dp_rank) if first_of_replica else None
    scorer.sink = writer  # end_step writes each step's rows (one rank per data-parallel replica)
    for step in range(args.steps):
        losses = scorer.forward_backward(
            micro_batches(step, mbs=mbs, gas=gas, dp_rank=dp_rank, dp_size=dp_size, args=args)
        )
        engine.step()
        result = scorer.end_step()
        if dist.get_rank() == 0:
            print(
                f"step {result.step}: loss {sum(losses) / len(losses):.4f} validation"
                f" {dict(result.validation_losses)} lr {result.lr:.3g} clip {result.clip_coef:.3f}"
                f" skipped {result.skipped}",
                flush=True,
            )
    if writer is not None:
        writer.close()
    scorer.detach()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

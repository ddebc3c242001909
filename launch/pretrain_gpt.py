"""megatron-core GPT pretraining with In-Run Data Shapley scoring, configured by a YAML run config.

    torchrun --nproc_per_node 8 launch/pretrain_gpt.py --config configs/gpt-125m.yaml
    deepspeed --num_gpus 8 launch/pretrain_gpt.py --config configs/gpt-125m.yaml
    srun python launch/pretrain_gpt.py --config configs/gpt-7b.yaml     (see launch/slurm_pretrain.sbatch)

Extra ``key=value`` arguments override the config; ``--check --world-size N`` only checks it.
Run the same command again to resume from the last checkpoint. See inrun_megatron/pretrain/train.py.
"""

from inrun_megatron.megatron import quiet_library_warnings

quiet_library_warnings()  # before megatron-core is imported; also in the checkpoint writer's helper processes

from inrun_megatron.pretrain.train import main  # noqa: E402

if __name__ == "__main__":  # megatron's checkpoint writer starts helper processes that re-import this file
    main()

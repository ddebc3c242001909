"""The pretraining entry point's library: run configs, process setup, checkpoints, progress, the loop.

``launch/pretrain_gpt.py`` calls :func:`inrun_megatron.pretrain.train.main`.
"""

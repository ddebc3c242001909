"""inrun_megatron: In-Run Data Shapley inside Megatron-Core and DeepSpeed pretraining runs."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="inrun_megatron",
    version="0.1.0",
    description="Exact per-sample In-Run Data Shapley inside Megatron-Core and DeepSpeed pretraining",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["inrun_megatron", "inrun_megatron.*"]),
    install_requires=["torch>=2.4", "numpy", "packaging", "pyyaml", "pyarrow"],
    extras_require={
        "megatron": ["megatron-core>=0.16,<0.20"],
        "deepspeed": ["deepspeed>=0.19"],
        "mpi": ["mpi4py>=4", "openmpi>=5"],
        "dev": ["pytest", "ruff"],
        "pretrain": ["tokenizers"],
        "hf": ["transformers", "accelerate>=1.1"],  # accelerate: the Trainer (inrun_megatron.hf_trainer)
        "tensorboard": ["tensorboard"],
        "analysis": ["rich", "matplotlib", "scipy"],
    },
    entry_points={
        "console_scripts": [
            "inrun-bench=inrun_megatron.bench:main",
            "inrun-fidelity=inrun_megatron.fidelity:main",
            "inrun-preprocess=inrun_megatron.data.indexed:main",
            "inrun-scores=inrun_megatron.analysis.cli:main",
        ]
    },
)

"""megatron_edit: Local SGD (DiLoCo, EDiT, A-EDiT, Streaming DiLoCo) for NVIDIA megatron-core.

Install on a CPU-only machine with torch pinned first (plain ``torch`` pulls a multi-GB CUDA build):
    pip install torch==2.13.0 && pip install -e .[test]
"""
from setuptools import find_packages, setup

setup(
    name="megatron_edit",
    version="0.1.0",
    description="Local SGD (DiLoCo / EDiT / A-EDiT / Streaming DiLoCo) plugin for megatron-core",
    packages=find_packages(include=["megatron_edit", "megatron_edit.*"]),
    python_requires=">=3.10",
    install_requires=[
        # The CPU compatibility layer and the adapter are checked against these versions
        # (megatron_edit/mcore_adapter.py: SUPPORTED_MCORE).
        "megatron-core>=0.16.1,<0.20",
        "torch>=2.6",
        "numpy",
        "sentencepiece",
        "einops",  # needed by megatron-core's parallel_state for partial distributed optimizer groups
        "psutil",  # needed by megatron-core's dist_checkpointing, not declared by it
    ],
    extras_require={
        # tests also export to Hugging Face and load it back with transformers (logits check)
        "test": ["pytest", "tensorboard", "matplotlib", "transformers>=4.46", "safetensors", "torchft==0.2.0"],
        # --local-sgd-fault-tolerance (megatron_edit/fault_tolerance.py)
        "elastic": ["torchft==0.2.0"],
        "hf": ["transformers>=4.46", "safetensors"],  # tools/convert_checkpoint.py --to hf
        "te": ["transformer-engine[pytorch]"],
        # Megatron-LM's megatron/training imports these, and it compiles its dataset helpers with pybind11
        # at start-up (it is not on PyPI: clone it; README)
        "megatron-lm": ["six", "regex", "pyyaml", "pydantic", "triton", "pybind11"],
    },
)

"""Packaging for sapo_megatron: a SAPO / routing-replay plugin for upstream Megatron-Core."""
import ast
from pathlib import Path

from setuptools import find_packages, setup


def megatron_core_range() -> str:
    """``SUPPORTED`` from sapo_megatron/mcore/version.py, the one declaration of the range
    (read as text: installing must not import the package)."""
    tree = ast.parse((Path(__file__).parent / "sapo_megatron" / "mcore" / "version.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SUPPORTED" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("sapo_megatron/mcore/version.py declares no SUPPORTED range")


setup(
    name="sapo_megatron",
    version="0.1.0",
    description="Soft Adaptive Policy Optimization and MoE routing replay for Megatron-Core RL training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sapo_megatron", "sapo_megatron.*", "sapo_sglang"]),
    # The delta codec's C kernels, compiled on first use (sapo_sglang/kernels.py).
    package_data={"sapo_sglang": ["kernels.c"]},
    install_requires=[
        # 2.13.0 is the CPU build on the CI machines; GPU clusters bring their own torch.
        "torch>=2.6",
        # The supported range, declared once in sapo_megatron/mcore/version.py.
        "megatron-core" + megatron_core_range(),
        "pyyaml>=6",
        # Structured configs (sapo_megatron.config); 2.4 reads Literal, X | None and list[int].
        "omegaconf>=2.4",
        # megatron.core.dist_checkpointing's filesystem writer imports it without declaring it.
        "psutil>=5.9",
        # ~10x faster base64 than the standard library: decoding SGLang routed_experts payloads.
        "pybase64>=1.3",
        # Checkpoint conversion reads and writes HF safetensors shards (sapo_megatron.checkpoint).
        "safetensors>=0.4",
        # Progress bars for conversion and the trainer's step phases (terminal only).
        "tqdm>=4.60",
    ],
    extras_require={
        # transformers: HF parity and tokenizer tests; pyarrow: Parquet prompt sets;
        # matplotlib: `sapo-megatron plot`; math-verify: the default math verifier, so CI
        # tests it beside the regex fallback. None of them is needed by the core package.
        "test": ["pytest>=8", "transformers>=4.51", "safetensors", "pyarrow", "matplotlib", "math-verify>=0.9"],
        "plot": ["matplotlib"],
        # HF Math-Verify: the `math` task's default verifier (sapo_megatron.tasks.math_grading).
        "math": ["math-verify>=0.9"],
        "gpu": ["transformer-engine[pytorch]", "apex"],
    },
    entry_points={"console_scripts": ["sapo-megatron=sapo_megatron.cli:main"]},
)

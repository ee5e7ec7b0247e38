"""Shared fixtures. Megatron-Core needs the CPU layer and a (single-process) process group."""

from __future__ import annotations

import warnings

import pytest

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


@pytest.fixture(scope="session")
def single_rank_parallel():
    """A world of one with Megatron's model-parallel groups (TP=PP=EP=1)."""
    from sapo_megatron.models import ParallelConfig
    from sapo_megatron.parallel import initialize_model_parallel

    initialize_model_parallel(ParallelConfig(), seed=1234)
    yield


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need a CUDA device: skip them, with the reason, where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

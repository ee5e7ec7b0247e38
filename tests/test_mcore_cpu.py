"""The CPU compatibility layer: what it patches, that it is explicit, idempotent and reversible."""

from __future__ import annotations

import pytest
import torch

from sapo_megatron.mcore import activate_cpu_compat, cpu_compat_active, deactivate_cpu_compat


@pytest.fixture
def fresh_layer():
    """Run a test from the inactive state and leave the layer active afterwards (as the suite expects)."""
    was_active = cpu_compat_active()
    deactivate_cpu_compat()
    yield
    deactivate_cpu_compat()
    if was_active:
        activate_cpu_compat()


def test_inactive_until_activated(fresh_layer):
    assert not cpu_compat_active()
    with pytest.raises((RuntimeError, AssertionError, AttributeError)):
        torch.zeros(1, device="cuda")


def test_cuda_device_arguments_land_on_cpu(fresh_layer):
    assert activate_cpu_compat() is True
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(1, device=0).device.type == "cpu"
    t = torch.arange(3.0)
    assert t.cuda() is t
    assert t.to(torch.cuda.current_device()).device.type == "cpu"
    assert t.to("cuda", dtype=torch.float64).dtype == torch.float64
    assert torch.tensor([1.0], device="cuda", pin_memory=True).device.type == "cpu"
    # Megatron's clip_grads asserts on the CUDA type name.
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    # A type conversion still converts.
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64
    torch.cuda.synchronize()  # a no-op instead of an error


def test_idempotent_and_reversible(fresh_layer):
    original = torch.cuda.current_device
    activate_cpu_compat()
    activate_cpu_compat()
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import moe_utils

    assert hasattr(moe_utils, "te_general_gemm")
    with tp_random.get_cuda_rng_tracker().fork():
        pass
    deactivate_cpu_compat()
    assert not cpu_compat_active()
    assert torch.cuda.current_device is original
    with pytest.raises((RuntimeError, AssertionError, AttributeError)):
        torch.zeros(1, device="cuda")


def test_rng_seed_is_reproducible(fresh_layer):
    activate_cpu_compat()
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(5)
    a = torch.rand(3)
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    assert torch.equal(a, torch.rand(3))


def test_no_op_when_cuda_is_available(fresh_layer, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert activate_cpu_compat() is False
    assert not cpu_compat_active()

"""Run upstream Megatron-Core on CPU with the gloo backend.

Megatron-Core assumes CUDA in a handful of places that have nothing to do with the maths
(FIELD-NOTES section 1): it asks ``torch.cuda.current_device()`` for an allocation device,
writes ``device="cuda"`` literally in factory calls and ``.cuda()`` on tensors, forks the CUDA
RNG tracker for tensor-parallel dropout, synchronises streams, and names a Transformer-Engine
GEMM that only exists when TE is installed. None of it changes numerics, so we neutralise
those points instead of forking the library:

* ``torch.cuda.current_device`` returns ``torch.device("cpu")``, ``torch.cuda.synchronize``
  does nothing and ``torch.cuda.current_stream`` returns a stream whose waits do nothing;
* a ``TorchFunctionMode`` rewrites any CUDA device argument of a factory call, ``Tensor.to``
  or ``Tensor.cuda`` to CPU (one rule covers every literal ``device="cuda"``), and makes
  ``Tensor.type()`` report CUDA type names, which Megatron's gradient clipping asserts on;
* the CUDA RNG tracker's ``fork`` becomes a no-op context, its seeding function a plain
  ``torch.manual_seed`` and the CUDA RNG save/restore of activation recomputation a no-op
  (there is no CUDA RNG to split or restore);
* ``moe_utils.te_general_gemm`` is defined as ``None`` when Transformer Engine is absent.

Activation is explicit (:func:`activate_cpu_compat`, called by the CPU launcher and the test
fixtures), idempotent, and a no-op when CUDA is available. Every patch is recorded so that
:func:`deactivate_cpu_compat` restores the originals.

Usage::

    from sapo_megatron.mcore import activate_cpu_compat
    activate_cpu_compat()   # before building Megatron-Core models on a CPU-only machine
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_LOCK = threading.Lock()
_PATCHES: list[tuple[Any, str, Any]] = []
_MODE: "_CudaToCpuMode | None" = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer means "cuda:<index>" to torch factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrite CUDA device arguments to CPU for every torch call made while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
        # pin_memory needs a CUDA host allocator.
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's optimizer asserts ``grad.type() == 'torch.cuda.FloatTensor'``; report
            # the CUDA name of the same dtype (the type-name query has no other effect).
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if args[0].device.type == "cpu" else name
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        return func(*args, **kwargs)


def _patch(owner: Any, name: str, value: Any) -> None:
    _PATCHES.append((owner, name, getattr(owner, name, _MISSING)))
    setattr(owner, name, value)


_MISSING = object()


class _NullStream:
    """Stands in for ``torch.cuda.current_stream()``: CPU work is already ordered."""

    def wait_event(self, _event) -> None:
        pass

    def wait_stream(self, _stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


@contextlib.contextmanager
def _no_op_fork(*_args, **_kwargs):
    yield


def _patch_rng_tracker() -> None:
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as tp_random

    tracker = tp_random.get_cuda_rng_tracker()
    _patch(type(tracker), "fork", lambda self, *a, **k: _no_op_fork())

    def manual_seed(seed: int, *_args, **_kwargs) -> None:
        # Keep Megatron's convention that TP ranks start from the same seed; on CPU there is
        # no separate model-parallel RNG stream to offset.
        torch.manual_seed(seed)

    _patch(tp_random, "model_parallel_cuda_manual_seed", manual_seed)
    _patch(tensor_parallel, "model_parallel_cuda_manual_seed", manual_seed)
    # Activation recomputation saves and restores the CUDA RNG state around the recomputed
    # forward; there is none on CPU (the CPU state is saved and restored by the same code).
    for name, value in (
        ("_get_cuda_rng_state", lambda *a, **k: torch.empty(0, dtype=torch.uint8)),
        ("_set_cuda_rng_state", lambda *a, **k: None),
    ):
        if hasattr(tp_random, name):
            _patch(tp_random, name, value)


def _patch_missing_te_symbols() -> None:
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        _patch(moe_utils, "te_general_gemm", None)


def activate_cpu_compat(force: bool = False) -> bool:
    """Install the CPU shims. Returns True if they are active after the call.

    ``force=True`` installs them even when CUDA is available (used only by tests that
    exercise the layer itself); normally a CUDA machine is left untouched.
    """
    global _MODE
    with _LOCK:
        if _MODE is not None:
            return True
        if torch.cuda.is_available() and not force:
            return False
        _patch(torch.cuda, "current_device", lambda: torch.device("cpu"))
        _patch(torch.cuda, "synchronize", lambda *a, **k: None)
        # megatron-core >= 0.17 asks for the current stream in DDP's grad sync.
        _patch(torch.cuda, "current_stream", lambda *a, **k: _NullStream())
        _patch_rng_tracker()
        _patch_missing_te_symbols()
        _MODE = _CudaToCpuMode()
        _MODE.__enter__()
        return True


def deactivate_cpu_compat() -> None:
    """Undo :func:`activate_cpu_compat` (restores every patched attribute)."""
    global _MODE
    with _LOCK:
        if _MODE is None:
            return
        _MODE.__exit__(None, None, None)
        _MODE = None
        while _PATCHES:
            owner, name, original = _PATCHES.pop()
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def cpu_compat_active() -> bool:
    return _MODE is not None

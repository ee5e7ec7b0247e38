"""A pure-torch stand-in for SGLang's kernel package, so the real SGLang server runs on a CPU.

Stands in for ``sgl_kernel`` as imported by **sglang 0.5.23** (the release CI runs). PyPI has no
CPU build of it (``sglang-kernel`` 0.4.10 and ``sgl-kernel`` 0.3.21 need ``libcuda.so.1`` to
import), yet SGLang's CPU path imports it. Put this directory FIRST on the server's
``PYTHONPATH`` (tests/real_sglang/harness.py does), never in our own environment.

What it stands in for, by source line of sglang 0.5.23:
- ``srt/mem_cache/allocation.py:46`` imports ``assign_req_to_token_pool_cpu`` and ``:745``
  calls it on every batch: implemented below, in torch, from the Triton kernel of the same file
  (``assign_req_to_token_pool``, ``:692``) which it replaces on CPU.
- ``--enable-return-routed-experts`` pins its host buffer of routes with
  ``torch.cuda.cudart().cudaHostRegister`` even when no GPU is present
  (``srt/.../state_capturer/base.py:67`` -> ``srt/mem_cache/pool_host/common.py:147,178``). With no
  CUDA device, ``torch.cuda.cudart`` is replaced at import time by a stub whose register and
  unregister succeed and do nothing: pinning means nothing without a device.

Every other name resolves to a function that RAISES when called, naming itself, so a code path
we do not stand in for fails loudly instead of computing something wrong. ``torch.ops.sgl_kernel``
stays empty, so SGLang takes its torch-native attention (``--attention-backend torch_native``),
MoE, RMSNorm and RoPE.
"""

from __future__ import annotations

import torch

__version__ = "0.0.0+sapo-cpu-standin"


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """For request ``i``: ``req_to_token[req_pool_indices[i], start[i]:end[i]]`` takes the next
    ``end[i] - start[i]`` entries of ``out_cache_loc`` (requests laid end to end, in order)."""
    del pool_len  # the row length; torch indexing knows it
    offset = 0
    for row, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        n = end - start
        req_to_token[row, start:end] = out_cache_loc[offset:offset + n].to(req_to_token.dtype)
        offset += n


class _NoDeviceCudart:
    """``torch.cuda.cudart()`` on a machine without CUDA: host registration is a no-op."""

    @staticmethod
    def cudaHostRegister(ptr, size, flags):  # noqa: N802 (CUDA's name)
        return 0

    @staticmethod
    def cudaHostUnregister(ptr):  # noqa: N802
        return 0

    @staticmethod
    def cudaGetErrorString(code):  # noqa: N802
        return f"cuda error {code} (sgl_kernel CPU stand-in)"


if not torch.cuda.is_available():
    torch.cuda.cudart = lambda: _NoDeviceCudart()


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not part of the CPU stand-in (tests/real_sglang/kernel_standin): "
            f"SGLang reached a kernel path the CPU tier does not cover")

    missing.__name__ = name
    return missing

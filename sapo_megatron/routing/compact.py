"""Compact storage of routes in the rollout batch: MoE layers only, the narrowest integer dtype.

A Qwen3-30B-A3B sample of 8k tokens is ~12.6 MB as SGLang's int32 (48 layers x top-8); kept
as uint8 it is 3.1 MB. Routes therefore live in the rollout batch as ``routes_RMK``
(``[rows, moe_layers, topk]``) in :func:`storage_dtype` and are widened to int64 only per
microbatch, right before they are handed to the routers (see ``align.layer_targets``).

Layer axis: SGLang reports every hidden layer; dense layers (DeepSeek-V3's first-k-dense, Qwen's
``mlp_only_layers``, ``moe_layer_freq`` patterns) hold zeros and have no router in Megatron-Core.
They are dropped here, so axis ``M`` counts MoE layers in global order: slot ``m`` is the
``m``-th MoE layer. The pattern is ``ModelConfig.moe_layer_pattern()`` (0/1 per layer), or
Megatron's integer ``moe_layer_freq`` (an MoE layer every N layers, from layer 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def storage_dtype(num_experts: int) -> torch.dtype:
    """uint8 up to 256 experts, int16 up to 32768, int32 beyond (uint8 overflows above 256)."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be positive, got {num_experts}")
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 32768:
        return torch.int16
    return torch.int32


def compact_routes(routes: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``routes`` in :func:`storage_dtype`, refusing ids that would not survive the narrowing."""
    dtype = storage_dtype(num_experts)
    if routes.dtype == dtype:
        return routes
    if routes.numel():
        lo, hi = (int(v) for v in torch.aminmax(routes))
        if lo < 0 or hi >= num_experts:
            raise ValueError(
                f"expert ids in [{lo}, {hi}] are outside [0, num_experts {num_experts}); "
                f"refusing to store them as {dtype}"
            )
    return routes.to(dtype)


def moe_layer_pattern(pattern: Sequence[int] | int, num_layers: int | None = None) -> list[int]:
    """Normalise a layer pattern to a 0/1 list: a list as is, or Megatron's integer frequency."""
    if isinstance(pattern, int):
        if num_layers is None or pattern < 1:
            raise ValueError(
                f"an integer moe_layer_freq ({pattern}) needs num_layers and must be >= 1"
            )
        return [1 if i % pattern == 0 else 0 for i in range(num_layers)]
    flags = [int(v) for v in pattern]
    if any(v not in (0, 1) for v in flags):
        raise ValueError(f"moe layer pattern must hold only 0 and 1, got {list(pattern)}")
    if num_layers is not None and len(flags) != num_layers:
        raise ValueError(f"moe layer pattern has {len(flags)} entries, expected {num_layers}")
    return flags


def moe_layer_indices(pattern: Sequence[int] | int, num_layers: int | None = None) -> list[int]:
    """Global indices of the MoE layers, ascending (slot ``m`` of the compact layer axis)."""
    return [i for i, v in enumerate(moe_layer_pattern(pattern, num_layers)) if v]


def select_moe_layers(
    routes_RLK: torch.Tensor,
    pattern: Sequence[int] | int,
    *,
    check_dense_zero: bool = False,
    sample_id=None,
) -> torch.Tensor:
    """Keep the MoE layers of an all-hidden-layers ``routes_RLK``: ``routes_RMK``.

    ``check_dense_zero`` verifies that the dropped layers hold zeros, as SGLang writes them; a
    non-zero there means the pattern does not match the served model. It is off by default
    because it reads the dense layers for nothing when the configuration is known to be right.
    """
    flags = moe_layer_pattern(pattern, routes_RLK.shape[1])
    keep = [i for i, v in enumerate(flags) if v]
    if check_dense_zero:
        dense = [i for i, v in enumerate(flags) if not v]
        if dense and routes_RLK[:, dense].any():
            nonzero = [i for i in dense if routes_RLK[:, i].any()]
            who = f"sample {sample_id}" if sample_id is not None else "this sample"
            raise ValueError(
                f"routed_experts for {who} has non-zero ids in layers {nonzero}, which the "
                f"model config marks dense: the MoE layer pattern does not match the server's "
                f"model"
            )
    if len(keep) == len(flags):
        return routes_RLK
    return routes_RLK[:, keep]

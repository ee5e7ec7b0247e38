"""Model-state bytes of one rank (weights, gradients, main parameters, Adam moments): pure arithmetic.

The classes follow what Megatron-Core 0.16 allocates (read from ``distributed/``,
``optimizer/__init__.py``, ``optimizer/distrib_optimizer.py`` and
``optimizer/cpu_offloading/hybrid_optimizer.py``):

- weights: every local parameter in ``params_dtype``.
- gradients: DDP's ``main_grad`` buffers, in float32 when ``grad_reduce_in_fp32`` (our
  ``step/setup.py``), else in ``params_dtype``; full size on every rank (the distributed
  optimizer reduce-scatters into them; it does not shrink them).
- main parameters: float32 params need none (the optimizer steps them in place). For bf16:
  without the distributed optimizer, a float32 copy of every local parameter
  (``Float16OptimizerWithFloat16Params``); with it, a float32 copy of this rank's shard
  (``shard_model_param.clone().float()``), ON THE DEVICE even with ``optimizer_cpu_offload``
  unless ``use_precision_aware_optimizer`` is set (then the shard's main parameters belong to
  the hybrid optimizer, which keeps the offloaded fraction's on the host).
- Adam moments: ``exp_avg`` / ``exp_avg_sq`` (float32 unless the precision-aware optimizer
  sets ``exp_avg_dtype`` / ``exp_avg_sq_dtype``) for every local parameter, or for this rank's
  shard with the distributed optimizer. ``optimizer_cpu_offload`` moves the fraction
  ``optimizer_offload_fraction`` of them (and a float32 gradient copy of that fraction) to the
  host.
- sharding: dense parameters are sharded over the data-parallel group including CP
  (``world / (TP * PP)``); expert parameters over expert data parallelism
  (``world / (ETP * EP * PP)``).
"""

from __future__ import annotations

from dataclasses import dataclass

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2,
                "torch.float32": 4, "torch.bfloat16": 2, "torch.float16": 2, "uint8": 1, "torch.uint8": 1}


def dtype_bytes(value) -> int:
    """Bytes of a dtype given as a torch dtype or its name."""
    key = str(value)
    if key not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {value!r}; known: {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[key]


@dataclass(frozen=True)
class OptimizerLayout:
    """The optimizer settings that decide where its bytes go (from ``optim.megatron``)."""

    distributed: bool = False
    offload: bool = False
    offload_fraction: float = 1.0
    precision_aware: bool = False
    main_params_bytes: int = 4
    exp_avg_bytes: int = 4
    exp_avg_sq_bytes: int = 4

    @classmethod
    def from_megatron(cls, options: dict) -> "OptimizerLayout":
        precision_aware = bool(options.get("use_precision_aware_optimizer", False))
        return cls(
            distributed=bool(options.get("use_distributed_optimizer", False)),
            offload=bool(options.get("optimizer_cpu_offload", False)),
            offload_fraction=float(options.get("optimizer_offload_fraction", 1.0)),
            precision_aware=precision_aware,
            main_params_bytes=dtype_bytes(options.get("main_params_dtype", "float32")) if precision_aware else 4,
            exp_avg_bytes=dtype_bytes(options.get("exp_avg_dtype", "float32")) if precision_aware else 4,
            exp_avg_sq_bytes=dtype_bytes(options.get("exp_avg_sq_dtype", "float32")) if precision_aware else 4,
        )


def model_state_bytes(dense: int, expert: int, *, param_bytes: int, grad_reduce_in_fp32: bool,
                      opt: OptimizerLayout, dp: int, expert_dp: int) -> dict[str, tuple[float, float]]:
    """``{class: (device bytes, host bytes)}`` for a rank holding ``dense`` + ``expert`` parameters.

    ``dp``: the dense parameters' data-parallel size (with CP); ``expert_dp``: the experts'.
    """
    total = dense + expert
    shard = dense / dp + expert / expert_dp if opt.distributed else float(total)
    on_host = opt.offload_fraction if opt.offload else 0.0
    grad_bytes = 4 if grad_reduce_in_fp32 else param_bytes
    out = {"weights": (total * param_bytes, 0.0), "gradients": (total * grad_bytes, 0.0)}
    if param_bytes == 4:
        main = (0.0, 0.0)
    elif not opt.distributed:
        main = (4.0 * total, 0.0)
    elif opt.precision_aware:
        main = (shard * opt.main_params_bytes * (1 - on_host), shard * 4 * on_host)
    else:
        # Upstream clones the shard to float32 on the device; the offloaded optimizer works on a
        # host copy of the offloaded fraction.
        main = (shard * 4.0, shard * 4 * on_host)
    out["main_params"] = main
    moments = shard * (opt.exp_avg_bytes + opt.exp_avg_sq_bytes)
    out["adam_moments"] = (moments * (1 - on_host), moments * on_host)
    if on_host:
        out["offload_grad_copy"] = (0.0, shard * 4 * on_host)
    return out

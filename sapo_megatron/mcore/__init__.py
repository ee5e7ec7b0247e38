"""Every place sapo_megatron reaches into upstream Megatron-Core beyond its public API, and why.

We extend Megatron-Core, never fork it; where we must bend it, the code is small and lives here,
so that a megatron-core upgrade is checked against this one folder (the supported version range
is checked in :mod:`.version`, at import of this package: any other release is refused with a
message naming both).

- :mod:`.version` - the supported megatron-core range, declared once (``setup.py`` reads it) and
  enforced here. Why: upstream internals we touch move between releases; CI runs 0.16 and 0.19.

- :mod:`.cpu` - CPU shims: Megatron-Core assumes CUDA in places that do not change the maths
  (``torch.cuda.current_device()``, literal ``device="cuda"``, the CUDA RNG tracker, stream
  syncs, a Transformer-Engine GEMM symbol). Explicitly activated, reversible, a no-op with CUDA.
  Why: the CPU demo and CI run the real library with gloo.
- :mod:`.norms` - the sequence-parallel norm swap: the local spec's ``WrappedTorchNorm`` refuses
  ``sequence_parallel=True``, and MoE with TP requires SP. :func:`~.norms.with_sp_norms` puts an
  SP-capable RMSNorm in every norm slot of a local block spec (the builder calls it for the
  local spec only). Why: MoE + TP trains without Transformer Engine.
- :mod:`.router_replay` - the routing-replay injection: a ``RouterReplay`` subclass set as each
  MoE router's ``router_replay`` hook, skipping ``RouterReplay.__init__`` so it never joins
  upstream's process-global instance list. Why: per-model replay (policy and reference model),
  per-token fallback and agreement metrics; the controller logic is ours, in
  :mod:`sapo_megatron.routing.replay`.
- :mod:`.output_layer` - fused log-probs: the last stage returns the output layer's input (as
  the layer would prepare it: SP all-gather or TP copy) instead of logits, through 0.19's
  ``GPTModel.forward(output_processor=...)``, or on 0.16, which has no such hook, by replacing
  the output layer instance's ``forward`` for one call. Why: the ``[T, V/TP]`` logits and their
  gradient are the largest transient of an RL step at long context.
- :mod:`.te_names` - Transformer Engine parameter-name aliases: TE's fused-norm names
  (``linear_qkv.layer_norm_weight``) and grouped-GEMM expert names (``experts.linear_fc1.weight<e>``)
  mapped to the local spec's, our canonical names. Why: one checkpoint table and one sharding
  map serve both specs.
"""

from sapo_megatron.mcore.version import (
    SUPPORTED,
    UnsupportedMegatronCore,
    check_megatron_core,
    megatron_core_version,
)

check_megatron_core()

from sapo_megatron.mcore.cpu import (  # noqa: E402  (after the version check, on purpose)
    activate_cpu_compat,
    cpu_compat_active,
    deactivate_cpu_compat,
)

__all__ = [
    "SUPPORTED",
    "UnsupportedMegatronCore",
    "activate_cpu_compat",
    "check_megatron_core",
    "cpu_compat_active",
    "deactivate_cpu_compat",
    "megatron_core_version",
]

"""MoE routing replay: routes from the rollout engine (R3) or the old-log-prob pass (R2),
replayed inside Megatron-Core's routers.

Pure parts (single process, tensors only):
- :mod:`.codec` - SGLang's ``routed_experts`` wire format (decode, validate, encode, turns);
- :mod:`.compact` - storage dtype and MoE-layer selection;
- :mod:`.agreement` - engine vs trainer routes without replay (the mismatch metrics);
- :mod:`.align` - the row order Megatron's routers see (padding, packing, CP, SP, PP stages).

Distribution side: :mod:`.microbatch` attaches aligned routes to a microbatch and
:mod:`.replay` is the per-model controller; the hook it installs in Megatron-Core's routers is
:mod:`sapo_megatron.mcore.router_replay`.

Shape letters, in tensor-name suffixes (``routes_RLK``, ``routes_SBMK``, ``idx_TK``):

- ``L`` - every hidden layer, as on SGLang's wire (dense layers included, as zeros);
- ``M`` - MoE layers only, in global order (slot ``m`` = the ``m``-th MoE layer; what
  Megatron's routers and our stored routes use). Never mixed: ``L -> M`` happens once, in
  :func:`~.compact.select_moe_layers` or ``decode_routed_experts(moe_layers=...)``;
- ``K`` - top-k slots of one token;
- ``R`` - route rows of one sample (= its ``N - 1`` tokens but the last; ``N`` = sample length);
- ``S``, ``B`` - sequence position and microbatch row of the ``[S, B, H]`` layout the routers see;
- ``T`` - tokens as one router sees them (``S * B`` flattened sequence-major, or this rank's
  sequence-parallel shard of them).
"""

from sapo_megatron.routing.align import (
    align_packed,
    align_padded,
    cp_slice,
    cp_slice_thd,
    layer_targets,
    moe_slots,
    packed_cu_seqlens,
    pad_routes,
    sp_slice,
    stage_layer_range,
    stage_moe_layers,
    thd_cp_indices,
)
from sapo_megatron.routing.codec import (
    concat_turns,
    decode_routed_experts,
    encode_routed_experts,
    has_duplicate_ids,
    validate_routes,
)
from sapo_megatron.routing.compact import (
    compact_routes,
    moe_layer_indices,
    moe_layer_pattern,
    select_moe_layers,
    storage_dtype,
)

from sapo_megatron.routing.agreement import agreement_counts, counts_to_metrics

# Injection into Megatron-Core's routers (distribution side). Imported on first use: they
# load Megatron-Core, which the pure codec (e.g. the SGLang client) should not pay for.
_LAZY = {
    "attach_routes": "sapo_megatron.routing.microbatch",
    "live_agreement_metrics": "sapo_megatron.routing.agreement",
    "MicrobatchRoutes": "sapo_megatron.routing.replay",
    "RoutingReplay": "sapo_megatron.routing.replay",
    "attach_routing_replay": "sapo_megatron.routing.replay",
    "recorded_sample_routes": "sapo_megatron.routing.replay",
    "replay_metrics": "sapo_megatron.routing.replay",
    "routing_action": "sapo_megatron.routing.replay",
    "routing_replay_of": "sapo_megatron.routing.replay",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sapo_megatron.routing' has no attribute {name!r}")

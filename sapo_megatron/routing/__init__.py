"""MoE routing replay: routes from the rollout engine (R3) or the old-log-prob pass (R2),
replayed inside Megatron-Core's routers.

Pure parts (single process, tensors only):
- :mod:`.codec` - SGLang's ``routed_experts`` wire format (decode, validate, encode, turns);
- :mod:`.compact` - storage dtype and MoE-layer selection;
- :mod:`.align` - the row order Megatron's routers see (padding, packing, CP, SP, PP stages).
"""

from sapo_megatron.routing.align import (
    add_fallback_row,
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

# Injection into Megatron-Core's routers (distribution side).
from sapo_megatron.routing.microbatch import attach_routes  # noqa: E402
from sapo_megatron.routing.replay import (  # noqa: E402
    MicrobatchRoutes,
    RoutingReplay,
    attach_routing_replay,
    recorded_sample_routes,
    replay_metrics,
    routing_action,
    routing_replay_of,
)

"""One module per supported architecture, as Megatron-Bridge lays them out; this is the registry.

Each module (:mod:`.qwen3_moe`, :mod:`.qwen3`, :mod:`.mixtral`, :mod:`.dots1` for the
DeepSeek-V3-style MoE block) holds its name table and its ``config_from_hf`` and exports them
as one ``MAPPING``; the pieces they share live in :mod:`.common`. Adding an architecture is a
new module here plus one entry in ``_MODULES``. How the tables are expanded into tensors
(groups, symbolic shapes) is :mod:`sapo_megatron.checkpoint.mapping`.
"""

from __future__ import annotations

from sapo_megatron.checkpoint.models import dots1, mixtral, qwen3, qwen3_moe
from sapo_megatron.checkpoint.models.common import ArchMapping, Rule

_MODULES = (qwen3_moe, qwen3, mixtral, dots1)

MAPPINGS: dict[str, ArchMapping] = {m.MAPPING.architecture: m.MAPPING for m in _MODULES}

# Architectures we recognise but cannot build, and why.
REFUSED: dict[str, str] = {
    "DeepseekV3ForCausalLM": (
        "DeepSeek-V3 uses multi-latent attention (q_lora_rank/kv_lora_rank), which needs "
        "Megatron-Core's MLATransformerConfig and MLA layer spec; sapo_megatron's builder makes a "
        "plain TransformerConfig with GQA attention. Its MoE block (dense first layers, shared "
        "experts, sigmoid router with expert bias) is supported: see Dots1ForCausalLM"
    ),
    "DeepseekV2ForCausalLM": "multi-latent attention is not supported (see DeepseekV3ForCausalLM)",
}

__all__ = ["MAPPINGS", "REFUSED", "ArchMapping", "Rule"]

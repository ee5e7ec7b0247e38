"""Parameter count of a Qwen3-MoE-shaped model from its shapes alone (HF module by module).

Used for the SGLang side (which holds the whole model over its TP ranks) and as a cross-check
of the meta-device build; tests compare both with the published totals.
"""

from __future__ import annotations


def hf_param_count(model) -> dict[str, int]:
    """``{"total", "active", "expert"}`` for a :class:`ModelConfig` (HF naming: q/k/v/o_proj,
    q/k_norm, the two layer norms, the MoE gate and experts' gate/up/down_proj, dense MLPs,
    embeddings, the final norm and an untied lm_head). ``active``: with ``num_experts_per_tok``
    experts per MoE layer."""
    h, d = model.hidden_size, model.kv_channels
    attention = h * model.num_attention_heads * d * 2 + h * model.num_key_value_heads * d * 2
    attention += 2 * d if model.qk_layernorm else 0
    norms = 2 * h
    one_expert = 3 * h * model.moe_intermediate_size
    dense_mlp = 3 * h * model.intermediate_size
    total = active = expert = 0
    for is_moe in model.moe_layer_pattern():
        base = attention + norms
        if is_moe:
            base += h * model.num_experts  # router
            expert += model.num_experts * one_expert
            total += base + model.num_experts * one_expert
            active += base + model.num_experts_per_tok * one_expert
        else:
            total += base + dense_mlp
            active += base + dense_mlp
    outer = model.vocab_size * h * (1 if model.tie_word_embeddings else 2) + h
    return {"total": total + outer, "active": active + outer, "expert": expert}

"""Tiny random HF models for the checkpoint tests (float32, saved with ``save_pretrained``).

Shapes are chosen to exercise every mapping path under TP=2, EP=2 and PP=2: 2 layers (one per
pipeline stage), GQA with 2 query groups (one per TP rank), head_dim != hidden/heads for Qwen3,
an even number of experts, a dense first layer where the architecture has one, a tied head
for dense Qwen3, and a non-zero expert bias for the sigmoid router.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("qwen3_moe", "qwen3", "mixtral", "dots1")

_COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=128,
)


def make_hf_model(arch: str, out_dir: Path, seed: int = 0, **sizes) -> Path:
    """``sizes`` override the common sizes (e.g. ``num_hidden_layers=8``)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = {**_COMMON, **sizes}
    if arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(
            **common, head_dim=12, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
            num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=True, rope_theta=1e6,
            tie_word_embeddings=False,
        )
        model = tf.Qwen3MoeForCausalLM(cfg)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=12, intermediate_size=48, tie_word_embeddings=True)
        model = tf.Qwen3ForCausalLM(cfg)
    elif arch == "mixtral":
        cfg = tf.MixtralConfig(
            **common, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
            sliding_window=None, rope_theta=1e6, tie_word_embeddings=False,
        )
        model = tf.MixtralForCausalLM(cfg)
    elif arch == "dots1":
        cfg = tf.Dots1Config(
            **common, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
            num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
            topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.0, tie_word_embeddings=False,
        )
        model = tf.Dots1ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model = model.float()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # HF initialises it to zero, which would not test its mapping.
                buf.copy_(torch.randn_like(buf) * 0.1)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    return out_dir


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out

"""Export HF weights straight from a training checkpoint (``iter_N/`` written by the trainer).

``mcore-to-hf`` calls :func:`export_training_checkpoint` when its ``--ckpt`` is a training
checkpoint: an ``iter_N`` directory, the ``checkpoints/`` directory holding
``latest_checkpointed_iteration.txt``, or the run directory above it. The model is rebuilt in
this process at TP=PP=EP=1 from the ``model_config`` in the checkpoint's ``meta.json``,
``dist_checkpointing`` reshards the saved tensors into it (whatever layout wrote them), and
:func:`sapo_megatron.checkpoint.export_hf` writes safetensors + config.json. The HF config is
the one the run started from (``hf_config`` in ``meta.json``); a run built from a preset gets
one derived from its ``ModelConfig`` (Qwen3-MoE / Qwen3 naming), checked to map back to the
same architecture.

    python tools/convert_checkpoint.py mcore-to-hf --ckpt runs/x/checkpoints --out hf_out/

Memory: the whole model at TP=1 on one process (the optimizer state is not read).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch


def _iter_dir(path: Path) -> Path | None:
    """The ``iter_N`` directory ``path`` stands for, if it is one of OUR training checkpoints
    (a Megatron-LM / Bridge one has no ``meta.json``; ``mcore-to-hf`` then names it as such)."""
    from sapo_megatron.trainer.checkpoint import CHECKPOINTS, FORMAT, META, TRACKER, resolve_checkpoint_dir

    for candidate in (path, path / CHECKPOINTS):
        if (candidate / TRACKER).is_file():
            path = resolve_checkpoint_dir(candidate)
            break
    try:
        ours = json.loads((path / META).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return None
    return path if ours else None


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """Is ``path`` one of the trainer's checkpoints (an ``iter_N`` dir, its parent, or the run dir)?"""
    path = Path(path)
    return path.is_dir() and _iter_dir(path) is not None


def run_hf_config(cfg) -> dict | None:
    """The HF config a training run started from, if it started from one."""
    if cfg.model.hf_dir:
        return json.loads((Path(cfg.model.hf_dir) / "config.json").read_text())
    if cfg.model.ckpt_dir:
        from sapo_megatron.checkpoint.mcore_io import META_FILE

        meta = Path(cfg.model.ckpt_dir) / META_FILE
        if meta.is_file():
            return json.loads(meta.read_text())["hf_config"]
    return None


def hf_config_from_model_config(model_cfg) -> dict:
    """An HF ``config.json`` for a :class:`ModelConfig` (Qwen3-MoE, or Qwen3 without experts)."""
    from sapo_megatron.checkpoint.mapping import model_config_from_hf

    c = model_cfg
    moe = bool(c.num_experts)
    hf = {
        "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if moe else "qwen3",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.kv_channels,
        "intermediate_size": c.intermediate_size, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings, "hidden_act": "silu", "attention_bias": False,
        "torch_dtype": c.params_dtype,
    }
    if moe:
        hf.update(
            moe_intermediate_size=c.moe_intermediate_size, num_experts=c.num_experts,
            num_experts_per_tok=c.num_experts_per_tok, decoder_sparse_step=1,
            mlp_only_layers=sorted(set(c.mlp_only_layers) | set(range(c.first_k_dense))),
            norm_topk_prob=not c.megatron.get("moe_router_pre_softmax", False),
        )
    back = model_config_from_hf(hf)
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "kv_channels", "intermediate_size", "num_experts", "num_experts_per_tok", "tie_word_embeddings",
            "qk_layernorm")
    differ = [k for k in keys if getattr(back, k) != getattr(c, k)]
    if differ or (moe and (back.moe_layer_pattern() != c.moe_layer_pattern()
                           or back.moe_intermediate_size != c.moe_intermediate_size)):
        raise ValueError(f"cannot derive a Qwen3 HF config for this model (differs in {differ or ['MoE layers']}); "
                         f"start the run from model.hf_dir so the checkpoint records its HF config")
    return hf


def export_training_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike, *,
                               max_shard_bytes: int = 4 * 1024**3, dtype: torch.dtype | None = None,
                               show_progress: bool = True) -> dict:
    """Write HF safetensors from a training checkpoint (single process); returns stats."""
    from sapo_megatron.checkpoint.live import export_hf
    from sapo_megatron.models import ModelConfig, ParallelConfig
    from sapo_megatron.parallel import initialize_model_parallel
    from sapo_megatron.step import build_model_chunks
    from sapo_megatron.trainer.checkpoint import META, load_model_weights

    t0 = time.time()
    iter_dir = _iter_dir(Path(path))
    if iter_dir is None:
        raise ValueError(f"{path} is not a training checkpoint (no latest_checkpointed_iteration.txt or meta.json)")
    meta = json.loads((iter_dir / META).read_text())
    if "model_config" not in meta:
        raise ValueError(f"{iter_dir / META} has no model_config (written before export support); "
                         f"resume the run once and save, or load it with model.ckpt_dir and export_hf")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model_cfg = ModelConfig(**{k: v for k, v in meta["model_config"].items() if k in fields})
    hf_config = meta.get("hf_config") or hf_config_from_model_config(model_cfg)
    if show_progress:
        print(f"mcore-to-hf: loading {iter_dir} (step {meta.get('step')}, written at {meta.get('layout')})", flush=True)
    initialize_model_parallel(ParallelConfig(), seed=0)
    chunks = build_model_chunks(model_cfg, ParallelConfig(), wrap_ddp=False)
    load_model_weights(chunks, iter_dir)
    export_hf(chunks, out_dir, hf_config, dtype=dtype, max_shard_bytes=max_shard_bytes)
    files = sorted(p.name for p in Path(out_dir).glob("*.safetensors"))
    size = sum((Path(out_dir) / f).stat().st_size for f in files)
    return {"seconds": time.time() - t0, "bytes": size, "files": files}

"""Read the model out of a training checkpoint (``iter_N/`` written by the trainer), a layer at a time.

``mcore-to-hf`` reads through :class:`TrainingCheckpoint` when its ``--ckpt`` is a training
checkpoint: an ``iter_N`` directory, the ``checkpoints/`` directory holding
``latest_checkpointed_iteration.txt``, or the run directory above it. The HF config is the one
the run started from (``hf_config`` in ``meta.json``); a run built from a preset gets one
derived from its ``ModelConfig`` (Qwen3-MoE / Qwen3 naming), checked to map back to the same
architecture.

    python tools/convert_checkpoint.py mcore-to-hf --ckpt runs/x/checkpoints --out hf_out/

Memory: about one layer. The model is built once at TP=PP=EP=1 on the meta device (no memory,
and the local spec whatever the machine: the weights never go to CUDA), only for its
``sharded_state_dict()``: Megatron-Core's own checkpoint keys, global offsets and factories (the
gate/up split) of every tensor, whatever layout wrote the checkpoint. :meth:`TrainingCheckpoint.load`
gives the entries of one group (embedding, one layer, final) fresh host tensors, applies the
factories, reads exactly those regions through torch.distributed.checkpoint (a ``torch_dist``
checkpoint is one; :func:`_read_regions` says why not ``dist_checkpointing.load``) and merges the
factories back. Rebuilding the real model (as this module did before) held all of it, 470 GB for
Qwen3-235B. The optimizer state is not read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list


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


def _skeleton(model_cfg) -> dict:
    """The TP=PP=EP=1 model's ``sharded_state_dict()``, built on the meta device.

    Not ``build_gpt_model``: on a GPU machine it picks the Transformer Engine spec (whose modules
    allocate on CUDA whatever the default device) and moves the model to CUDA. The local spec
    names its tensors in the checkpoint as the TE spec does (Megatron-Core maps its norms to the
    fused names, and SequentialMLP's experts to grouped GEMM's ``experts.experts.*`` keys), so its
    entries address a checkpoint written by either."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from sapo_megatron.mcore.norms import with_sp_norms
    from sapo_megatron.models import ParallelConfig
    from sapo_megatron.models.config import to_transformer_config

    config = to_transformer_config(model_cfg, ParallelConfig(), on_cpu=True)
    # Megatron allocates GPU-initialised weights on ``torch.cuda.current_device()`` (explicitly, so
    # not on meta; the CPU compat layer answers "cpu"): CPU initialisation with no init method
    # allocates them on the default device, meta here.
    config.use_cpu_initialization, config.perform_initialization = True, False
    spec = with_sp_norms(get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm"),
                         config.qk_layernorm)
    with torch.device("meta"):
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=model_cfg.vocab_size,
                         max_sequence_length=model_cfg.max_position_embeddings, pre_process=True,
                         post_process=True, share_embeddings_and_output_weights=model_cfg.tie_word_embeddings,
                         position_embedding_type="rope", rotary_base=int(model_cfg.rope_theta))
    return model.sharded_state_dict()


def _init_single_process() -> None:
    """Megatron's TP=PP=EP=1 groups, which building the skeleton needs (in a world of one on
    gloo unless torch.distributed is already set up). Reading needs no process group."""
    from megatron.core import parallel_state as ps

    from sapo_megatron.parallel import init_distributed

    init_distributed("gloo")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    sizes = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
             ps.get_expert_model_parallel_world_size())
    if sizes != (1, 1, 1):
        raise ValueError(f"exporting a training checkpoint builds the TP=PP=EP=1 model's layout, but this "
                         f"process has TP, PP, EP = {sizes}; run the export in its own process")


class TrainingCheckpoint:
    """The model weights of a training checkpoint as full single-rank tensors, read on demand.

    The same reading interface as :class:`~sapo_megatron.checkpoint.mcore_io.McoreCheckpoint`
    (``dir``, ``hf_config``, ``names()``, ``load(names)``), so ``mcore_to_hf`` converts either
    with one loop."""

    def __init__(self, path: str | os.PathLike):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
        from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
            CachedMetadataFileSystemReader,
        )

        from sapo_megatron.mcore.te_names import local_norm_name
        from sapo_megatron.models import ModelConfig
        from sapo_megatron.trainer.checkpoint import META, _check_shapes, check_complete

        iter_dir = _iter_dir(Path(path))
        if iter_dir is None:
            raise ValueError(f"{path} is not a training checkpoint (no latest_checkpointed_iteration.txt or meta.json)")
        self.dir = iter_dir
        self.meta = json.loads((iter_dir / META).read_text())
        if "model_config" not in self.meta:
            raise ValueError(f"{iter_dir / META} has no model_config (written before export support); "
                             f"resume the run once and save, or load it with model.ckpt_dir and export_hf")
        check_complete(iter_dir)
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        self.model_config = ModelConfig(**{k: v for k, v in self.meta["model_config"].items() if k in fields})
        self.hf_config = self.meta.get("hf_config") or hf_config_from_model_config(self.model_config)
        _init_single_process()
        skeleton = _skeleton(self.model_config)
        _check_shapes(iter_dir, skeleton)  # names the tensor and both shapes on a mismatch
        self._entries = {local_norm_name(name): entry for name, entry in skeleton.items()
                         if isinstance(entry, (ShardedTensor, ShardedTensorFactory))}
        # One reader, its metadata read once (it lists the optimizer state too: large at scale).
        self._reader = CachedMetadataFileSystemReader(str(iter_dir))

    def names(self) -> list[str]:
        return list(self._entries)

    def load(self, names) -> dict[str, torch.Tensor]:
        """Full tensors for ``names``, read from the dist checkpoint (only their bytes)."""
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
        from megatron.core.dist_checkpointing.mapping import (
            ShardedTensor,
            ShardedTensorFactory,
            apply_factories,
            apply_factory_merges,
        )

        missing = [n for n in names if n not in self._entries]
        if missing:
            raise ValueError(f"training checkpoint {self.dir} has no model tensor(s) {missing[:5]}")
        request = {}
        for name in names:
            entry = self._entries[name]
            request[name] = dataclasses.replace(entry, data=torch.empty(entry.data.shape, dtype=entry.data.dtype))
        factories = {n: r for n, r in request.items() if isinstance(r, ShardedTensorFactory)}
        apply_factories(request)  # e.g. gate/up: two ShardedTensors over halves of one buffer
        _read_regions(self._reader, [v for v in nested_values(request) if isinstance(v, ShardedTensor)])
        loaded = dict_list_map_inplace(lambda v: v.data if isinstance(v, ShardedTensor) else v, request)
        return apply_factory_merges(loaded, factories)


def _read_regions(reader, sh_tens: list) -> None:
    """Fill each ShardedTensor's ``data`` with its region of the global tensor (``reader``: a
    DCP FileSystemReader of the checkpoint).

    Why not ``dist_checkpointing.load``: its torch_dist strategy describes a request as a regular
    grid of shards whose other cells belong to "another rank", ``(rank + 1) % world_size``; in a
    world of one that is this rank again, so a request for one layer of a layer-stacked tensor
    (``decoder.layers.*`` with the layer axis prepended, as every homogeneous model stores them)
    is refused ("Number of local shards ... does not match"). A torch_dist checkpoint is a
    torch.distributed.checkpoint one: :class:`_RegionPlanner` asks DCP for exactly these
    regions, and DCP reads only the stored chunks that overlap them (one per layer and saving rank).
    """
    regions = {}
    for sh in sh_tens:
        if sh.flattened_range is not None:
            raise ValueError(f"{sh.key} is requested flattened; the export reads whole tensors")
        region = sh.data.view((1,) * sh.prepend_axis_num + tuple(sh.local_shape))
        regions[(sh.key, tuple(sh.global_offset))] = region
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no_dist is deliberate: one reader
        dcp.load({}, storage_reader=reader, planner=_RegionPlanner(regions), no_dist=True)


class _RegionPlanner(DefaultLoadPlanner):
    """DCP load planner for ``{(key, global offset): target}``: regions of global tensors."""

    def __init__(self, regions: dict) -> None:
        super().__init__()
        self.regions = regions

    def create_local_plan(self) -> LoadPlan:
        items = []
        for (key, offset), target in self.regions.items():
            if key not in self.metadata.state_dict_metadata:
                raise ValueError(f"the dist checkpoint has no tensor {key!r}")
            chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=target.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item) -> torch.Tensor:
        target = self.regions[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, start, length)
        return target

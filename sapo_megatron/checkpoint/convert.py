"""Offline conversion, one group (embedding, one layer, final) in memory at a time.

    hf_to_mcore("Qwen3-30B-A3B/", "ckpt/")     # HF safetensors -> sapo_megatron checkpoint
    mcore_to_hf("ckpt/", "hf_out/")            # and back (the HF config travels inside ckpt/)

Both check everything that can be checked from headers alone (tensor names and shapes against
the config) before writing anything. CLI: ``sapo-megatron convert`` (or ``tools/convert_checkpoint.py``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch
from tqdm import tqdm

from sapo_megatron.checkpoint.hf_io import HFCheckpoint, HFShardWriter, write_hf_config
from sapo_megatron.checkpoint.mapping import (
    DIM_MEANING,
    Unit,
    all_units,
    dims,
    mapping_for,
)
from sapo_megatron.checkpoint.mcore_io import McoreCheckpoint, McoreCheckpointWriter
from sapo_megatron.checkpoint.training_ckpt import TrainingCheckpoint, is_training_checkpoint
from sapo_megatron.checkpoint.transforms import to_hf, to_mcore


def progress(total: int, desc: str, enabled: bool = True) -> tqdm:
    """A tqdm bar over conversion groups on a terminal; silent in batch logs (stderr not a TTY)
    and with ``enabled=False`` (``--no-progress``)."""
    return tqdm(total=total, desc=desc, unit="group", file=sys.stderr, disable=None if enabled else True)


def shape_error(unit: Unit, k: int, got: tuple, d: dict[str, int], where: str) -> ValueError:
    explain = ", ".join(f"{s}={DIM_MEANING[s]}={d[s]}" for s in unit.dims_used)
    return ValueError(
        f"HF tensor {unit.hf[k]!r} has shape {tuple(got)} in {where}, but the config implies "
        f"{unit.hf_shapes[k]} ({explain})"
    )


def check_hf_against_config(reader: HFCheckpoint, plan: dict, cfg) -> None:
    """Every tensor the config implies is present with the implied shape, and nothing else is."""
    d = dims(cfg)
    expected = set()
    for group_units in plan.values():
        for unit in group_units:
            for k, name in enumerate(unit.hf):
                expected.add(name)
                if name not in reader.weight_map:
                    continue
                got = reader.shape(name)
                if got != unit.hf_shapes[k]:
                    raise shape_error(unit, k, got, d, reader.weight_map[name])
    reader.release()
    present = set(reader.keys())
    missing = sorted(expected - present)
    if missing:
        raise ValueError(
            f"{reader.dir}: the config implies {len(missing)} tensor(s) absent from the checkpoint, "
            f"e.g. {missing[:3]}"
        )
    ignored = mapping_for(reader.config).ignored_hf_suffixes
    extra = {n for n in present - expected if not n.endswith(ignored)}
    if cfg.tie_word_embeddings:
        # Tied embeddings: some writers still store the (identical) head.
        extra.discard("lm_head.weight")
    if extra:
        raise ValueError(
            f"{reader.dir}: {len(extra)} tensor(s) are not covered by the "
            f"{reader.config['architectures'][0]} mapping, e.g. {sorted(extra)[:3]} "
            f"(MTP layers, biases or other features the model builder does not have)"
        )


def hf_to_mcore(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, show_progress: bool = True) -> dict:
    """Convert an HF safetensors checkpoint into a sapo_megatron checkpoint; returns stats."""
    t0 = time.time()
    reader = HFCheckpoint(hf_dir)
    mapping = mapping_for(reader.config)
    cfg = mapping.config_from_hf(reader.config)
    plan = all_units(mapping, cfg)
    check_hf_against_config(reader, plan, cfg)
    writer = McoreCheckpointWriter(
        out_dir,
        architecture=mapping.architecture,
        hf_config=reader.config,
        model_config=dataclasses.asdict(cfg),
    )
    bar = progress(len(plan), "hf-to-mcore", show_progress)
    for group, group_units in plan.items():
        tensors = {u.mcore: to_mcore(u.kind, [reader.get(h) for h in u.hf], cfg) for u in group_units}
        writer.write_group(group, tensors)
        del tensors
        reader.release()
        bar.update(1)
    bar.close()
    writer.close()
    return {"seconds": time.time() - t0, "bytes": writer.total_bytes, "tensors": sum(map(len, plan.values()))}


def mcore_to_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 4 * 1024**3,
    dtype: torch.dtype | None = None,
    show_progress: bool = True,
) -> dict:
    """Convert a sapo_megatron checkpoint back to HF safetensors + config.json; returns stats.

    A training checkpoint (``iter_N/``, its parent or the run directory) is read from its
    dist checkpoint the same way, one group at a time (:class:`TrainingCheckpoint`)."""
    t0 = time.time()
    if is_training_checkpoint(ckpt_dir):
        reader = TrainingCheckpoint(ckpt_dir)
        if show_progress:
            print(f"mcore-to-hf: reading {reader.dir} (step {reader.meta.get('step')}, written at "
                  f"{reader.meta.get('layout')})", file=sys.stderr, flush=True)
    else:
        reader = McoreCheckpoint(ckpt_dir)
    mapping = mapping_for(reader.hf_config)
    cfg = mapping.config_from_hf(reader.hf_config)
    plan = all_units(mapping, cfg)
    wanted = {u.mcore for group_units in plan.values() for u in group_units}
    extra = sorted(set(reader.names()) - wanted)
    missing = sorted(wanted - set(reader.names()))
    if extra or missing:
        raise ValueError(
            f"checkpoint {reader.dir} does not match its own HF config: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )
    d = dims(cfg)
    writer = HFShardWriter(out_dir, max_shard_bytes)
    bar = progress(len(plan), "mcore-to-hf", show_progress)
    for group, group_units in plan.items():
        full = reader.load([u.mcore for u in group_units])
        for unit in group_units:
            for k, (name, tensor) in enumerate(zip(unit.hf, to_hf(unit.kind, full.pop(unit.mcore), cfg))):
                if tuple(tensor.shape) != unit.hf_shapes[k]:
                    raise shape_error(unit, k, tensor.shape, d, f"{reader.dir} ({unit.mcore})")
                writer.add(name, tensor if dtype is None else tensor.to(dtype))
        bar.update(1)
    bar.close()
    files = writer.close()
    write_hf_config(out_dir, reader.hf_config)
    return {"seconds": time.time() - t0, "bytes": writer.total_bytes, "files": files}

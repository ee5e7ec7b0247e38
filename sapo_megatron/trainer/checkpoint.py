"""Training checkpoints through Megatron-Core's ``dist_checkpointing`` (``torch_dist``), laid out
and published as Megatron-LM does.

Layout::

    OUT/checkpoints/iter_0000020/                     one dist_checkpointing directory
        .metadata, __*_*.distcp                         sharded tensors (model, optimizer) and
                                                        per-rank objects (RNG, per-rank extras)
        common.pt, metadata.json                        replicated state (inside the .distcp files
                                                        from megatron-core 0.19); backend + version
        meta.json                                       ours: step, data position, layout, model
    OUT/checkpoints/latest_checkpointed_iteration.txt   "20", replaced last

What is saved: the model's ``sharded_state_dict`` (DDP unwrapped, so no ``module.`` prefix; key
``model``, or ``model0``/``model1``... with virtual pipeline stages), the optimizer's
``sharded_state_dict`` (with the distributed optimizer, its parameter state: fp32 master weights
and Adam moments), the ``OptimizerParamScheduler`` state (``opt_param_scheduler``), every rank's
torch / Python / CUDA RNG states plus Megatron's model-parallel CUDA RNG tracker states, the
prompt-stream position, and the registered extra states (:func:`register_extra_state`).

Publishing: every rank writes into ``tmp_iter_N``; once all ranks are done, rank 0 writes
``meta.json`` there, renames it to ``iter_N`` (atomic on one filesystem) and only then replaces
the tracker file (written aside, then ``os.replace``-d). A run killed at any moment leaves the
tracker naming a complete checkpoint. With ``run.async_save`` the tensors are written by a
background process (megatron's non-persistent ``TemporalAsyncCaller``; its persistent caller
fails on CPU), and publishing runs in the request's finalize callback; a pending save is awaited
before the next one and at exit (:func:`finalize_async_saves`).

Resharding (what a resume at another layout can do):

- Megatron's plain optimizer (``use_distributed_optimizer: false``): any TP / PP / EP / DP
  change. Its state tensors are stored under the model's global (layout-free) keys. Megatron
  loads EP>1 (a ChainedOptimizer: dense + expert) into EP=1 (one optimizer) neither way
  (``KeyError: 'pre_wd_mult'``), so we load the state tensors by key into the optimizer that
  exists now, take its hyperparameters (param groups) from this run's config - the scheduler
  sets lr and weight decay anyway - and restore the step count from the checkpoint.
- The distributed optimizer: pinned to the ``dp_reshardable`` sharding format, the only one that
  works on megatron-core 0.16.1 (``fully_sharded_model_space``, the default, fails to build with
  "flattened_range is not supported"; ``fully_reshardable`` fails to load with torch's Adam,
  ``KeyError: 'step'``). ``dp_reshardable`` stores the optimizer's flat buffers per TP x PP
  group, so it reshards across the data-parallel size only: a TP / PP / EP change is refused
  with the layouts in the message. Its load runs under ``torch.no_grad()`` (fp32 master weights
  otherwise raise "a view of a leaf Variable"), and two of its defects with torch's Adam are
  worked around (:func:`_prime_adam_state`, :func:`_restore_adam_steps`).
- RNG states are restored only at the same layout (like Megatron-LM, which skips them when TP/PP
  change); per-rank extra states only at the same world size.

Checkpoints of the earlier format (``checkpoints/latest`` + ``step_N/rank_*.pt``) still resume at
the layout that wrote them (the next save writes the new format); with the distributed
optimizer they are refused, since its ``state_dict()`` left the parameter state out.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

CHECKPOINTS = "checkpoints"
TRACKER = "latest_checkpointed_iteration.txt"
META = "meta.json"
FORMAT = "sapo_megatron.train_checkpoint.v2"
DISTOPT_SHARDING = "dp_reshardable"
# Megatron-LM's checkpoint_version for dist checkpoints; kept so its tools recognise ours.
CHECKPOINT_VERSION = 3.0
# Legacy (v1) layout: checkpoints/latest -> step_N/{meta.json, rank_NNNNN.pt}.
LEGACY_FORMAT = "sapo_megatron.train_checkpoint.v1"
LEGACY_POINTER = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this run; the message names the file and why."""


# --- extra states -----------------------------------------------------------------------

@dataclass
class ExtraState:
    state_fn: Callable[[], Any]  # -> a picklable object
    load_fn: Callable[[Any], None]
    per_rank: bool = False  # True: every rank keeps its own; False: rank 0's, the same everywhere


EXTRA_STATES: dict[str, ExtraState] = {}


def register_extra_state(name: str, state_fn: Callable[[], Any], load_fn: Callable[[Any], None], *,
                         per_rank: bool = False) -> None:
    """Save ``state_fn()`` with every checkpoint and give it back to ``load_fn`` on resume.

    For parts outside the model and optimizer (an async rollout buffer, lagged policy
    snapshots...). ``per_rank=False``: the state is the same on every rank and rank 0's copy is
    stored; ``per_rank=True``: each rank stores its own (restored at the same world size only).
    A checkpoint without the state leaves it untouched. Registered names are process-global.
    """
    if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ValueError(f"extra state name must be a non-empty identifier, got {name!r}")
    EXTRA_STATES[name] = ExtraState(state_fn, load_fn, per_rank)


def register_stateful(name: str, obj, *, per_rank: bool = False) -> None:
    """:func:`register_extra_state` for an object with ``state_dict()`` / ``load_state_dict()``."""
    register_extra_state(name, obj.state_dict, obj.load_state_dict, per_rank=per_rank)


def unregister_extra_state(name: str) -> None:
    EXTRA_STATES.pop(name, None)


# --- helpers ---------------------------------------------------------------------------------

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def layout(model_chunks=None) -> dict:
    """This run's parallel layout; with ``model_chunks``, also the layers per pipeline stage
    (``pp_layers``: uneven first/last stages change it at the same PP size)."""
    from megatron.core import parallel_state as ps

    out = {
        "world_size": _world(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
        "ep": ps.get_expert_model_parallel_world_size(),
        "etp": ps.get_expert_tensor_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }
    if model_chunks:
        out["pp_layers"] = _pipeline_split(model_chunks, out["pp"])
    return out


def _pipeline_split(model_chunks, pp: int, *, even: bool = False) -> list[int]:
    """Layers per pipeline stage of this model at PP ``pp`` (``even``: as every checkpoint
    written before uneven stages existed split them)."""
    from sapo_megatron.models.config import pipeline_stage_layers
    from sapo_megatron.step.sharding import unwrap

    cfg = unwrap(model_chunks[0]).config
    if even:
        return pipeline_stage_layers(cfg.num_layers, pp) if cfg.num_layers % pp == 0 else None
    return pipeline_stage_layers(cfg.num_layers, pp, first=cfg.num_layers_in_first_pipeline_stage,
                                 last=cfg.num_layers_in_last_pipeline_stage)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["cuda_rng_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if torch.cuda.is_available() and "cuda" in state:
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["cuda_rng_tracker"])


def _per_rank_object(key: str, value):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(key, value, (_world(),), (_rank(),), replica_id=0)


def _inner(chunk):
    """The model inside Megatron's DDP wrapper (its keys carry no ``module.`` prefix)."""
    return getattr(chunk, "module", chunk)


def _model_keys(model_chunks) -> list[str]:
    """Megatron-LM's keys: ``model`` for one chunk, ``model0``, ``model1``... for VPP stages."""
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def model_sharded_state_dict(model_chunks) -> dict:
    return {k: _inner(c).sharded_state_dict() for k, c in zip(_model_keys(model_chunks), model_chunks)}


def is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer import ChainedOptimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def _optimizer_metadata(optimizer) -> dict:
    meta = {"chained_optim_avoid_prefix": True}
    if is_distributed_optimizer(optimizer):
        meta["distrib_optim_sharding_type"] = DISTOPT_SHARDING
    return meta


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


# --- save ------------------------------------------------------------------------------------

_ASYNC_QUEUE = None


def _async_queue():
    global _ASYNC_QUEUE
    if _ASYNC_QUEUE is None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        # persistent=False: megatron's persistent worker raises ZeroDivisionError on CPU.
        _ASYNC_QUEUE = AsyncCallsQueue(persistent=False)
    return _ASYNC_QUEUE


def finalize_async_saves() -> None:
    """Wait for a pending async save and publish it (a collective; no-op when none is pending)."""
    if _ASYNC_QUEUE is not None and _ASYNC_QUEUE.get_num_unfinalized_calls():
        _ASYNC_QUEUE.maybe_finalize_async_calls(blocking=True)


def save_checkpoint(root: str | Path, step: int, model_chunks, optimizer, scheduler=None, *,
                    meta: dict | None = None, keep_last: int = 2, async_save: bool = False) -> Path:
    """Write checkpoint ``step`` under ``root/checkpoints`` and publish it (every rank calls it).

    ``meta`` (JSON-serialisable: data position, model config...) goes into ``meta.json``. With
    ``async_save`` the call returns once the tensors are staged; publishing happens when the
    write completes (at the next save or :func:`finalize_async_saves`).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    finalize_async_saves()  # one save in flight at a time, published in order
    root = Path(root) / CHECKPOINTS
    final, tmp = root / iter_name(step), root / f"tmp_{iter_name(step)}"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # leftovers of a save that was killed
        tmp.mkdir(parents=True)
    _barrier()
    state = model_sharded_state_dict(model_chunks)
    state["checkpoint_version"] = CHECKPOINT_VERSION
    state["iteration"] = step
    if optimizer is not None:
        if is_distributed_optimizer(optimizer):
            _prime_adam_state(optimizer)  # its state_dict() needs a step, even before the first
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=_optimizer_metadata(optimizer))
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    state["rng_state"] = _per_rank_object("rng_state", _rng_state())
    common = {k: e.state_fn() for k, e in EXTRA_STATES.items() if not e.per_rank}
    per_rank = {k: e.state_fn() for k, e in EXTRA_STATES.items() if e.per_rank}
    state["sapo_extra_state"] = common
    state["sapo_rank_state"] = _per_rank_object("sapo_rank_state", per_rank)
    full_meta = {
        "format": FORMAT, "step": step, "layout": layout(model_chunks),
        "optimizer": {
            "distributed": optimizer is not None and is_distributed_optimizer(optimizer),
            "sharding": DISTOPT_SHARDING if optimizer is not None and is_distributed_optimizer(optimizer) else None,
        },
        "extra_states": {"common": sorted(common), "per_rank": sorted(per_rank)},
        **(meta or {}),
    }

    def publish() -> None:
        if _rank() == 0:
            (tmp / META).write_text(json.dumps(full_meta, indent=2, sort_keys=True))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer = root / f"{TRACKER}.tmp"
            pointer.write_text(str(step))
            os.replace(pointer, root / TRACKER)
            _prune(root, keep_last)
        _barrier()

    request = dist_checkpointing.save(
        state, str(tmp), sharded_strategy=get_default_save_sharded_strategy("torch_dist"),
        async_sharded_save=async_save, content_metadata={"sapo_format": FORMAT},
    )
    if async_save:
        request.add_finalize_fn(publish)
        _async_queue().schedule_async_request(request)
    else:
        _barrier()
        publish()
    return final


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    done = sorted(p for p in root.glob("iter_*") if p.is_dir())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# --- find and check --------------------------------------------------------------------------

def resolve_checkpoint_dir(path: str | Path) -> Path:
    """``path`` as an ``iter_N`` directory: itself, or what its tracker file names.

    Accepts an ``iter_N`` directory, a directory holding ``latest_checkpointed_iteration.txt``
    (Megatron-LM / Megatron-Bridge), or a bare dist checkpoint directory (``metadata.json``).
    """
    path = Path(path)
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            return path / "release"
        try:
            step = int(text)
        except ValueError:
            raise CheckpointError(f"{tracker} should hold an iteration number, found {text[:40]!r}") from None
        target = path / iter_name(step)
        if not target.is_dir():
            raise CheckpointError(f"{tracker} names iteration {step}, but {target} does not exist")
        return target
    return path


# Where the replicated (non-tensor) state lives: megatron-core up to 0.18 writes common.pt beside
# the torch_dist files; 0.19 stores it inside them as one ShardedObject, keyed as below.
COMMON_STATE_KEY = "common_state/"


def has_common_state(ckpt_dir: Path, metadata) -> bool:
    """The checkpoint holds its common state, in either format (``metadata``: the ``.metadata``)."""
    if (ckpt_dir / "common.pt").is_file():
        return True
    return any(key.startswith(COMMON_STATE_KEY) for key in getattr(metadata, "state_dict_metadata", {}))


def check_complete(ckpt_dir: Path) -> None:
    """Refuse a partial or corrupt dist checkpoint, naming the file at fault."""
    for name in ("metadata.json", ".metadata"):
        if not (ckpt_dir / name).is_file():
            raise CheckpointError(f"{ckpt_dir / name} is missing: {ckpt_dir} is not a complete "
                                  f"dist_checkpointing checkpoint (a save that did not finish?)")
    try:
        with open(ckpt_dir / ".metadata", "rb") as f:
            metadata = pickle.load(f)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"{ckpt_dir / '.metadata'} cannot be read ({type(err).__name__}: {err})") from None
    if not has_common_state(ckpt_dir, metadata):
        raise CheckpointError(f"{ckpt_dir / 'common.pt'} is missing and {ckpt_dir / '.metadata'} names no "
                              f"{COMMON_STATE_KEY!r} entry: {ckpt_dir} is not a complete dist_checkpointing "
                              f"checkpoint (a save that did not finish?)")
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(needed.items()):
        file = ckpt_dir / rel
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (named by {ckpt_dir / '.metadata'})")
        if file.stat().st_size < size:
            raise CheckpointError(f"{file} is truncated: {file.stat().st_size} bytes, "
                                  f"{ckpt_dir / '.metadata'} expects at least {size}")


def latest_checkpoint(root: str | Path) -> Path | None:
    """The published checkpoint of run directory ``root`` (its tracker file), None when none."""
    ckpts = Path(root) / CHECKPOINTS
    if (ckpts / TRACKER).is_file():
        path = resolve_checkpoint_dir(ckpts)
        if not (path / META).is_file():
            raise CheckpointError(f"{path / META} is missing: {path} is not a complete checkpoint")
        return path
    if (ckpts / LEGACY_POINTER).is_file():
        path = ckpts / (ckpts / LEGACY_POINTER).read_text().strip()
        if not (path / META).is_file():
            raise CheckpointError(f"{ckpts / LEGACY_POINTER} names {path.name}, which is not a complete checkpoint")
        return path
    return None


def agreed_latest_checkpoint(root: str | Path) -> Path | None:
    """:func:`latest_checkpoint` as rank 0 finds it, on every rank (an object broadcast; rank
    0's error, if any, is raised on every rank).

    Whether to resume decides which collectives a rank runs next (a dist_checkpointing load, or
    none), so every rank must decide alike. Reading the tracker on each rank does not guarantee
    that: nodes can see a shared filesystem differently for a while (NFS caches attributes and
    failed lookups for up to a minute), so a job restarted soon after the previous one died may
    find the tracker on some nodes only. Their ranks would resume while the others start afresh,
    and the two sides' collectives would hang, or pair with unrelated ones.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return latest_checkpoint(root)
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            found = latest_checkpoint(root)
            box = [(None, None if found is None else str(found))]
        except Exception as err:  # noqa: BLE001 - raised on every rank below
            box = [(err, None)]
    dist.broadcast_object_list(box, src=0)
    error, found = box[0]
    if error is not None:
        raise error
    return None if found is None else Path(found)


def _check_shapes(ckpt_dir: Path, sharded: dict) -> dict:
    """Every model tensor exists in the checkpoint with this model's global shape."""
    from megatron.core.dist_checkpointing import load_tensors_metadata
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = load_tensors_metadata(str(ckpt_dir))
    for value in nested_values(sharded):
        if not isinstance(value, ShardedTensor):
            continue
        if value.key not in saved:
            raise CheckpointError(f"{ckpt_dir} has no tensor {value.key!r}: it was written for another "
                                  f"model (or layer spec)")
        have, want = tuple(saved[value.key].global_shape), tuple(value.global_shape)
        if have != want:
            raise CheckpointError(f"tensor {value.key!r} has shape {have} in {ckpt_dir}, this model "
                                  f"expects {want}: the checkpoint was written for another model shape")
    return saved


def _dist_load(state: dict, ckpt_dir: Path) -> dict:
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load(state, str(ckpt_dir))
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - name the checkpoint whatever the reader raised
        raise CheckpointError(f"loading {ckpt_dir} failed: {type(err).__name__}: {err}") from err


# --- load ------------------------------------------------------------------------------------

def load_checkpoint(path: str | Path, model_chunks, optimizer, scheduler=None) -> dict:
    """Restore model, optimizer, scheduler, RNG and extra states from ``path`` (an ``iter_N``
    directory, or a legacy ``step_N``); returns its ``meta.json``. Every rank calls it."""
    path = Path(path)
    meta = json.loads((path / META).read_text())
    if meta.get("format") == LEGACY_FORMAT:
        return _load_legacy(path, meta, model_chunks, optimizer)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / META} has format {meta.get('format')!r}, expected {FORMAT!r}")
    check_complete(path)
    here, there = layout(model_chunks), dict(meta["layout"])
    if "pp_layers" not in there:  # written before uneven pipeline stages: an even split
        there["pp_layers"] = _pipeline_split(model_chunks, there["pp"], even=True)
    same_layout = here == there
    state = model_sharded_state_dict(model_chunks)
    saved = _check_shapes(path, state)
    if optimizer is not None:
        _check_optimizer_compat(path, meta, optimizer, here, there)
        opt_meta = _optimizer_metadata(optimizer)
        if is_distributed_optimizer(optimizer):
            _prime_adam_state(optimizer)
        opt_sd = optimizer.sharded_state_dict(state, is_loading=True, metadata=opt_meta)
        if is_distributed_optimizer(optimizer):
            state["optimizer"] = opt_sd
        else:
            entries = _optimizer_tensors(opt_sd)
            absent = [e.key for e in entries if e.key not in saved]
            if len(absent) == len(entries):
                # Saved before the first optimizer step: there is no state to restore, and a
                # fresh optimizer is exactly what was saved.
                optimizer = None
            elif absent:
                raise CheckpointError(f"{path} has no optimizer tensor {absent[0]!r} ({len(absent)} of "
                                      f"{len(entries)} absent): it was written for another model")
            else:
                state["_optimizer_tensors"] = entries
    if same_layout:
        state["rng_state"] = _per_rank_object("rng_state", None)
    if here["world_size"] == there["world_size"] and meta.get("extra_states", {}).get("per_rank"):
        state["sapo_rank_state"] = _per_rank_object("sapo_rank_state", None)
    loaded = _dist_load(state, path)

    for key, chunk in zip(_model_keys(model_chunks), model_chunks):
        _inner(chunk).load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        with torch.no_grad():  # the distributed optimizer copies into fp32 views of leaves
            if is_distributed_optimizer(optimizer):
                optimizer.load_state_dict(loaded["optimizer"])
                _restore_adam_steps(optimizer)
            else:
                optimizer.load_state_dict(_fill_optimizer_state(opt_sd, loaded["_optimizer_tensors"],
                                                                loaded.get("optimizer", {})))
    if scheduler is not None and "opt_param_scheduler" in loaded:
        from sapo_megatron.trainer.schedule import load_scheduler_state

        load_scheduler_state(scheduler, loaded["opt_param_scheduler"], source=path)
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    elif _rank() == 0:
        print(f"checkpoint {path}: layout {there} -> {here}; RNG states not restored", flush=True)
    for name, value in loaded.get("sapo_extra_state", {}).items():
        if name in EXTRA_STATES:
            EXTRA_STATES[name].load_fn(value)
    for name, value in (loaded.get("sapo_rank_state") or {}).items():
        if name in EXTRA_STATES:
            EXTRA_STATES[name].load_fn(value)
    missing_rank = [n for n in meta.get("extra_states", {}).get("per_rank", [])
                    if n in EXTRA_STATES and "sapo_rank_state" not in loaded]
    if missing_rank:
        raise CheckpointError(
            f"{path}: per-rank extra states {missing_rank} were written by {there['world_size']} ranks "
            f"and cannot be restored on {here['world_size']}; unregister them to resume without")
    return meta


def _check_optimizer_compat(path: Path, meta: dict, optimizer, here: dict, there: dict) -> None:
    saved_dist = meta["optimizer"]["distributed"]
    now_dist = is_distributed_optimizer(optimizer)
    if saved_dist != now_dist:
        raise CheckpointError(
            f"{path} was written with optim.megatron.use_distributed_optimizer={str(saved_dist).lower()}, "
            f"this run has {str(now_dist).lower()}: the two store the optimizer state differently; "
            f"resume with the setting that wrote it")
    if now_dist:
        keys = ("tp", "pp", "pp_layers", "vpp", "ep", "etp", "cp")
        changed = {k: (there.get(k), here.get(k)) for k in keys if there.get(k) != here.get(k)}
        if "pp" in changed:  # another PP size splits the layers differently anyway
            changed.pop("pp_layers", None)
        if changed:
            desc = ", ".join(f"{k.upper()} {a} -> {b}" for k, (a, b) in changed.items())
            raise CheckpointError(
                f"{path} holds a distributed-optimizer state in the '{DISTOPT_SHARDING}' format, which "
                f"reshards across data-parallel size only, not {desc}. Resume at "
                + ", ".join(f"{k.upper()}={there.get(k)}" for k in keys)
                + f" (any DP size), or start from its weights alone: model.ckpt_dir={path} with a "
                f"fresh run directory (the Adam moments restart)")


@dataclass(frozen=True)
class _Slot:
    index: int


def _prime_adam_state(optimizer) -> None:
    """Give a fresh distributed optimizer's torch Adam an initial state (zeros, step 0).

    Its ``state_dict()`` reads every parameter's ``step`` (megatron-core 0.16.1 without Apex/TE:
    ``assert len(steps) == 1``), and ``sharded_state_dict(is_loading=True)`` calls it before
    anything is loaded, while megatron's own ``init_state_fn`` creates the moments but no step.
    The loaded checkpoint overwrites all of it.
    """
    for sub in _torch_optimizers(optimizer):
        for group in sub.param_groups:
            for p in group["params"]:
                state = sub.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state.setdefault("exp_avg", torch.zeros_like(p.data))
                    state.setdefault("exp_avg_sq", torch.zeros_like(p.data))


def _torch_optimizers(optimizer) -> list:
    """The torch Adams inside (the path megatron takes without Apex / Transformer Engine). Not
    TE / Apex FusedAdam (their step lives in the param groups) nor the HybridDeviceOptimizer of
    ``optimizer_cpu_offload`` (its own load branch: a dummy step, then one step copy per
    parameter): neither needs the fixes below."""
    return [inner.optimizer for inner in getattr(optimizer, "chained_optimizers", [optimizer])
            if type(inner.optimizer) in (torch.optim.Adam, torch.optim.AdamW)]


def _restore_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam ``step`` again, the one the checkpoint's param groups hold.

    The distributed optimizer's load (0.16.1, torch Adam) assigns ONE step tensor to every
    parameter's state and then copies the bucket's stale step into it: the resumed Adam would
    use step 0 for its bias correction (measured: a resumed update off by half its size), and a
    shared tensor would be incremented once per parameter at each step.
    """
    for sub in _torch_optimizers(optimizer):
        for group in sub.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                if p in sub.state:
                    sub.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def _optimizer_tensors(opt_sd: dict) -> list:
    """Take the sharded entries out of a plain optimizer's state dict (in place: each becomes a
    ``_Slot``), as a list to load. Keys are not unique: each local expert is its own shard of
    one key."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    entries: list = []

    def take(value):
        if isinstance(value, ShardedBase):
            entries.append(value)
            return _Slot(len(entries) - 1)
        return value

    dict_list_map_inplace(take, opt_sd)
    return entries


def _find(tree, key: str) -> list:
    found = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key:
                found.append(v)
            else:
                found.extend(_find(v, key))
    elif isinstance(tree, list):
        for v in tree:
            found.extend(_find(v, key))
    return found


def _fill_optimizer_state(opt_sd: dict, tensors: list, saved_common: dict) -> dict:
    """This run's optimizer state dict with the checkpoint's tensors and step (see the module
    docstring: how EP>1 <-> EP=1 is re-mapped). Param groups stay this run's."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

    def fill(value):
        if isinstance(value, _Slot):
            return tensors[value.index]
        if isinstance(value, LocalNonpersistentObject):
            return value.unwrap()
        return value

    dict_list_map_inplace(fill, opt_sd)
    steps = _find(saved_common, "common_step")
    if steps:
        # Megatron stores one step for all parameters ("common_step" beside the state); a
        # freshly built optimizer may have none yet, so set it in every torch-optimizer dict.
        step = steps[0]

        def set_step(tree) -> None:
            if isinstance(tree, dict):
                if "state" in tree and "param_groups" in tree:
                    tree["state"]["common_step"] = step.clone() if isinstance(step, torch.Tensor) else step
                for value in tree.values():
                    set_step(value)

        set_step(opt_sd)
    scalers = _find(saved_common, "grad_scaler")
    if scalers and len(scalers) == len(_find(opt_sd, "grad_scaler")):
        it = iter(scalers)

        def set_scaler(tree) -> None:
            if isinstance(tree, dict):
                for k in tree:
                    if k == "grad_scaler":
                        tree[k] = next(it)
                    else:
                        set_scaler(tree[k])

        set_scaler(opt_sd)
    return opt_sd


def _load_legacy(path: Path, meta: dict, model_chunks, optimizer) -> dict:
    """A checkpoint of the earlier per-rank format: same layout, plain optimizer only."""
    if optimizer is not None and is_distributed_optimizer(optimizer):
        raise CheckpointError(
            f"{path} is a v1 per-rank checkpoint written with the distributed optimizer, whose "
            f"state_dict() left out the parameter state (fp32 weights, Adam moments): it cannot be "
            f"resumed. Start a new run directory from its weights: model.ckpt_dir is not possible "
            f"for v1 either, so re-run from the initial weights, or resume it once with "
            f"use_distributed_optimizer=false to rewrite it (Adam moments are then re-initialised)")
    old = {k: meta["layout"][k] for k in ("world_size", "tp", "pp", "ep", "cp")}
    new = {k: layout()[k] for k in old}
    if old != new:
        raise CheckpointError(
            f"{path} is a v1 per-rank checkpoint (step_N/rank_*.pt) written with layout {old}; this run "
            f"has {new}. v1 checkpoints resume only at their own layout: resume there once, and the "
            f"next save writes the resharding iter_N format")
    payload = torch.load(path / f"rank_{_rank():05d}.pt", weights_only=False)
    if len(payload["model"]) != len(model_chunks):
        raise CheckpointError(f"{path}: {len(payload['model'])} model chunks, this run has {len(model_chunks)}")
    for chunk, state in zip(model_chunks, payload["model"]):
        chunk.load_state_dict(state)
    if optimizer is not None and payload["optimizer"] is not None:
        optimizer.load_state_dict(payload["optimizer"])
    _set_rng_state(payload["rng"])
    if _rank() == 0:
        print(f"resumed a v1 checkpoint {path}; the next save uses the {FORMAT} layout", flush=True)
    return meta


# --- model weights only (initial checkpoints) ------------------------------------------------

def is_dist_checkpoint(path: str | Path) -> bool:
    """A Megatron dist checkpoint (ours, Megatron-LM's or Megatron-Bridge's), or its parent."""
    path = Path(path)
    return (path / TRACKER).is_file() or (path / "metadata.json").is_file()


def load_model_weights(model_chunks, path: str | Path) -> Path:
    """Load only the model from a dist checkpoint (e.g. Megatron-Bridge's ``torch_dist`` output
    or one of our training checkpoints) at this run's layout; returns the directory read."""
    ckpt_dir = resolve_checkpoint_dir(path)
    check_complete(ckpt_dir)
    state = model_sharded_state_dict(model_chunks)
    _check_shapes(ckpt_dir, state)
    loaded = _dist_load(state, ckpt_dir)
    for key, chunk in zip(_model_keys(model_chunks), model_chunks):
        _inner(chunk).load_state_dict(loaded[key], strict=True)
    return ckpt_dir

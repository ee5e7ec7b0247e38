"""sapo_megatron's Megatron-Core checkpoint: full tensors, layout-free, written group by group.

Layout of a checkpoint directory ``C``::

    C/sapo_checkpoint.json      format name + version, architecture, HF config, our ModelConfig
    C/.metadata                 torch.distributed.checkpoint metadata covering every tensor
    C/parts/<group>/__0_0.distcp  tensor data, one part per group (embedding, layer_00000, ..., final)

Tensors are keyed by their Megatron-Core single-rank (TP=PP=EP=1, local spec) names and stored
whole, in the dtype they came in. That makes the checkpoint independent of the parallel layout:
a rank reads only the full tensors it needs and slices them with
:mod:`sapo_megatron.step.sharding`. (Megatron's own ``dist_checkpointing.save`` needs the
whole model's sharded state dict in memory and CUDA in its writer; this format needs neither.)

Each group is written by its own ``torch.distributed.checkpoint.save`` (no_dist), so memory
holds one group; at the end the per-part metadata is merged into ``C/.metadata`` with paths
relative to ``C``, so ``C`` is one ordinary DCP checkpoint that ``dcp.load`` reads directly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import warnings
from pathlib import Path

import torch

FORMAT = "sapo_megatron.mcore_full"
FORMAT_VERSION = 1
META_FILE = "sapo_checkpoint.json"


def _part_name(group) -> str:
    return group if isinstance(group, str) else f"layer_{int(group):05d}"


def write_part(ckpt_dir: str | os.PathLike, group, tensors: dict[str, torch.Tensor]) -> int:
    """Write one group's full tensors as ``parts/<group>`` of the checkpoint in ``ckpt_dir``;
    returns their bytes. Any process may write any part (the parallel ``save_from_model`` has
    one writer per group); the process holding the :class:`McoreCheckpointWriter` adopts it."""
    import torch.distributed.checkpoint as dcp

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with warnings.catch_warnings():
        # no_dist is deliberate: only this process writes this part (DCP warns about it).
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(Path(ckpt_dir) / "parts" / _part_name(group))),
                 no_dist=True)
    return sum(t.numel() * t.element_size() for t in tensors.values())


class McoreCheckpointWriter:
    def __init__(self, out_dir: str | os.PathLike, *, architecture: str, hf_config: dict, model_config: dict):
        self.dir = Path(out_dir)
        if (self.dir / META_FILE).exists() or (self.dir / ".metadata").exists():
            raise ValueError(f"{self.dir} already holds a checkpoint; choose an empty directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": architecture,
            "hf_config": hf_config,
            "model_config": model_config,
        }
        self._parts: list[str] = []
        self.total_bytes = 0

    def write_group(self, group, tensors: dict[str, torch.Tensor]) -> None:
        self.total_bytes += write_part(self.dir, group, tensors)
        self.adopt(group)

    def adopt(self, group) -> None:
        """Take in a part that another process wrote with :func:`write_part` (before :meth:`close`)."""
        self._parts.append(f"parts/{_part_name(group)}")

    def close(self) -> None:
        """Merge the parts' metadata into ``C/.metadata`` and write ``sapo_checkpoint.json``."""
        import torch.distributed.checkpoint as dcp

        merged = None
        for part in self._parts:
            md = dcp.FileSystemReader(str(self.dir / part)).read_metadata()
            storage = {
                index: dataclasses.replace(info, relative_path=f"{part}/{info.relative_path}")
                for index, info in md.storage_data.items()
            }
            if merged is None:
                merged = dataclasses.replace(md, state_dict_metadata={}, storage_data={})
            clash = set(md.state_dict_metadata) & set(merged.state_dict_metadata)
            if clash:
                raise ValueError(f"tensors written twice: {sorted(clash)[:5]}")
            merged.state_dict_metadata.update(md.state_dict_metadata)
            merged.storage_data.update(storage)
            os.remove(self.dir / part / ".metadata")
        tmp = self.dir / ".metadata.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(merged, f)
        os.replace(tmp, self.dir / ".metadata")
        (self.dir / META_FILE).write_text(json.dumps(self.meta, indent=2) + "\n")


def _describe_foreign(path: Path) -> str:
    """Why ``path`` is not one of our checkpoints, as precisely as we can tell."""
    if (path / "metadata.json").is_file():
        try:
            backend = json.loads((path / "metadata.json").read_text()).get("sharded_backend")
        except (OSError, ValueError):
            backend = None
        return (
            f"{path} is a Megatron-Core dist_checkpointing checkpoint (sharded_backend={backend!r}), "
            f"not a {FORMAT} checkpoint"
        )
    if (path / "latest_checkpointed_iteration.txt").is_file() or any(path.glob("iter_*")):
        return f"{path} is a Megatron training checkpoint root (iter_*/), not a {FORMAT} checkpoint"
    if any(path.glob("mp_rank_*")):
        return (
            f"{path} is a legacy per-rank Megatron checkpoint (mp_rank_*), tied to the TP/PP layout "
            f"that wrote it; {FORMAT} stores full tensors"
        )
    if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()):
        return f"{path} is a Hugging Face model directory; pass it as --hf-dir (or convert it with hf-to-mcore)"
    return f"{path} has no {META_FILE}; it is not a {FORMAT} checkpoint"


class McoreCheckpoint:
    """Read access to a checkpoint written by :class:`McoreCheckpointWriter`."""

    def __init__(self, ckpt_dir: str | os.PathLike):
        import torch.distributed.checkpoint as dcp

        self.dir = Path(ckpt_dir)
        if not self.dir.is_dir():
            raise ValueError(f"checkpoint directory {self.dir} does not exist")
        meta_path = self.dir / META_FILE
        if not meta_path.is_file():
            raise ValueError(_describe_foreign(self.dir))
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} has format {self.meta.get('format')!r}, expected {FORMAT!r}")
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path} has format_version {self.meta.get('format_version')!r}; this reader "
                f"understands version {FORMAT_VERSION}"
            )
        if not (self.dir / ".metadata").is_file():
            raise ValueError(f"{self.dir} has no .metadata: the conversion that wrote it did not finish")
        self._reader = dcp.FileSystemReader(str(self.dir))
        self._tensors = self._reader.read_metadata().state_dict_metadata

    @property
    def hf_config(self) -> dict:
        return self.meta["hf_config"]

    @property
    def architecture(self) -> str:
        return self.meta["architecture"]

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].size)

    def load(self, names) -> dict[str, torch.Tensor]:
        """Full tensors for ``names`` (read only those)."""
        import torch.distributed.checkpoint as dcp

        missing = [n for n in names if n not in self._tensors]
        if missing:
            raise ValueError(
                f"checkpoint {self.dir} has no tensor(s) {missing[:5]} "
                f"({len(missing)} missing); was it written for a different model config?"
            )
        out = {
            n: torch.empty(tuple(self._tensors[n].size), dtype=self._tensors[n].properties.dtype)
            for n in names
        }
        if out:
            with warnings.catch_warnings():
                # no_dist is deliberate: each rank reads its own tensors (DCP warns about it).
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(out, storage_reader=dcp.FileSystemReader(str(self.dir)), no_dist=True)
        return out

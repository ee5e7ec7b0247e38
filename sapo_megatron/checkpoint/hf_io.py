"""Streaming read and write of Hugging Face safetensors checkpoints.

Reading opens one shard at a time with ``safe_open`` (memory-mapped) and :meth:`release` drops
the mapping after each conversion group, so resident memory stays at about one layer's tensors
however large the shards are. Writing streams each tensor to disk as it comes (see
:class:`_StreamingShard`) and starts a new shard past ``max_shard_bytes``; one shard becomes
``model.safetensors``, several become ``model-0000k-of-0000n.safetensors`` plus
``model.safetensors.index.json``, as ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _safe_open(path: Path):
    from safetensors import safe_open

    return safe_open(str(path), framework="pt", device="cpu")


class HFCheckpoint:
    """An HF model directory: ``config.json`` plus safetensors shards (indexed or not)."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise ValueError(f"HF checkpoint directory {self.dir} does not exist")
        config = self.dir / "config.json"
        if not config.is_file():
            raise ValueError(f"{self.dir} has no config.json; is this a Hugging Face model directory?")
        self.config: dict = json.loads(config.read_text())
        self.weight_map = self._weight_map()
        self._open_name: str | None = None
        self._open_handle = None

    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            absent = [f for f in files if not (self.dir / f).is_file()]
            if absent:
                names = [n for n, f in weight_map.items() if f == absent[0]]
                raise ValueError(
                    f"{index} names shard file(s) {absent} that are absent from {self.dir} "
                    f"({absent[0]} holds {len(names)} tensors, e.g. {names[0]!r})"
                )
            return weight_map
        files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            if any(self.dir.glob("*.bin")) or any(self.dir.glob("*.pt")):
                raise ValueError(f"{self.dir} holds pickled weights (.bin/.pt); only safetensors are read")
            raise ValueError(f"{self.dir} has no *.safetensors files and no {INDEX}")
        weight_map = {}
        for f in files:
            with _safe_open(self.dir / f) as handle:
                for name in handle.keys():
                    weight_map[name] = f
        return weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise ValueError(f"HF checkpoint {self.dir} has no tensor {name!r}")
        file = self.weight_map[name]
        if file != self._open_name:
            self.release()
            self._open_handle = _safe_open(self.dir / file)
            self._open_name = file
        return self._open_handle

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def release(self) -> None:
        """Unmap the open shard (its touched pages would otherwise count as resident)."""
        self._open_handle = None
        self._open_name = None


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


class _StreamingShard:
    """One safetensors file written tensor by tensor.

    The safetensors header (names, shapes, offsets) precedes the data, so tensor bytes go to a
    side file as they arrive and are copied behind the header at the end: memory holds one
    tensor, not the shard.
    """

    def __init__(self, path: Path):
        self.path = path
        self._data_path = path.with_name(path.name + ".data")
        self._data = open(self._data_path, "wb")
        self.header: dict[str, dict] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._data.write(raw.data)
        self.header[name] = {
            "dtype": _ST_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.nbytes, self.nbytes + raw.nbytes],
        }
        self.nbytes += raw.nbytes

    def close(self, final_path: Path) -> None:
        import shutil

        self._data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # safetensors aligns the data start to 8 bytes
        with open(final_path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 64 * 1024**2)
        os.remove(self._data_path)


class PlannedShard:
    """One safetensors file whose tensors (names, dtypes, shapes) are known before any data.

    Used by the parallel export, where every rank knows every shard's contents from the export
    plan: the header (built by hand, per the safetensors format: 8-byte little-endian header
    length, JSON header padded to 8 bytes, then the raw bytes at the header's ``data_offsets``)
    is written first, and every byte range is then written in place with ``pwrite``, in any
    order and by any rank: the owner (``owner=True``) creates the file at its full size, and
    other ranks (tensor-parallel holders of row slices) open the same file after it exists and
    write their own rows. No side file, no second copy. The owner renames it into place at
    :meth:`close` (after every writer closed): a reader never sees a half-written shard.
    """

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], *, owner: bool = True):
        self.path = Path(path)
        self.owner = owner
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        header, offset = {}, 0
        for name, dtype, shape in entries:
            if dtype not in _ST_DTYPES:
                raise ValueError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        self._data_start = 8 + len(raw)
        self._ranges = {name: tuple(h["data_offsets"]) for name, h in header.items()}
        self._fd = None
        if owner:
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(self._fd, self._data_start + offset)
            self._pwrite(len(raw).to_bytes(8, "little") + raw, 0)

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:  # one write stops at about 2 GiB on Linux
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def write(self, name: str, tensor: torch.Tensor, byte_offset: int = 0) -> None:
        """Write the bytes of ``tensor`` (contiguous, on the host) at ``byte_offset`` within the
        data of tensor ``name`` (0: the tensor starts there; it may be the whole or a row slice)."""
        if self._fd is None:  # a co-writer opens the file the owner created
            self._fd = os.open(self._tmp, os.O_WRONLY)
        start, end = self._ranges[name]
        raw = tensor.detach().reshape(-1).view(torch.uint8)
        if not tensor.is_contiguous() or tensor.device.type != "cpu" or byte_offset + raw.numel() > end - start:
            raise ValueError(f"{self.path.name}: {name!r} takes {end - start} bytes; got a {tuple(tensor.shape)} "
                             f"{tensor.dtype} tensor on {tensor.device} at byte {byte_offset} "
                             f"(contiguous={tensor.is_contiguous()})")
        self._pwrite(raw.numpy(), self._data_start + start + byte_offset)

    def flush(self, *, fsync: bool = False) -> None:
        """This rank is done writing (co-writers call it before the owner's :meth:`close`)."""
        if self._fd is not None:
            if fsync:
                os.fsync(self._fd)
            if not self.owner:
                os.close(self._fd)
                self._fd = None

    def close(self, *, fsync: bool = False) -> None:
        """The owner, after every co-writer flushed: the file goes under its name."""
        self.flush(fsync=fsync)
        os.close(self._fd)
        self._fd = None
        os.replace(self._tmp, self.path)


class HFShardWriter:
    """Write tensors to safetensors shards of at most ``max_shard_bytes`` (one tensor may exceed it)."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 4 * 1024**3):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._shards: list[_StreamingShard] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        current = self._shards[-1] if self._shards else None
        if current is None or (current.header and current.nbytes + nbytes > self.max_shard_bytes):
            current = _StreamingShard(self.dir / f"part-{len(self._shards):05d}.tmp")
            self._shards.append(current)
        current.add(name, tensor)
        self.total_bytes += nbytes

    def close(self) -> list[str]:
        """Write the shards under the names ``save_pretrained`` uses; returns the file names."""
        n = len(self._shards)
        if n == 1:
            self._shards[0].close(self.dir / SINGLE)
            return [SINGLE]
        weight_map, files = {}, []
        for k, shard in enumerate(self._shards):
            file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            shard.close(self.dir / file)
            files.append(file)
            weight_map.update({name: file for name in shard.header})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files


def fsync_path(path: str | os.PathLike) -> None:
    """Flush the file at ``path`` to stable storage (a file another process wrote and closed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_hf_config(out_dir: str | os.PathLike, hf_config: dict) -> None:
    Path(out_dir, "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")

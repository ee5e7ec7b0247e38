"""Delta weight sync, server side: SGLang's ``--custom-weight-loader`` hook and the delta codec.

Launch every server with ``--custom-weight-loader sapo_sglang.delta_loader.apply_delta``. The
trainer (``sapo_megatron.rollout.sglang.weight_sync.delta``) then sends
``/update_weights_from_tensor`` with ``load_format: "sapo_sglang.delta_loader.apply_delta"`` and
ONE empty tensor whose NAME is a JSON message naming the delta files on the shared filesystem.
SGLang 0.5.23 calls ``apply_delta(model, named_tensors)`` in every TP rank's scheduler process
(``model_runner_components/weight_updater.py:374``).

Why a name and an empty tensor: the endpoint's payload is unpickled by SGLang's
``SafeUnpickler``; a CPU tensor with data travels as a shared-memory handle (same host only),
but an EMPTY one rebuilds from ``rebuild_storage_empty`` (allowed) and crosses hosts.

How a delta is applied: each process keeps a host copy of the HF tensors the server holds (read
once from the last full sync's directory), applies the delta there and hands only the changed
HF tensors to ``model.load_weights``; SGLang's own weight loaders then fuse and TP-shard them
(``qkv_proj``, ``gate_up_proj``, experts' ``w13``) exactly as they do for a disk load. That
keeps this file independent of every architecture's parameter layout. A delta comes as one file
per trainer rank: each rank diffs only the part of each HF tensor it holds (a run of rows, or of
columns for a row-parallel slice), named in the file's metadata (``regions``), so the trainer
never gathers a tensor (:func:`apply_parts`). The checksum's digests are per region too.

The hook must never raise: SGLang does not catch a custom loader's exception and the scheduler
would die. Every outcome (applied, or the error) goes to an ack file next to the delta, which
the trainer reads; an error there makes the trainer fall back to a full sync.

The codec (``encode`` / ``apply``) is pure and shared with the trainer: a changed element is a
bit pattern that differs (so -0.0/NaN compare exactly); each tensor travels as whichever is
smallest of its changed indices + values, uint8 gaps between them + values (the usual winner at
RL densities, 1-12 % changed: 3 B per changed bf16 element), a bitmap + values, or the full
tensor. Indices and gaps apply in O(changed elements): every TP process of every server applies
the whole delta, so the server's cost matters more than the trainer's, which is spread over its
ranks.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import traceback

import numpy as np
import torch

from sapo_sglang import kernels

PREFIX = "sapo_delta:"
LOADER = "sapo_sglang.delta_loader.apply_delta"
FULL, INDEX, GAP, BITMAP, VALUES = "@full", "@idx", "@gap", "@bits", "@val"
MAX_GAP = 255  # a uint8 gap; a longer one is bridged by rewriting unchanged elements (their own bits)

INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # bit-pattern views (the trainer too)


# ----------------------------------------------------------------------------- the codec (pure)
# Vectorised through numpy views of the tensors' bits (no copies, no per-element Python): numpy's
# flatnonzero / packbits / place run 5-10x faster than torch's nonzero and boolean indexing on a
# CPU (16 M bf16 elements at 7 % changed: encode 0.1 s instead of 0.8 s, apply 0.05 s instead of 0.44 s).
def _bits(t: torch.Tensor) -> np.ndarray:
    """The flat bit patterns of ``t`` (CPU, contiguous) as a numpy integer view: writes go to ``t``."""
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"delta codec: expected a contiguous CPU tensor, got {t.device} contiguous={t.is_contiguous()}")
    return t.reshape(-1).view(INT_OF[t.element_size()]).numpy()


def _tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).view(dtype)


def changed_mask(old: torch.Tensor, new: torch.Tensor) -> np.ndarray:
    if old.shape != new.shape or old.dtype != new.dtype:
        raise ValueError(f"delta of tensors {tuple(old.shape)} {old.dtype} -> {tuple(new.shape)} {new.dtype}: "
                         "expected the same shape and dtype")
    return _bits(old) != _bits(new)


def pack_bits(mask) -> torch.Tensor:
    """A flat bool mask as uint8, 8 elements per byte, little-endian within a byte."""
    mask = mask.numpy() if isinstance(mask, torch.Tensor) else mask
    return torch.from_numpy(np.packbits(mask.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    if packed.numel() != (numel + 7) // 8:
        raise ValueError(f"bitmap of {packed.numel()} bytes for {numel} elements: expected {(numel + 7) // 8}")
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=numel, bitorder="little").view(np.bool_))


def gap_positions(positions: np.ndarray, gaps: np.ndarray | None = None) -> np.ndarray:
    """``positions`` (sorted, distinct) plus the bridging positions a uint8 gap encoding needs:
    wherever two changed elements (or the start and the first) lie more than :data:`MAX_GAP`
    apart, every ``MAX_GAP``-th element between them is listed too (written with its own, unchanged
    bits). ``gaps``: ``np.diff(positions, prepend=-1)`` when the caller has it. Vectorised."""
    gaps = np.diff(positions, prepend=-1) if gaps is None else gaps
    long = np.flatnonzero(gaps > MAX_GAP)
    if not long.size:
        return positions
    extra = np.zeros(positions.size, dtype=np.int64)
    extra[long] = (gaps[long] - 1) // MAX_GAP  # bridging elements before each position
    counts = extra + 1
    starts = np.cumsum(counts) - counts
    within = np.arange(int(counts.sum())) - np.repeat(starts, counts)
    out = np.repeat(positions - gaps, counts) + MAX_GAP * (within + 1)
    out[starts + extra] = positions  # each group ends on its changed element
    return out


def encoding_sizes(n: int, item: int, k: int, bridged: int) -> dict[str, int]:
    """Bytes of each encoding of ``k`` changed elements of ``n`` (``bridged``: the gap
    encoding's entries, bridging ones included)."""
    index = 4 if n < 2**31 else 8
    return {INDEX: k * (index + item), GAP: bridged * (1 + item), BITMAP: (n + 7) // 8 + k * item, FULL: n * item}


def encode_positions(name: str, new: torch.Tensor, positions: np.ndarray) -> dict[str, torch.Tensor]:
    """The smallest encoding of ``new`` (contiguous) given the sorted flat ``positions`` of its
    changed elements: int32/int64 indices + values, uint8 gaps + values, a bitmap + values, or
    the whole tensor. Gaps and indices apply in O(changed); a bitmap costs a pass over the tensor
    on every server process, so it wins only where it is clearly smaller (dense changes)."""
    n, item = new.numel(), new.element_size()
    if positions.size == 0:
        return {}
    gaps = np.diff(positions, prepend=-1)
    long = gaps > MAX_GAP
    bridged = positions.size + (int(((gaps[long] - 1) // MAX_GAP).sum()) if long.any() else 0)
    sizes = encoding_sizes(n, item, positions.size, bridged)
    best = min(sizes, key=sizes.get)
    bits = _bits(new)
    if best == FULL:
        return {name + FULL: new}
    if best == GAP:
        if bridged != positions.size:
            positions = gap_positions(positions, gaps)
            gaps = np.diff(positions, prepend=-1)
        return {name + GAP: torch.from_numpy(gaps.astype(np.uint8)), name + VALUES: _tensor(bits[positions], new.dtype)}
    values = _tensor(bits[positions], new.dtype)
    if best == INDEX:
        return {name + INDEX: torch.from_numpy(positions.astype(np.int32 if n < 2**31 else np.int64)),
                name + VALUES: values}
    mask = np.zeros(n, dtype=np.bool_)
    mask[positions] = True
    return {name + BITMAP: pack_bits(mask), name + VALUES: values}


def encode(name: str, old: torch.Tensor, new: torch.Tensor) -> dict[str, torch.Tensor]:
    """The smallest encoding of ``new`` given ``old`` (``{}`` when nothing changed)."""
    return encode_positions(name, new.contiguous(), np.flatnonzero(changed_mask(old, new)))


def apply(target: torch.Tensor, parts: dict[str, torch.Tensor], name: str) -> bool:
    """Apply ``name``'s encoding in ``parts`` to ``target`` in place; False when it has none.
    ``target`` may be a view: a run of columns of a matrix takes a gap encoding in place (the
    compiled kernel), anything else goes through a contiguous copy."""
    if not target.is_contiguous():
        if _gaps_into_columns(target, parts, name):
            return True
        work = target.contiguous()
        applied = apply(work, parts, name)
        if applied:
            target.copy_(work)
        return applied
    if name + FULL in parts:
        full = parts[name + FULL]
        if full.shape != target.shape or full.dtype != target.dtype:
            raise ValueError(f"delta of {name!r}: full tensor {tuple(full.shape)} {full.dtype}, expected "
                             f"{tuple(target.shape)} {target.dtype}")
        target.copy_(full)
        return True
    if name + VALUES not in parts:
        return False
    flat, vals = _bits(target), _values(target, parts, name)
    if name + GAP in parts:
        gaps, fast = _checked_gaps(parts, name, vals, flat.size)
        if fast is not None:  # one ascending pass
            fast.gap_apply(gaps, vals, flat)
        else:
            flat[np.cumsum(gaps, dtype=np.int64) - 1] = vals
    elif name + INDEX in parts:
        idx = parts[name + INDEX].numpy()
        if idx.size != vals.size or (idx.size and (int(idx.min()) < 0 or int(idx.max()) >= flat.size)):
            raise ValueError(f"delta of {name!r}: {idx.size} indices for {vals.size} values into "
                             f"{flat.size} elements")
        flat[idx] = vals
    else:
        mask = unpack_bits(parts[name + BITMAP], flat.size).numpy()
        if int(np.count_nonzero(mask)) != vals.size:
            raise ValueError(f"delta of {name!r}: bitmap marks {int(np.count_nonzero(mask))} elements, "
                             f"{vals.size} values")
        np.place(flat, mask, vals)
    return True


def _values(target: torch.Tensor, parts: dict[str, torch.Tensor], name: str) -> np.ndarray:
    values = parts[name + VALUES]
    if values.dtype != target.dtype:
        raise ValueError(f"delta of {name!r}: values in {values.dtype}, expected {target.dtype}")
    return _bits(values.contiguous())


def _checked_gaps(parts: dict[str, torch.Tensor], name: str, vals: np.ndarray, numel: int):
    """``(gaps, kernels or None)`` once the gaps are known to fit ``numel`` elements (checked
    before anything is written: a corrupt file leaves the copy untouched)."""
    gaps = parts[name + GAP].numpy()
    if gaps.size != vals.size or (gaps.size and (int(gaps.min()) < 1)):
        raise ValueError(f"delta of {name!r}: {gaps.size} gaps for {vals.size} values, or a zero gap")
    last = int(gaps.sum(dtype=np.int64)) - 1
    if last >= numel:
        raise ValueError(f"delta of {name!r}: gaps reach element {last} of {numel}")
    return gaps, (kernels.delta_kernels() if vals.itemsize in kernels.DeltaKernels.WIDTHS else None)


def _gaps_into_columns(target: torch.Tensor, parts: dict[str, torch.Tensor], name: str) -> bool:
    """A gap encoding applied straight into ``target``, a run of columns of a contiguous matrix
    (``matrix.narrow(1, start, length)``); False (nothing done) for any other case."""
    if (name + GAP not in parts or target.dim() != 2 or target.stride(1) != 1 or target.device.type != "cpu"
            or target.element_size() not in kernels.DeltaKernels.WIDTHS):
        return False
    fast = kernels.delta_kernels()
    if fast is None:
        return False
    vals = _values(target, parts, name)
    gaps, _ = _checked_gaps(parts, name, vals, target.numel())
    fast.gap_apply_columns(gaps, vals, target)
    return True


def names_in(parts: dict[str, torch.Tensor]) -> list[str]:
    """The HF tensor names a delta file carries."""
    out = []
    for key in parts:
        for suffix in (FULL, INDEX, GAP, BITMAP):
            if key.endswith(suffix):
                out.append(key[: -len(suffix)])
    return sorted(set(out))


def encoded_nbytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def digest(t: torch.Tensor) -> str:
    """A hash of the tensor's bytes (dtype and shape included): equal iff bit-identical."""
    h = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode(), digest_size=16)
    h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {name: digest(t) for name, t in tensors.items()}


# ----------------------------------------------------------------------------- the server's hook
_STATE: dict = {"key": None, "tensors": None}  # per scheduler process: (run, version) and its HF copy


def message(**fields) -> str:
    return PREFIX + json.dumps(fields, sort_keys=True)


def load_dir(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in the full-sync directory {path!r}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f, device="cpu"))
    return out


def _tp_rank() -> int:
    try:
        from sglang.srt.runtime_context import get_parallel

        return int(get_parallel().tp_rank)
    except Exception:  # outside a server (tests): one process
        return 0


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def region_key(name: str, region) -> str:
    """The name of one region of HF tensor ``name`` (``None``: the whole tensor)."""
    return name if region is None else f"{name}|{region[0]}|{region[1]}|{region[2]}"


def region_view(tensor: torch.Tensor, region) -> torch.Tensor:
    """``tensor.narrow(dim, start, length)`` for ``region = (dim, start, length)``; ``None``: all of it."""
    if region is None:
        return tensor
    dim, start, length = (int(x) for x in region)
    if not (0 <= dim < tensor.dim() and 0 <= start and start + length <= tensor.shape[dim]):
        raise ValueError(f"delta region {region} outside a tensor of shape {tuple(tensor.shape)}")
    return tensor.narrow(dim, start, length)


def read_delta_file(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """One trainer rank's delta file: its parts and its metadata (``regions``: the part of each
    HF tensor this rank holds, by name; ``pieces``: every region it holds, for the checksum)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        parts = {k: f.get_tensor(k) for k in f.keys()}
    return parts, {k: json.loads(v) for k, v in meta.items() if k in ("regions", "pieces")}


def apply_parts(tensors: dict[str, torch.Tensor], parts: dict[str, torch.Tensor], regions: dict) -> list[str]:
    """Apply one file's parts to the HF copy ``tensors`` in place; returns the HF names changed.
    A part covers its tensor's region (``regions[name]``, whole when absent): a run of rows is
    contiguous, a run of columns (a row-parallel weight's slice) is a strided view (:func:`apply`)."""
    unknown = [n for n in names_in(parts) if n not in tensors]
    if unknown:
        raise KeyError(f"delta names tensors this server's copy lacks: {unknown[:3]}")
    changed = []
    for name in names_in(parts):
        if apply(region_view(tensors[name], regions.get(name)), parts, name):
            changed.append(name)
    return changed


def region_digests(tensors: dict[str, torch.Tensor], pieces: dict) -> dict[str, str]:
    """Digests of the regions the trainer names (``{key: [name, region]}``), over the HF copy."""
    return {key: digest(region_view(tensors[name], region).contiguous()) for key, (name, region) in pieces.items()}


def apply_message(model, msg: dict, state: dict) -> dict:
    """Apply one delta message to ``state`` (and ``model`` unless None); returns the ack.

    The copy's key is (run, base directory, version): a full sync always names a new base
    directory, so after one (a fallback, a re-sync) the key no longer matches and the copy is
    rebuilt from that directory, even where the version happens to be the same. It is rebuilt
    only when the trainer says the server's last load was that full sync (``fresh``): a server
    that restarted after taking deltas holds neither the base nor the chain."""
    run, src, dst = msg["run"], int(msg["from"]), int(msg["to"])
    base = msg.get("base") or {}
    if state["key"] != [run, base.get("dir"), src]:
        if not msg.get("fresh"):  # the server took deltas since its full load: its copy is gone (a restart?)
            raise RuntimeError(f"this server's delta copy is at {state['key']}, expected {[run, base.get('dir'), src]}; "
                               "the server took deltas since its last full sync (restarted?): a full sync is needed")
        if int(base.get("version", -1)) != src:
            raise RuntimeError(f"this server's delta copy is at {state['key']}, the delta goes from "
                               f"{[run, base.get('dir'), src]} and the last full sync {base} is not that version: "
                               "a full sync is needed")
        state["key"], state["tensors"] = None, load_dir(base["dir"])
        state["key"] = [run, base["dir"], src]
    tensors = state["tensors"]
    state["key"] = None  # half-applied until the end
    changed: set[str] = set()
    pieces: dict = {}
    for path in msg["files"]:  # one file per trainer rank: each holds its own regions
        parts, meta = read_delta_file(path)
        changed.update(apply_parts(tensors, parts, meta.get("regions", {})))
        pieces.update(meta.get("pieces", {}))
    if model is not None and changed:
        model.load_weights([(name, tensors[name]) for name in sorted(changed)])
    state["key"] = [run, base.get("dir"), dst]
    ack = {"ok": True, "run": run, "version": dst, "changed": len(changed),
           "native": kernels.delta_kernels() is not None}  # the compiled kernels, or numpy
    if msg.get("checksum"):
        ack["digests"] = region_digests(tensors, pieces) if pieces else digests(tensors)
    return ack


def apply_delta(model, named_tensors) -> None:
    """SGLang's hook (``fn(model, named_tensors)``). Never raises: the outcome goes to the ack file."""
    for name, _ in named_tensors:
        if not name.startswith(PREFIX):
            continue  # not ours: nothing to do
        ack_path = None
        try:
            msg = json.loads(name[len(PREFIX):])
            ack_path = f"{msg['ack']}.tp{_tp_rank()}.json"
            ack = apply_message(model, msg, _STATE)
        except Exception as err:  # noqa: BLE001 - reported to the trainer, never raised into SGLang
            _STATE["key"], _STATE["tensors"] = None, None
            ack = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
        if ack_path:
            try:
                _write_json(ack_path, ack)
            except OSError:
                pass


def host_bytes(model_bytes: int, tp_size: int) -> int:
    """What the hook keeps per server: one HF copy per TP rank's process."""
    return model_bytes * tp_size


__all__ = ["LOADER", "PREFIX", "apply", "apply_delta", "apply_parts", "digest", "digests", "encode",
           "encoded_nbytes", "load_dir", "message", "names_in", "pack_bits", "read_delta_file", "region_digests",
           "region_key", "region_view", "unpack_bits"]

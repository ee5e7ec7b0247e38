"""The delta codec's C kernels (``kernels.c``), compiled on first use; numpy does the same without them.

Trainer side: the diff (compare bit patterns, list the changed positions, update the copy, in one
pass) and the uint8 gap encoding. Server side: applying a gap encoding. Each is a fast path of
the codec in :mod:`sapo_sglang.delta_loader` and the trainer's
``sapo_megatron.rollout.sglang.weight_sync.delta_pieces``, whose numpy paths give the same output
(the tests compare them) and run wherever the kernels cannot be built. This module imports only
numpy and torch, so SGLang's venv can import it.

Why compiled at run time: Megatron-Core does the same for its dataset helpers
(``megatron.core.datasets.utils.compile_helpers``), and ``pip install`` stays free of a build step
(SGLang's venv installs this package with ``--no-deps``). The library is built with the system's
C compiler (``$CC``, else ``cc``) into ``$SAPO_MEGATRON_CACHE/native`` (default
``~/.cache/sapo_megatron/native``), keyed by the source, the compiler's version and the machine,
so a home directory shared by different nodes keeps one library per kind of node; no
``-march=native`` for the same reason. Processes that build at once (trainer ranks, a server's
TP processes) race harmlessly: each writes its own temporary file and renames it into place.

With no compiler, a failed build, or ``SAPO_MEGATRON_NATIVE=0``, :func:`delta_kernels` returns
None (one warning says why) and the callers take their numpy paths. ctypes releases the GIL
during each call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC")


def cache_dir() -> Path:
    root = os.environ.get("SAPO_MEGATRON_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sapo_megatron")
    return Path(root) / "native"


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc.split()[0]) and cc


def build(name: str = "kernels") -> Path:
    """The shared library of ``<name>.c``, built when the cache lacks it; raises with the
    compiler's output when it cannot be built."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC') or 'cc'}) on PATH")
    source = (HERE / f"{name}.c").read_bytes()
    version = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(FLAGS).encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([*cc.split(), *FLAGS, "-o", tmp, str(HERE / f"{name}.c")],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} {' '.join(FLAGS)} {name}.c failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent builder's rename wins or loses whole
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def enabled() -> bool:
    return os.environ.get("SAPO_MEGATRON_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


class DeltaKernels:
    """Typed wrappers of ``kernels.c`` on tensors and numpy arrays (CPU, contiguous)."""

    WIDTHS = (2, 4)  # element sizes with a kernel: bf16 / fp16, fp32

    def __init__(self, lib: ctypes.CDLL) -> None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._diff, self._encode, self._apply, self._apply_2d = {}, {}, {}, {}
        for width, bits in ((2, "u16"), (4, "u32")):
            fn = getattr(lib, f"sapo_gap_apply_2d_{bits}")
            fn.restype, fn.argtypes = None, [ptr, ptr, i64, ptr, i64, i64]
            self._apply_2d[width] = fn
            fn = getattr(lib, f"sapo_gap_apply_{bits}")
            fn.restype, fn.argtypes = None, [ptr, ptr, i64, ptr]
            self._apply[width] = fn
            fn = getattr(lib, f"sapo_diff_{bits}")
            fn.restype, fn.argtypes = i64, [ptr, ptr, i64, i64, ptr]
            self._diff[width] = fn
            fn = getattr(lib, f"sapo_gap_encode_{bits}")
            fn.restype, fn.argtypes = None, [ptr, i64, ptr, i64, ptr, ptr]
            self._encode[width] = fn
        self._count = lib.sapo_gap_count
        self._count.restype, self._count.argtypes = i64, [ptr, i64, i64]

    def diff(self, fresh: torch.Tensor, held: torch.Tensor, base: int, out: np.ndarray) -> int:
        """Writes ``base + i`` for every ``i`` where ``fresh`` and ``held`` (same-width bit
        patterns, contiguous) differ into ``out`` (int64, room for ``fresh.numel()``), and
        copies those elements into ``held``. Returns how many."""
        n, width = fresh.numel(), fresh.element_size()
        if (held.numel() != n or held.element_size() != width or not fresh.is_contiguous()
                or not held.is_contiguous() or out.dtype != np.int64 or out.size < n or not out.flags.c_contiguous):
            raise ValueError(f"native diff: fresh {tuple(fresh.shape)} {fresh.dtype}, held {tuple(held.shape)} "
                             f"{held.dtype}, out {out.size} {out.dtype}: expected equal contiguous sizes and an "
                             f"int64 out of at least {n}")
        return int(self._diff[width](fresh.data_ptr(), held.data_ptr(), n, base, out.ctypes.data))

    def gap_count(self, positions: np.ndarray, max_gap: int) -> int:
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        return int(self._count(positions.ctypes.data, positions.size, max_gap))

    def gap_encode(self, positions: np.ndarray, bits: np.ndarray, entries: int, max_gap: int
                   ) -> tuple[np.ndarray, np.ndarray]:
        """``(uint8 gaps, values)`` of the gap encoding (``entries`` = :meth:`gap_count`)."""
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        if not bits.flags.c_contiguous or bits.itemsize not in self._encode:
            raise ValueError(f"native gap encoding: bits of {bits.dtype} contiguous={bits.flags.c_contiguous}")
        if positions.size and (positions[0] < 0 or positions[-1] >= bits.size):
            raise ValueError(f"native gap encoding: positions {positions[0]}..{positions[-1]} outside "
                             f"{bits.size} elements")
        gaps, vals = np.empty(entries, dtype=np.uint8), np.empty(entries, dtype=bits.dtype)
        self._encode[bits.itemsize](positions.ctypes.data, positions.size, bits.ctypes.data, max_gap,
                                    gaps.ctypes.data, vals.ctypes.data)
        return gaps, vals

    def gap_apply(self, gaps: np.ndarray, values: np.ndarray, flat: np.ndarray) -> None:
        """``flat[cumsum(gaps) - 1] = values``; the caller checked ``gaps.sum() <= flat.size``."""
        if (gaps.dtype != np.uint8 or values.size != gaps.size or values.dtype != flat.dtype
                or flat.itemsize not in self._apply or not (gaps.flags.c_contiguous and values.flags.c_contiguous
                                                            and flat.flags.c_contiguous)):
            raise ValueError(f"native gap apply: {gaps.size} {gaps.dtype} gaps, {values.size} {values.dtype} values "
                             f"into {flat.dtype}: expected uint8 gaps, one value each, contiguous")
        self._apply[flat.itemsize](gaps.ctypes.data, values.ctypes.data, gaps.size, flat.ctypes.data)

    def gap_apply_columns(self, gaps: np.ndarray, values: np.ndarray, target: torch.Tensor) -> None:
        """:meth:`gap_apply` into ``target``, a 2-D view whose rows are contiguous (a run of
        columns of a matrix), in its row-major order; the caller checked the last position."""
        rows, cols = target.shape
        if (gaps.dtype != np.uint8 or values.size != gaps.size or values.itemsize != target.element_size()
                or target.element_size() not in self._apply_2d or target.stride(1) != 1 or target.device.type != "cpu"
                or not (gaps.flags.c_contiguous and values.flags.c_contiguous)):
            raise ValueError(f"native gap apply into {tuple(target.shape)} {target.dtype} strides {target.stride()}: "
                             f"expected uint8 gaps, one value each, rows contiguous on the CPU")
        self._apply_2d[target.element_size()](gaps.ctypes.data, values.ctypes.data, gaps.size, target.data_ptr(),
                                              cols, target.stride(0))


@functools.cache
def delta_kernels() -> DeltaKernels | None:
    """The delta kernels, or None (numpy paths) with one warning saying why."""
    if not enabled():
        return None
    try:
        return DeltaKernels(ctypes.CDLL(str(build())))
    except Exception as exc:  # noqa: BLE001 - any failure means the numpy path, never a failed sync
        logger.warning("sapo_sglang.kernels: the delta kernels are unavailable (%s); the delta sync uses its "
                       "numpy paths (about 2x slower on a CPU host)", exc)
        return None

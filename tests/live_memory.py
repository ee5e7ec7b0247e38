"""A live-tensor memory tracker for CPU runs: the peak bytes of tensor storages alive at once.

CPU has no caching allocator with statistics (``torch.cuda.max_memory_allocated`` is CUDA
only), so the planner's CPU check measures what it predicts -- bytes of live tensors -- by
watching every op: a ``TorchDispatchMode`` sees each op's outputs, registers each new storage
once (by its data pointer) with its size, and a weak-reference callback on the storage object
(torch keeps one Python object per live storage) subtracts it when the storage is freed. The
peak is sampled after every op, so transient buffers inside a step count. Storages that
change size in place (``resize_``) are re-read after every op.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorPeak(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0

    def _freed(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current -= entry[1]

    def _see(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or not hasattr(t, "untyped_storage"):
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key, size = st.data_ptr(), st.nbytes()
        if key == 0 or size == 0:
            return
        entry = self.live.get(key)
        if entry is not None and entry[0]() is not None:
            if entry[1] != size:  # resized in place
                self.current += size - entry[1]
                self.live[key] = (entry[0], size)
            return
        if entry is not None:
            self._freed(key)
        self.live[key] = (weakref.ref(st, lambda _r, k=key: self._freed(k)), size)
        self.current += size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._see(t)
        for t in tree_flatten((args, kwargs))[0]:  # in-place ops on inputs may resize them
            if isinstance(t, torch.Tensor) and func._schema.is_mutable:
                self._see(t)
        self.peak = max(self.peak, self.current)
        return out

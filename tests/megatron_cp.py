"""Megatron-Core's own CP slicing, called the way the installed release wants (tests only).

``megatron.core.utils.get_batch_on_this_cp_rank(batch, cp_group=None)`` (0.16) became
``get_batch_on_this_cp_rank(batch, is_hybrid_cp, cp_group=None, ...)`` (0.19.2, which then
dispatches to the same per-sequence zigzag slicing when the batch has no ``cu_seqlens``). The
package never calls it (``step.batch.cp_shard`` is our own, pure); the tests compare against it.
"""

from __future__ import annotations

import inspect


def megatron_cp_slice(batch: dict, cp_group):
    from megatron.core.utils import get_batch_on_this_cp_rank

    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=cp_group)
    return get_batch_on_this_cp_rank(batch, cp_group=cp_group)

"""Attach per-sample routes to a collated microbatch, in the layout its routers will see."""

from __future__ import annotations

import dataclasses

from sapo_megatron.step.batch import Microbatch, Sample
from sapo_megatron.routing.align import align_packed, align_padded
from sapo_megatron.routing.replay import MicrobatchRoutes

_ALIGN = {"padded": align_padded, "packed": align_packed}


def attach_routes(
    mb: Microbatch, samples: list[Sample], *, tp_rank: int = 0, tp_size: int = 1
) -> Microbatch:
    """``mb`` (collated from ``samples``) with their routes aligned as ``MicrobatchRoutes``.

    With sequence parallelism pass this rank's ``tp_rank`` / ``tp_size``: only its shard of the
    sequence is built (the routers of this rank never see the rest). Routes stay in their
    compact dtype here; each layer's slice becomes int64 only when handed to its router.
    """
    missing = [i for i, s in enumerate(samples) if s.routes is None]
    if missing:
        raise ValueError(f"samples {missing} carry no routes; routing replay needs all of them")
    if len(samples) != mb.sample_index.shape[0]:
        raise ValueError(f"microbatch holds {mb.sample_index.shape[0]} samples, got {len(samples)}")
    topk = samples[0].routes.shape[-1]
    # Packed segments rounded up for THD context parallelism hold their padding in place.
    extra = {"sample_multiple": mb.sample_multiple} if mb.layout == "packed" else {}
    routes, replay, pad = _ALIGN[mb.layout](
        [s.routes for s in samples], mb.tokens.shape[1], topk=topk, tp_rank=tp_rank, tp_size=tp_size,
        **extra,
    )
    return dataclasses.replace(mb, routes=MicrobatchRoutes(routes, replay, pad, sp_shard=(tp_rank, tp_size)))

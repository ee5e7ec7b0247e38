"""Where routing replay enters Megatron-Core's MoE routers: one hook object per router.

Since megatron-core 0.16 every ``TopKRouter`` passes its ``router.router_replay`` object into
``topk_routing_with_score_function``, which calls
``router_replay.get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)``
for the top-k. We set that attribute on each router to a :class:`RouterHook`: a subclass of
Megatron's ``RouterReplay`` (so any ``isinstance`` check upstream still holds) that does *not*
run ``RouterReplay.__init__``. That constructor appends the instance to
``RouterReplay.global_router_replay_instances``, one process-global list: a second model built
with replay enabled (a reference model) silently shifts every index in it (FIELD-NOTES 1). Our
bookkeeping is per model chunk instead, in :class:`sapo_megatron.routing.replay.RoutingReplay`;
the hook only computes the live top-k with Megatron's own function and hands both to the layer's
decision (:meth:`~sapo_megatron.routing.replay.LayerReplay.select`).

:class:`RouterLogitNoise` is the other patch at this place: noise on the embedded engine copy's
router logits (``rollout.embedded.router_noise_std``), never on the trainer's.

Upstream's own mechanism (``moe_enable_routing_replay`` and its RECORD / REPLAY_FORWARD /
REPLAY_BACKWARD actions) is left off: ``routing/replay.py``'s docstring says why it is not
enough (per-token fallback, live scores for agreement metrics, PP 1F1B and recomputation).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from megatron.core.transformer.moe.router_replay import RouterReplay


class RouterHook(RouterReplay):
    """The object a router consults for its top-k; forwards to one of our layer objects."""

    def __init__(self, layer):
        # Deliberately not calling RouterReplay.__init__: no global registration.
        self.layer = layer
        self.router_replay_action = None

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        live_values, live_idx = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        return self.layer.select(scores, live_values, live_idx)


def moe_routers(inner) -> Iterator[tuple[int, object]]:
    """``(global layer index, router)`` of every MoE layer of one unwrapped model chunk, in build order.

    Refuses configurations whose routers would bypass the hook.
    """
    from megatron.core.transformer.moe.moe_layer import MoELayer

    if getattr(inner.config, "moe_router_fusion", False):
        raise ValueError("routing replay needs moe_router_fusion=False (the fused kernel bypasses the replay hook)")
    for layer in inner.decoder.layers:
        if not isinstance(layer.mlp, MoELayer):
            continue
        router = layer.mlp.router
        if not hasattr(router, "router_replay"):
            raise RuntimeError("this megatron-core's TopKRouter has no router_replay hook (needs >= 0.16)")
        yield layer.layer_number - 1, router


def install_router_hook(router, layer) -> RouterHook:
    """Make ``router`` take its top-k from ``layer.select`` (see :class:`RouterHook`)."""
    hook = RouterHook(layer)
    router.router_replay = hook
    return hook


class RouterLogitNoise:
    """Gaussian noise on one router's logits (``TopKRouter.gating``'s output), for the embedded
    engine's model copy only: a stand-in for the kernel and batch-shape differences that make a
    real inference engine's routers disagree with the trainer's (rollout/engine_copy.py).

    It wraps the router's ``gating`` on the instance (``TopKRouter.forward`` calls
    ``self.gating(input)`` right before ``self.routing(logits)``), so the noise moves both the
    top-k choice and the routing probabilities, as a numerically different kernel would. Draws
    come from a generator reseeded by :meth:`reseed` before every rollout call: the same
    (seed, step) gives the same noise, so a resumed run routes exactly as the original.
    """

    def __init__(self, router, std: float, salt: int):
        self.std = float(std)
        self.salt = salt  # distinguishes layers (and ranks holding different tokens)
        self.generator = torch.Generator().manual_seed(salt)
        self._gating = router.gating  # the bound method: the class's own gating
        router.gating = self

    def reseed(self, key: int) -> None:
        self.generator.manual_seed(hash((key, self.salt)) % (2**63))

    def __call__(self, input):
        logits = self._gating(input)
        if self.std == 0:
            return logits
        noise = torch.randn(logits.shape, generator=self.generator, dtype=torch.float32)
        return logits + (self.std * noise).to(device=logits.device, dtype=logits.dtype)


def install_router_noise(inner, std: float, rank_salt: int = 0) -> list[RouterLogitNoise]:
    """Put :class:`RouterLogitNoise` of ``std`` on every MoE router of one unwrapped chunk."""
    return [RouterLogitNoise(router, std, salt=hash((rank_salt, index)) % (2**31))
            for index, router in moe_routers(inner)]

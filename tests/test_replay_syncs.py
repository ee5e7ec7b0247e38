"""Routing replay's hooks never stop the host: no scalar reads, no blocking copies per layer.

On a GPU every ``.item()`` / ``int(tensor)`` / ``bool(tensor)`` (they all dispatch to
``aten._local_scalar_dense``), every device-to-host copy and every data-dependent shape
(``nonzero``, ``masked_select``, ``unique``) waits for the GPU to catch up; so does a blocking
host-to-device copy. A CPU cannot see the waiting, but it can count the operations:

- :class:`HostSyncs` is a ``TorchDispatchMode`` that counts them. It treats the ``meta`` device
  as the accelerator: a copy from meta to the CPU or a scalar read of a meta tensor is counted
  and answered with zeros, so code written for a GPU runs end to end on meta tensors;
- on the real tiny model (CPU), a forward with replay (and with R2 recording) performs exactly
  as many scalar reads as the same forward with routing untouched: the hooks add none;
- on meta, one microbatch's routes cross to the device in a fixed number of non-blocking
  copies whatever the layer count, every layer's replay runs without a sync, and R2's recorded
  routes come back compact, in one copy per microbatch.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sapo_megatron.models import ModelConfig, ParallelConfig
from sapo_megatron.routing import attach_routes, attach_routing_replay, routing_action
from sapo_megatron.step import build_model_chunks, collate_padded, collect_log_probs
from sapo_megatron.step.synthetic import synthetic_samples

aten = torch.ops.aten
_DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                   aten.unique_consecutive.default, aten.unique_dim.default}


class HostSyncs(TorchDispatchMode):
    """Counts what would stop the host on an accelerator (``meta`` stands in for it)."""

    def __init__(self):
        super().__init__()
        self.scalar_reads = 0  # .item(), int(t), float(t), bool(t)
        self.data_dependent = 0
        self.to_host: list[tuple] = []  # (shape, dtype) of device -> host copies
        self.to_device: list[tuple] = []  # (shape, dtype, non_blocking) of host -> device copies

    @property
    def syncs(self) -> int:
        blocking = sum(not nb for *_, nb in self.to_device)
        return self.scalar_reads + self.data_dependent + len(self.to_host) + blocking

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            self.scalar_reads += 1
            if args[0].is_meta:
                return args[0].dtype.is_floating_point and 0.0 or (False if args[0].dtype == torch.bool else 0)
        elif func in _DATA_DEPENDENT:
            self.data_dependent += 1
            if args[0].is_meta:  # its output shape would need the values: there is no stand-in
                raise RuntimeError(f"{func} on the device: a data-dependent shape syncs the host")
        elif func is aten._to_copy.default:
            src = args[0]
            dst = torch.device(kwargs.get("device") or src.device)
            if src.is_meta and dst.type == "cpu":
                self.to_host.append((tuple(src.shape), kwargs.get("dtype") or src.dtype))
                return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
            if src.device.type == "cpu" and dst.type != "cpu":
                self.to_device.append((tuple(src.shape), src.dtype, bool(kwargs.get("non_blocking"))))
        elif func is aten.copy_.default and args[0].device != args[1].device:
            dst, src = args[0], args[1]
            if src.is_meta and dst.device.type == "cpu":
                self.to_host.append((tuple(src.shape), src.dtype))
                return dst
            if src.device.type == "cpu":
                self.to_device.append((tuple(src.shape), src.dtype, bool(kwargs.get("non_blocking"))))
        return func(*args, **kwargs)


def test_counter_sees_what_syncs():
    """The counter itself: each kind of sync is seen, device work is not."""
    x = torch.ones(4, device="meta")
    with HostSyncs() as c:
        y = (x * 2).sum()
    assert c.syncs == 0
    with HostSyncs() as c:
        int(y), float(y), bool(y > 0), y.item()
        torch.ones(4).nonzero()
        x.cpu()
        torch.ones(3).to("meta")
        torch.ones(3).to("meta", non_blocking=True)
    assert (c.scalar_reads, c.data_dependent, len(c.to_host), len(c.to_device)) == (4, 1, 1, 2)
    assert c.syncs == 4 + 1 + 1 + 1


MODEL = ModelConfig(num_hidden_layers=5, first_k_dense=1, num_experts=6, num_experts_per_tok=2, vocab_size=40)


@pytest.fixture
def chunks(single_rank_parallel):
    chunks = build_model_chunks(MODEL, ParallelConfig(), wrap_ddp=False)
    attach_routing_replay(chunks[0], MODEL.moe_layer_pattern())
    return chunks


def _routed_microbatches(num_microbatches: int = 2):
    samples = synthetic_samples(2 * num_microbatches, vocab_size=MODEL.vocab_size, seed=4, max_length=12)
    gen = torch.Generator().manual_seed(1)
    routed = [dataclasses.replace(s, routes=torch.stack([
        torch.randperm(MODEL.num_experts, generator=gen)[:2] for _ in range((s.tokens.numel() - 1) * 4)
    ]).view(-1, 4, 2).to(torch.uint8)) for s in samples]
    groups = [routed[2 * i: 2 * i + 2] for i in range(num_microbatches)]
    return [attach_routes(collate_padded(g, min_length=16), g) for g in groups]


def _scalar_reads(chunks, microbatches, action) -> int:
    with routing_action(chunks, action, with_backward=False), HostSyncs() as counter:
        collect_log_probs(chunks, microbatches)
    return counter.scalar_reads


def test_replay_hooks_add_no_scalar_reads(chunks, record_property):
    """Same forward, routing untouched vs replayed vs recorded: the hooks add no scalar read."""
    mbs = _routed_microbatches(2)
    live = _scalar_reads(chunks, mbs, None)
    replay = _scalar_reads(chunks, mbs, "replay")
    record = _scalar_reads(chunks, mbs, "record")
    per_mb = (replay - live) / len(mbs), (record - live) / len(mbs)
    record_property("replay_scalar_reads_per_microbatch", per_mb[0])
    print(f"scalar reads per microbatch added by the hooks (4 MoE layers): replay {per_mb[0]}, record {per_mb[1]}")
    assert per_mb == (0, 0)


def _meta_model(num_moe_layers: int):
    """A stand-in model chunk whose routing replay has ``num_moe_layers`` routers (no Megatron)."""
    from types import SimpleNamespace

    from sapo_megatron.routing.replay import LayerReplay, RoutingReplay

    controller = RoutingReplay(num_moe_layers=num_moe_layers, route_dtype=torch.uint8)
    for m in range(num_moe_layers):
        controller.layers.append(LayerReplay(controller, m))
        controller.moe_columns.append(m)
    return SimpleNamespace(_sapo_routing_replay=controller), controller


def _route_on_meta(layer, num_tokens: int, num_experts: int = 6, topk: int = 2):
    """One router call as Megatron makes it, its tensors on the (meta) device."""
    scores = torch.randn(num_tokens, num_experts, device="meta")
    values, idx = torch.topk(scores, topk, dim=1)
    return layer.select(scores, values, idx)


@pytest.mark.parametrize("num_moe_layers", [2, 8])
def test_replay_on_the_device_never_waits_for_it(num_moe_layers):
    from sapo_megatron.routing.replay import MicrobatchRoutes

    _, controller = _meta_model(num_moe_layers)
    S, B, K = 12, 2, 2
    gen = torch.Generator().manual_seed(0)
    routes = MicrobatchRoutes(
        routes_SBMK=torch.randint(0, 6, (S, B, num_moe_layers, K), generator=gen, dtype=torch.uint8),
        replay_mask_SB=torch.rand(S, B, generator=gen) < 0.8,
        pad_mask_SB=torch.rand(S, B, generator=gen) < 0.1,
    )
    controller.begin("replay", with_backward=False)
    with HostSyncs() as counter:
        for _ in range(3):  # microbatches
            controller.on_microbatch(routes, device=torch.device("meta"))
            for layer in controller.layers:
                probs, idx = _route_on_meta(layer, S * B)
                assert idx.dtype == torch.int64 and idx.is_meta
    controller.finish()
    print(f"{num_moe_layers} MoE layers, per microbatch: {counter.syncs / 3} syncs, "
          f"{len(counter.to_device) / 3} host-to-device copies")
    assert counter.syncs == 0
    # Per microbatch: the routes of this chunk's layers in one copy, its two masks in another.
    assert len(counter.to_device) == 2 * 3
    assert {dtype for _, dtype, _ in counter.to_device} == {torch.uint8, torch.bool}
    # The counts stay on the device, read once per step by replay_metrics.
    assert all(layer.counts_C.is_meta and layer.counts_C.shape == (4,) for layer in controller.layers)


@pytest.mark.parametrize("num_moe_layers", [2, 8])
def test_r2_records_compact_and_copies_once_per_microbatch(num_moe_layers):
    from sapo_megatron.routing.replay import recorded_sample_routes

    chunk, controller = _meta_model(num_moe_layers)
    samples = synthetic_samples(5, vocab_size=40, seed=6, max_length=12)
    mbs = [collate_padded(samples[:3]), collate_padded(samples[3:])]
    controller.begin("record", with_backward=False)
    with HostSyncs() as counter:
        for mb in mbs:
            for layer in controller.layers:
                _route_on_meta(layer, mb.tokens.numel())
    assert counter.syncs == 0
    assert all(r.dtype == torch.uint8 and r.is_meta for layer in controller.layers for r in layer.recorded)
    with HostSyncs() as counter:
        recorded = recorded_sample_routes([chunk], mbs)
    controller.finish()
    # After the pass: one device-to-host copy per microbatch (all layers at once), compact.
    assert [shape for shape, _ in counter.to_host] == [
        (mb.tokens.numel(), num_moe_layers, 2) for mb in mbs]
    assert {dtype for _, dtype in counter.to_host} == {torch.uint8}
    assert counter.scalar_reads == 0 and counter.data_dependent == 0
    assert [r.shape for r in recorded] == [(s.tokens.numel() - 1, num_moe_layers, 2) for s in samples]
    assert all(r.dtype == torch.uint8 for r in recorded)


@pytest.mark.gpu
@pytest.mark.parametrize("action", ["replay", "record"])
def test_hooks_on_cuda_make_no_synchronizing_call(action):
    """The same hooks on a real GPU under ``torch.cuda.set_sync_debug_mode("error")``: any call
    that waits for the device raises. Replayed routes land where the replay mask says."""
    from sapo_megatron.routing.replay import MicrobatchRoutes, recorded_sample_routes

    chunk, controller = _meta_model(8)
    device = torch.device("cuda")
    S, B, K, E = 12, 2, 2, 6
    gen = torch.Generator().manual_seed(0)
    routes = MicrobatchRoutes(
        routes_SBMK=torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(S * B * 8)]).view(S, B, 8, K)
        .to(torch.uint8),
        replay_mask_SB=torch.rand(S, B, generator=gen) < 0.8,
        pad_mask_SB=torch.zeros(S, B, dtype=torch.bool),
    )
    controller.begin(action, with_backward=False)
    used = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if action == "replay":
            controller.on_microbatch(routes, device=device)
        for layer in controller.layers:
            scores = torch.randn(S * B, E, device=device)
            values, idx = torch.topk(scores, K, dim=1)
            used.append(layer.select(scores, values, idx)[1])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    if action == "replay":
        mask = routes.replay_mask_SB.reshape(-1)
        for m, idx in enumerate(used):
            want = routes.routes_SBMK[:, :, m].reshape(-1, K).long()
            assert torch.equal(idx.cpu()[mask], want[mask]), f"layer {m}: replayed routes differ"
    else:
        samples = synthetic_samples(2, vocab_size=40, seed=6, min_length=S, max_length=S)
        recorded = recorded_sample_routes([chunk], [collate_padded(samples)])
        assert all(r.dtype == torch.uint8 for r in recorded)
        assert torch.equal(recorded[0][:, 0].long(), used[0].view(S, B, K)[: S - 1, 0].cpu())
    controller.finish()

"""``weight_sync: disk`` with ``delta: true``: only the bf16 elements that changed go to the servers.

Between two RL steps at RL learning rates most bf16 weights keep their bit pattern (the fp32
master moves far below bf16's resolution), so a step's changes are a small fraction of the model.

Trainer side (:mod:`.delta_pieces`): shard-local, nothing is exchanged between ranks. Every rank
keeps ITS parts of the HF tensors (the rows, or columns, of each HF tensor its tensor-parallel
slice makes, and the replicated tensors spread over their holders) as last sent, in the served
dtype, in host memory. A push casts each part from the parameters chunk by chunk, compares bit
patterns, encodes the changed elements (changed indices + values, a bitmap + values, or the whole
part, whichever is smallest) and writes them, with each part's region of its HF tensor, to the
rank's own delta file (safetensors) in ``weight_dir/deltas``: nothing funnels through rank 0 and
no rank gathers a tensor. Rank 0 then sends each server ``/update_weights_from_tensor`` with
``load_format = sapo_sglang.delta_loader.apply_delta`` and one empty tensor whose name is the
message (files, versions, the last full sync's directory, where to ack), inside a weight-update
session (SGLang >= 0.5.21 refuses tensor updates outside one).

Server side: :mod:`sapo_sglang.delta_loader` (its docstring says how and why).

Safety:
- The first push, any push with a server known stale (``rebuild``) and any fallback are FULL
  syncs (the disk sync's HF directory, which also becomes the loader's base).
- A re-sync writes a full directory of the current version when the last one is older and loads
  it (``/update_weights_from_disk``); that server's loader copy rebuilds from it on its next delta.
- Every server's every TP process writes an ack; a missing or failed ack, or (every
  ``delta_checksum_every`` pushes) digests of the loader's HF copy, region by region as the
  trainer ranks hold them, that differ from the trainer's, fall back to a full sync with a
  warning (``weight_sync/delta_fallbacks``). A push that fails outright makes the next one full
  (the trainer's copies already hold the version the servers may lack).
- Refused up front with a clear error: a server started without
  ``--custom-weight-loader sapo_sglang.delta_loader.apply_delta`` (an unknown ``load_format``
  raises inside SGLang's scheduler and kills the server, so it is never sent), and a server that
  quantizes the weights (FP8: a delta of the bf16 tensors is not what such a server holds).
"""

from __future__ import annotations

import base64
import glob
import io
import json
import logging
import os
import secrets
import time

import torch.distributed as dist

from sapo_megatron.collectives import global_max
from sapo_megatron.rollout.sglang.protocol import SESSION_ALREADY_OPEN, weight_session_needed
from sapo_megatron.rollout.sglang.transport import Rejected, Retryable
from sapo_megatron.rollout.sglang.weight_sync.base import share_outcome
from sapo_megatron.rollout.sglang.weight_sync.delta_pieces import PieceDiffer, local_pieces, write_delta
from sapo_megatron.rollout.sglang.weight_sync.disk import DiskSync
from sapo_sglang import delta_loader as codec

logger = logging.getLogger(__name__)

TENSOR = "/update_weights_from_tensor"
BEGIN, END = "/begin_weight_update", "/end_weight_update"


def serialized_message(msg: str, tp_size: int) -> list[str]:
    """``serialized_named_tensors``: one base64 ForkingPickler payload per server TP rank, each
    ``[(msg, empty tensor)]`` (an empty storage pickles as ``rebuild_storage_empty``: no shared
    memory, so it crosses hosts and passes SGLang's SafeUnpickler)."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's reductions with ForkingPickler

    buf = io.BytesIO()
    ForkingPickler(buf).dump([(msg, torch.empty(0))])
    return [base64.b64encode(buf.getvalue()).decode()] * tp_size


def check_delta_server(url: str, raw: dict, loader: str = codec.LOADER) -> None:
    """A server that can take deltas, from its ``/server_info`` (raises a clear error)."""
    loaders = raw.get("custom_weight_loader") or []
    if loader not in loaders:
        raise RuntimeError(f"delta weight sync: SGLang server {url} was not started with "
                           f"--custom-weight-loader {loader} (it has {loaders or 'none'}); start it with that flag "
                           f"and sapo_sglang importable (pip install --no-deps sapo_megatron in its venv), or set "
                           f"rollout.sglang.delta: false")
    quant = raw.get("quantization")
    if quant:
        raise RuntimeError(f"delta weight sync: SGLang server {url} quantizes the weights ({quant!r}); a delta of "
                           f"the bf16 tensors is not what it holds. Use rollout.sglang.delta: false")


class DeltaSync(DiskSync):
    name = "disk+delta"

    def __init__(self, engine, hf_config: dict, config, weight_dir: str, *, fsync: bool = False) -> None:
        quant = (hf_config.get("quantization_config") or {}).get("quant_method")
        if quant:
            raise ValueError(f"rollout.sglang.delta: the served checkpoint is quantized ({quant!r}, e.g. FP8); a "
                             f"delta of the bf16 tensors is not what the servers hold. Set rollout.sglang.delta: false")
        super().__init__(engine, hf_config, config, weight_dir, fsync=fsync)
        self.checksum_every = int(config.delta_checksum_every)
        self.differ = PieceDiffer()  # this rank's parts of the HF tensors as the servers hold them (host)
        self.base: tuple[str, int] | None = None  # (directory, version) of the last full sync
        self.version: int | None = None  # what the delta chain is at
        self.deltas = 0  # delta pushes so far (for the checksum cadence)
        self.run = secrets.token_hex(4) if dist.get_rank() == 0 else ""
        self.delta_dir = os.path.join(self.weight_dir, "deltas")
        self._metrics: dict[str, float] = {}
        self.fresh: set[str] = set()  # rank 0: servers whose last load was the full sync of ``base``
        self.fallbacks = 0
        self.loader = config.delta_loader
        self._plan, self._plan_key = None, None  # this rank's parts and what they are views of

    # ------------------------------------------------------------------ this rank's parts
    def _pieces(self, model):
        """This rank's parts of the HF tensors (:mod:`.delta_pieces`); collective.

        The parts are views of the parameters, so they stay valid while every rank holds the
        same tensors at the same addresses (the optimizer updates them in place): the plan (an
        object all-gather and a walk over every HF tensor, 15-30 ms per push) is then reused.
        Any rank that sees another tensor, address, shape or dtype makes every rank rebuild it;
        one scalar all-reduce keeps the ranks in step."""
        from sapo_megatron.checkpoint.live import _held_tensors, export_plan

        held = [t for _, _, t in _held_tensors(model).values()]
        key = tuple((id(t), t.data_ptr(), tuple(t.shape), t.dtype) for t in held)
        if global_max(int(key != self._plan_key)) or self._plan is None:
            self._plan = local_pieces(export_plan(model, self.hf_config, "checkpoint"), dist.get_rank())
            storages = {t.untyped_storage().data_ptr() for t in held}
            # A part that is a copy (no architecture's mapping makes one today) would freeze at
            # this push's values: such a plan is rebuilt every push.
            views = all(p.source.untyped_storage().data_ptr() in storages for p in self._plan)
            self._plan_key = key if views else None
        return self._plan

    def _refresh_held(self, model) -> None:
        self.differ.refresh(self._pieces(model))

    # ------------------------------------------------------------------ full syncs
    def _full(self, model, version: int, rebuild: bool, path: str | None = None) -> list[str]:
        synced = super().push(model, version, rebuild=rebuild, prepared=path)
        self.fresh = set(synced)
        self._refresh_held(model)
        self.base = (os.path.join(self.weight_dir, f"step_{version}"), version)
        self.version = version
        self._metrics["weight_sync/full_syncs"] = self._metrics.get("weight_sync/full_syncs", 0.0) + 1
        return synced

    def resync(self, model, version: int, urls: list[str]) -> list[str]:
        if self.base is None or self.base[1] != version:  # the loader's base must be this version
            path = self.write(model, version)
            self.base = (path, version)
            if dist.get_rank() == 0:
                self.current = path
                self._written.append(path)
                self._prune(path)
        synced = super().resync(model, version, urls)
        self.fresh.update(synced)
        return synced

    # ------------------------------------------------------------------ delta pushes
    def prepare(self, model, version: int, *, rebuild: bool = False):
        """Collective, no server involved: the full sync's directory when this push is full,
        else every rank's diff written to its delta file (and gathered)."""
        if rebuild or self.base is None or self.version is None:
            return "full", super().prepare(model, version, rebuild=rebuild)
        t0 = time.perf_counter()
        rank = dist.get_rank()
        pieces = self._pieces(model)
        timings = {"plan_s": time.perf_counter() - t0}
        check = self.checksum_every > 0 and (self.deltas + 1) % self.checksum_every == 0
        os.makedirs(self.delta_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(self.delta_dir, f"v*_r{rank}.safetensors")):
            os.remove(stale)  # the previous version's: every server applied it or gets a full sync
        mine = write_delta(os.path.join(self.delta_dir, f"v{version}_r{rank}.safetensors"), self.differ, pieces,
                           check=check, fsync=self.fsync, timings=timings)
        timings["export_s"] = time.perf_counter() - t0  # rank 0's plan, diff, encode, file
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        timings["write_s"] = time.perf_counter() - t0 - timings["export_s"]  # waiting for every rank's
        return "delta", (everyone, check, timings)

    def push(self, model, version: int, *, rebuild: bool = False, prepared=None) -> list[str]:
        kind, data = prepared if prepared is not None else self.prepare(model, version, rebuild=rebuild)
        if kind == "full":
            return self._full(model, version, rebuild, data)
        everyone, check, timings = data
        t_sent = time.perf_counter()
        error, synced, problems = None, [], []
        if dist.get_rank() == 0:
            try:
                files = [p for p, _, _, _ in everyone if p]
                trainer = {} if not check else {k: v for _, _, _, d in everyone for k, v in d.items()}
                synced, problems = self._send(version, files, trainer if check else None)
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
        box = [problems]
        dist.broadcast_object_list(box, src=0)
        if error:  # the copies already hold this version, the servers may not: the next push is full
            self.version = None
        synced = share_outcome(error, synced)
        problems = box[0]
        self.deltas += 1
        if problems:
            self.fallbacks += 1
            self._metrics["weight_sync/delta_fallbacks"] = self._metrics.get("weight_sync/delta_fallbacks", 0.0) + 1
            logger.warning("delta weight sync to version %d failed its check, falling back to a full sync: %s",
                           version, "; ".join(problems))
            return self._full(model, version, True)
        self.version = version
        delta_bytes = sum(n for _, n, _, _ in everyone)
        full_bytes = sum(n for _, _, n, _ in everyone)
        send = time.perf_counter() - t_sent
        self._metrics.update({"weight_sync/delta_bytes": float(delta_bytes),
                              "weight_sync/delta_full_bytes": float(full_bytes),
                              "weight_sync/delta_ratio": delta_bytes / max(full_bytes, 1),
                              # the trainer's side and the servers' (a pause in between is not counted)
                              "weight_sync/delta_s": timings["export_s"] + timings["write_s"] + send,
                              **{f"weight_sync/delta_{k}": v for k, v in timings.items()},
                              "weight_sync/delta_send_s": send})  # HTTP + the servers' apply
        if check:
            self._metrics["weight_sync/delta_checksums"] = self._metrics.get("weight_sync/delta_checksums", 0.0) + 1
        return synced

    def _send(self, version: int, files: list[str], trainer: dict | None) -> tuple[list[str], list[str]]:
        """Rank 0: the delta to every reachable server; (servers now at ``version``, problems)."""
        urls = self.engine.config.urls
        up, down, infos = [], {}, {}
        for url in urls:  # one /server_info each: the reachability probe and the loader check
            try:
                infos[url] = self._raw_info(url)
                up.append(url)
            except (Retryable, Rejected) as err:
                down[url] = str(err)
        for url, why in down.items():
            logger.warning("delta to version %d: SGLang server %s left out (stays stale): %s", version, url, why)
        if not up:
            raise RuntimeError(f"no SGLang server is reachable for the delta to version {version}: {down}")
        for url in up:
            check_delta_server(url, infos[url], self.loader)
        tp = {url: int(infos[url].get("tp_size") or 1) for url in up}
        acks = {url: os.path.join(self.delta_dir, f"ack_v{version}_s{i}") for i, url in enumerate(up)}
        for url in up:
            for f in glob.glob(acks[url] + ".tp*.json"):
                os.remove(f)
        base_dir, base_version = self.base

        def payload(url: str) -> dict:
            msg = codec.message(run=self.run, to=version, files=files, ack=acks[url], checksum=trainer is not None,
                                fresh=url in self.fresh,
                                base={"dir": base_dir, "version": base_version}, **{"from": self.version})
            return {"serialized_named_tensors": serialized_message(msg, tp[url]), "load_format": self.loader,
                    "flush_cache": True, "abort_all_requests": False, "weight_version": str(version)}

        sessions = [u for u in up if weight_session_needed(self.engine.server_info(u))]
        self._begin(sessions)
        lost: dict[str, str] = {}
        try:
            futures = self.engine.submit_all(TENSOR, payload, urls=up)
            answers = self.engine.collect(futures, TENSOR, f"delta weight update to version {version}", lost=lost)
        finally:
            if sessions:
                self.engine.on_all_servers(END, lambda url: {}, f"closing the delta session of version {version}",
                                           urls=[u for u in sessions if u not in lost])
        synced = [u for u in up if u in answers]
        self.fresh.difference_update(synced)  # on the chain now: their loaders hold the copy
        problems, seen = [], []
        for url in synced:
            for r in range(tp[url]):
                problems += self._read_ack(url, r, f"{acks[url]}.tp{r}.json", version, trainer, seen)
        if seen:  # 0: some server process applies with numpy (no C compiler there; its log says why)
            self._metrics["weight_sync/delta_server_native"] = float(all(a.get("native") for a in seen))
        return synced, problems

    def _raw_info(self, url: str) -> dict:
        return self.engine.transport.probe(url, "/server_info", timeout=self.engine.config.timeout_s)

    def _begin(self, urls: list[str]) -> None:
        if not urls:
            return
        futures = self.engine.submit_all(BEGIN, lambda url: {}, urls=urls)
        stuck = []
        for url, future in futures.items():
            try:
                future.result()
            except Exception as err:  # noqa: BLE001 - only "already open" is recoverable
                if SESSION_ALREADY_OPEN not in str(err):
                    raise
                stuck.append(url)
        if stuck:
            logger.warning("SGLang servers %s hold a weight-update session nobody closed: ending it", stuck)
            self.engine.on_all_servers(END, lambda url: {}, "ending a session left open", urls=stuck)
            self.engine.on_all_servers(BEGIN, lambda url: {}, "opening the delta session", urls=stuck)

    @staticmethod
    def _read_ack(url: str, tp_rank: int, path: str, version: int, trainer: dict | None,
                  seen: list | None = None) -> list[str]:
        try:
            with open(path) as f:
                ack = json.load(f)
        except (OSError, ValueError) as err:
            return [f"{url} TP rank {tp_rank}: no ack at {path} ({err})"]
        if seen is not None:
            seen.append(ack)
        if not ack.get("ok"):
            return [f"{url} TP rank {tp_rank}: the loader failed: {ack.get('error')}"]
        if ack.get("version") != version:
            return [f"{url} TP rank {tp_rank}: acked version {ack.get('version')}, expected {version}"]
        if trainer is not None:
            served = ack.get("digests") or {}
            bad = sorted(n for n in set(trainer) | set(served) if trainer.get(n) != served.get(n))
            if bad:
                return [f"{url} TP rank {tp_rank}: {len(bad)} HF tensors differ from the trainer's, e.g. {bad[:3]}"]
        return []

    def take_metrics(self) -> dict[str, float]:
        out, self._metrics = self._metrics, {}
        out.setdefault("weight_sync/delta_fallbacks", 0.0)
        return out

"""``weight_sync: disk``: every rank writes its own HF safetensors shards, the servers load them.

``checkpoint.live.export_hf`` writes ``weight_dir/step_{version}`` in parallel (no rank-0
funnel; rank 0 writes config.json and the index from the plan), in the dtypes the served
checkpoint holds. Rank 0 then sends ``/update_weights_from_disk`` with ``weight_version`` and
``flush_cache: true`` (SGLang flushes the radix cache after loading: cached prefix routes of the
old weights must not reach R3). A re-sync reloads the directory of the current version: nothing
is rewritten. ``keep_weight_dirs`` bounds the step directories kept.

A server that is down (it fails a probe, or its update cannot reach it) is left out and stays
stale until a later re-sync reaches it (``ReplicaSGLang`` marks it); the push fails only when no
server is left, naming each and why. A server that answers and refuses the update fails the push.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch.distributed as dist

from sapo_megatron.rollout.sglang.protocol import disk_update_payload
from sapo_megatron.rollout.sglang.weight_sync.base import WeightSync, share_outcome

logger = logging.getLogger(__name__)


class DiskSync(WeightSync):
    name = "disk"

    def __init__(self, engine, hf_config: dict, config, weight_dir: str, *, fsync: bool = False) -> None:
        self.engine = engine
        self.hf_config = hf_config
        self.config = config
        self.weight_dir = os.path.abspath(weight_dir)
        self.fsync = fsync
        self.current: str | None = None
        self._written: list[str] = []
        self.timings: dict[str, float] = {}  # this rank's export seconds per stage (``export_hf``)

    def write(self, model, version: int) -> str:
        """Collective: the HF checkpoint of the live model in ``weight_dir/step_{version}``."""
        from sapo_megatron.checkpoint import export_hf

        path = os.path.join(self.weight_dir, f"step_{version}")
        if dist.get_rank() == 0 and os.path.isdir(path):  # left by a crashed run: never load a half-written dir
            shutil.rmtree(path)
        dist.barrier()
        export_hf(model, path, self.hf_config, dtype="checkpoint", fsync=self.fsync, timings=self.timings)
        return path

    def _load(self, path: str, version: int, urls: list[str]) -> tuple[list[str], dict[str, str]]:
        """Load ``path`` on the reachable servers of ``urls``: (those now serving it, {down: why})."""
        what = f"weight update to version {version} from {path}"
        up, down = self.engine.reachable(urls)
        for url, why in down.items():
            logger.warning("%s: SGLang server %s left out (stays stale until it answers again): %s", what, url, why)
        if not up:
            return [], down
        payload = disk_update_payload(path, version)
        futures = self.engine.submit_all("/update_weights_from_disk", lambda url: payload, urls=up)
        lost: dict[str, str] = {}
        answers = self.engine.collect(futures, "/update_weights_from_disk", what, lost=lost)
        for url, why in lost.items():
            logger.warning("%s: SGLang server %s went down during the update (stays stale): %s", what, url, why)
        return [url for url in up if url in answers], {**down, **lost}

    def prepare(self, model, version: int, *, rebuild: bool = False) -> str:
        """Collective: the directory of ``version`` written (no server involved)."""
        return self.write(model, version)

    def push(self, model, version: int, *, rebuild: bool = False, prepared: str | None = None) -> list[str]:
        # No per-server state: every reachable server loads the new directory, stale ones too.
        path = prepared if prepared is not None else self.write(model, version)
        error, synced = None, []
        if dist.get_rank() == 0:
            try:
                urls = self.engine.config.urls
                synced, down = self._load(path, version, urls)
                if not synced:
                    raise RuntimeError(f"no SGLang server is reachable for the weight update to version {version}: "
                                       + "; ".join(f"{url}: {down[url]}" for url in urls))
                self.current = path
                if path not in self._written:
                    self._written.append(path)
                self._prune(path)
                logger.info("SGLang servers serve version %d from %s", version, path)
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
        return share_outcome(error, synced)

    def resync(self, model, version: int, urls: list[str]) -> list[str]:
        error, synced = None, []
        if dist.get_rank() == 0:
            try:
                if self.current is None:
                    raise RuntimeError("disk re-sync before any weights were written")
                synced, _ = self._load(self.current, version, urls)  # a server still down stays stale
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
        return share_outcome(error, synced)

    def _prune(self, keep_path: str) -> None:
        """Delete the oldest step dirs this sync wrote (never other directories, never the current)."""
        keep = self.config.keep_weight_dirs
        old = [d for d in self._written if d != keep_path]
        while keep and old and len(old) + 1 > keep:
            stale = old.pop(0)
            self._written.remove(stale)
            shutil.rmtree(stale, ignore_errors=True)

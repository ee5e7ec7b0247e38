"""``rollout.sglang``: the one config class of the SGLang client, validated once, here.

The YAML section (``config/schema.py`` uses this class as its ``rollout.sglang`` section) and the
client (``SGLangEngine(SGLangConfig(...))``) share it, so a key means the same thing in both and
is checked in one place. Types stay OmegaConf-friendly (int/float/bool/str/Literal/X | None,
lists, nested dataclasses). Secrets are never held: ``api_key_env`` / ``admin_api_key_env``
name environment variables that are read at request time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
WeightSyncName = Literal["disk", "distributed"]
SyncBackend = Literal["nccl", "gloo"]
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check(condition: bool, key: str, expected: str, value: Any) -> None:
    if not condition:
        raise ValueError(f"rollout.sglang.{key} must be {expected}, got {value!r}")


@dataclass
class DistributedSection:
    """``rollout.sglang.distributed``: the process group of ``weight_sync: distributed``.

    The trainer's rank 0 is rank 0 of the group and hosts its TCP rendezvous at
    ``master_address:master_port``; every server joins it (``/init_weights_update_group``).
    """

    # Reachable FROM THE SERVERS (never 127.0.0.1 across nodes). None: this host's FQDN.
    master_address: str | None = None
    master_port: int = 0  # 0: a free port on rank 0's host, picked at the first sync
    backend: SyncBackend = "nccl"  # gloo for CPU tests
    group_name: str = "sapo_weight_sync"  # + "_<run token>", + "_r<n>" when the group is rebuilt
    bucket_mb: float = 512.0  # MiB per flattened bucket (one broadcast each)
    # "flattened_bucket": one uint8 broadcast per bucket; None: one broadcast per tensor.
    load_format: Literal["flattened_bucket"] | None = "flattened_bucket"
    # Buckets in host memory (a CPU trainer, gloo): the trainer ranks on rank 0's host write their
    # parts of each bucket into shared memory (/dev/shm) instead of sending them to rank 0 over
    # loopback TCP. No effect on GPU buckets (NCCL). false: every holder sends.
    shared_memory: bool = True

    def __post_init__(self) -> None:
        _check(0 <= self.master_port < 65536, "distributed.master_port", "a TCP port (0: any free one)",
               self.master_port)
        _check(self.bucket_mb > 0, "distributed.bucket_mb", "> 0", self.bucket_mb)
        _check(bool(self.group_name), "distributed.group_name", "a non-empty name", self.group_name)
        _check(isinstance(self.shared_memory, bool), "distributed.shared_memory",
               "true or false (it applies only to buckets in host memory)", self.shared_memory)

    @property
    def bucket_bytes(self) -> int:
        return int(self.bucket_mb * 1024**2)


@dataclass
class SGLangConfig:
    urls: list[str] = field(default_factory=list)  # http://host:port of each server
    # The NAMES of the environment variables holding the keys; a key never enters a config.
    api_key_env: str = "SGLANG_API_KEY"
    # With --admin-api-key the weight endpoints and /flush_cache accept only the admin key.
    admin_api_key_env: str = "SGLANG_ADMIN_API_KEY"
    concurrency: int = 64  # requests in flight over all servers; also the keep-alive pool bound
    timeout_s: float = 600.0  # per socket operation of a /generate request
    retries: int = 3  # extra attempts per request, each on the next server
    backoff_s: float = 1.0  # first retry delay, doubled per retry (capped at 60 s)
    # A pooled connection idle longer than this is closed, not reused: SGLang closes idle
    # keep-alive connections after SGLANG_TIMEOUT_KEEP_ALIVE (5 s by default). Keep it below
    # the servers' value.
    keepalive_idle_s: float = 4.0
    weight_sync: WeightSyncName = "disk"
    # Where `disk` sync writes HF safetensors; readable by every server (a shared filesystem
    # across nodes). None: <run.output_dir>/sglang_weights.
    weight_dir: str | None = None
    keep_weight_dirs: int = 1  # step dirs kept on disk (0: keep all)
    weight_timeout_s: float = 1800.0  # loading a large checkpoint takes minutes
    # Delta sync (weight_sync: disk only, docs/sglang.md "Delta weight sync"): after a full sync,
    # each push sends only the changed elements; the servers need
    # --custom-weight-loader sapo_sglang.delta_loader.apply_delta.
    delta: bool = False
    # Every N delta pushes the servers' HF copies are checksummed against the trainer's (0: never);
    # a mismatch falls back to a full sync with a warning.
    delta_checksum_every: int = 10
    # The import path the servers were started with (--custom-weight-loader) and the trainer sends
    # as load_format; a wrapper of ours may stand here (the tests' fault injection does).
    delta_loader: str = "sapo_sglang.delta_loader.apply_delta"
    distributed: DistributedSection = field(default_factory=DistributedSection)
    # R3: responses re-prefilled after a retraction (num_retractions > 0) carry prefix routes
    # of the re-prefill; they are always counted, and dropped (never trained on) when true.
    drop_retracted: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.urls, str):
            self.urls = [self.urls]
        if isinstance(self.distributed, dict):
            self.distributed = DistributedSection(**self.distributed)
        for url in self.urls:
            parts = urlsplit(str(url))
            _check(parts.scheme in ("http", "https") and bool(parts.hostname), "urls",
                   "a list of http(s)://host:port addresses", url)
        self.urls = [str(url).rstrip("/") for url in self.urls]
        for key in ("api_key_env", "admin_api_key_env"):
            _check(_ENV_NAME.fullmatch(getattr(self, key)) is not None, key,
                   "the NAME of an environment variable (never the key)", "<redacted>")
        _check(self.concurrency >= 1, "concurrency", ">= 1", self.concurrency)
        _check(self.timeout_s > 0, "timeout_s", "> 0", self.timeout_s)
        _check(self.retries >= 0, "retries", ">= 0", self.retries)
        _check(self.backoff_s >= 0, "backoff_s", ">= 0", self.backoff_s)
        _check(self.keepalive_idle_s > 0, "keepalive_idle_s",
               "> 0 seconds, below the servers' SGLANG_TIMEOUT_KEEP_ALIVE (default 5)", self.keepalive_idle_s)
        _check(self.keep_weight_dirs >= 0, "keep_weight_dirs", ">= 0 (0: keep all)", self.keep_weight_dirs)
        _check(self.weight_timeout_s > 0, "weight_timeout_s", "> 0", self.weight_timeout_s)
        _check(self.delta_checksum_every >= 0, "delta_checksum_every", ">= 0 (0: never)", self.delta_checksum_every)
        _check(_DOTTED.fullmatch(self.delta_loader) is not None, "delta_loader",
               "a dotted import path pkg.module.function (SGLang's --custom-weight-loader form, no colon)",
               self.delta_loader)
        _check(not self.delta or self.weight_sync == "disk", "delta",
               "false with weight_sync: distributed (SGLang 0.5.23 has no loader hook on that path, "
               "docs/sglang.md 'Delta weight sync'); use weight_sync: disk", self.delta)

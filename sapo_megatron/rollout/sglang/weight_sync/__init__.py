"""Weight sync from the trainer to the SGLang servers (a registry: ``rollout.sglang.weight_sync``).

- ``disk`` (:mod:`.disk`): every rank writes its own HF safetensors shards; ``/update_weights_from_disk``.
- ``distributed`` (:mod:`.distributed`): SGLang's process-group protocol in flattened buckets.
- ``disk`` with ``delta: true`` (:mod:`.delta`): after one full disk sync, only the changed bf16
  elements, applied by ``sapo_sglang.delta_loader`` inside the servers.

Both are collective over the trainer's ranks, send ``weight_version = str(version)`` (the policy
version = RL steps completed) and can re-sync a server that restarted or missed an update.
"""

from sapo_megatron.rollout.sglang.weight_sync.base import WeightSync
from sapo_megatron.rollout.sglang.weight_sync.disk import DiskSync
from sapo_megatron.rollout.sglang.weight_sync.distributed import (
    DistributedSync,
    plan_buckets,
)

WEIGHT_SYNCS = {"disk": DiskSync, "distributed": DistributedSync}

__all__ = ["WEIGHT_SYNCS", "DiskSync", "DistributedSync", "WeightSync", "plan_buckets"]

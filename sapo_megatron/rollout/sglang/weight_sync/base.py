"""What every weight sync does, and the few steps they share.

A sync is collective over ALL trainer ranks (gathering the shards is); only rank 0 talks HTTP,
through the :class:`~sapo_megatron.rollout.sglang.engine.SGLangEngine` it is given (None on
the other ranks). Rank 0 ends every operation by broadcasting its outcome, so an HTTP failure
raises on every rank instead of leaving the others waiting in the next collective.

Room for what is out of scope today: a colocated sync (``/update_weights_from_tensor`` with CUDA
IPC handles of the same flattened buckets) is one more :class:`WeightSync` in the registry, and
FP8 rollout weights are a dtype policy of the export plan (``checkpoint.live.export_plan``), not
a change to the transport.
"""

from __future__ import annotations

import torch.distributed as dist


class WeightSync:
    name = "?"

    def prepare(self, model, version: int, *, rebuild: bool = False):
        """Collective: the part of a push that needs no server (an export, a diff, files), so
        that a partial rollout pauses the servers only for the load itself (their requests keep
        generating under the old weights meanwhile). Returns what :meth:`push` takes as
        ``prepared``; None (here): nothing to do before the load (the distributed sync, whose
        broadcast is the load)."""
        return None

    def push(self, model, version: int, *, rebuild: bool = False, prepared=None) -> list[str]:
        """Make every server serve the trainer's weights as ``weight_version = str(version)``.
        Returns the servers that now do (a server that is down is left out and stays stale).
        ``rebuild``: some server is known stale (restarted): state a sync keeps per server (the
        distributed group) must be built anew. ``prepared``: what :meth:`prepare` returned for
        this push (None: prepare inside)."""
        raise NotImplementedError

    def resync(self, model, version: int, urls: list[str]) -> list[str]:
        """Bring ``urls`` (restarted, or missed an update) back to ``version``; the trainer's
        weights are still those of ``version``. Returns the servers re-synced."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def share_outcome(error: str | None, synced: list[str]) -> list[str]:
    """Rank 0's outcome to every rank; raises everywhere on an error."""
    box = [(error, synced)]
    dist.broadcast_object_list(box, src=0)
    error, synced = box[0]
    if error:
        raise RuntimeError(error)
    return synced

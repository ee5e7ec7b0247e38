"""torchrun worker: ``checkpoint.live._together`` when one rank's step fails (a full disk on one
writer). Every rank must come back with an error, none may wait in a later collective; each
rank writes what it raised to ``OUT.rank<N>``."""

from __future__ import annotations

import argparse
import warnings

import torch.distributed as dist

warnings.filterwarnings("ignore")

from sapo_megatron.checkpoint.live import _together  # noqa: E402
from sapo_megatron.parallel import init_distributed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    init_distributed()
    rank = dist.get_rank()

    def step():
        if rank == 1:
            raise OSError(28, "No space left on device")

    try:
        _together(step)
        outcome = "returned"
    except Exception as err:  # noqa: BLE001 - the outcome is the test's subject
        outcome = f"{type(err).__name__}: {err}"
    dist.barrier()  # every rank reaches the next collective
    with open(f"{args.out}.rank{rank}", "w") as f:
        f.write(outcome)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

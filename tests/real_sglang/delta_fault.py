"""Fault injection for the delta sync, run INSIDE the SGLang server (``--custom-weight-loader``).

:func:`apply_corrupted_once` flips one value of the first delta it sees, in the delta file
itself (what a torn or corrupted write on the shared filesystem would do), then hands the
message to our loader: the server applies a wrong delta and must be caught by the trainer's
checksum. Later deltas pass untouched, so the run shows the recovery (a full sync) too.
Imports only what SGLang's venv has (torch, safetensors, sapo_sglang).
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sapo_sglang import delta_loader

_DONE: list[bool] = []


def apply_corrupted_once(model, named_tensors) -> None:
    for name, _ in named_tensors:
        if name.startswith(delta_loader.PREFIX) and not _DONE:
            msg = json.loads(name[len(delta_loader.PREFIX):])
            for path in msg["files"]:
                with safe_open(path, framework="pt") as f:  # its metadata (the regions) stays
                    meta, parts = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
                if not any(k.endswith((delta_loader.VALUES, delta_loader.FULL)) for k in parts):
                    continue  # this rank changed nothing (a file written only for the checksum)
                key = next(k for k in sorted(parts) if k.endswith((delta_loader.VALUES, delta_loader.FULL)))
                flat = parts[key].reshape(-1).view(torch.int16 if parts[key].element_size() == 2 else torch.int32)
                flat[0] ^= 1 << 3  # one mantissa bit: a plausible silent corruption
                save_file(parts, path, metadata=meta)
                _DONE.append(True)
                break
    delta_loader.apply_delta(model, named_tensors)

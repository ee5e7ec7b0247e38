"""Boundary checks shared by the loss, reduction and advantage functions.

Design choices:
- Errors are ``ValueError`` that name the offending input and what was expected
  ("advantages has shape (2, 5), expected (2, 6) like log_probs"), because these functions sit
  at the boundary between data plumbing and math, where a silent broadcast is the usual bug.
- NaN/inf checks of several inputs are folded into ONE device->host sync: each input gives a
  0-dim bool, they are stacked and read with a single ``.tolist()``. A microbatch pays one
  round trip, not one per input.
- Only data inputs are checked for NaN/inf (advantages, old/rollout/ref log-probs, weights), and
  only at valid tokens: padding may legitimately hold anything (it is masked out with
  ``torch.where`` before any arithmetic). The policy's ``log_probs`` and ``entropy`` carry the graph; a
  NaN there is a model problem and shows up in the loss itself.
"""
from __future__ import annotations

import torch
from torch import Tensor


def shape_str(x: Tensor) -> str:
    return str(tuple(x.shape))


def require_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def require_2d(name: str, x: object) -> Tensor:
    x = require_tensor(name, x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [batch, tokens], got shape {shape_str(x)}")
    return x


def require_same_shape(name: str, x: object, ref_name: str, ref: Tensor) -> Tensor:
    x = require_tensor(name, x)
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {shape_str(x)}, expected {shape_str(ref)} like {ref_name}")
    return x


def as_bool_mask(mask: Tensor) -> tuple[Tensor, Tensor | None]:
    """Return (bool mask, 0-dim 'values are 0/1' flag or None for bool masks) without syncing."""
    if mask.dtype == torch.bool:
        return mask, None
    return mask != 0, ((mask == 0) | (mask == 1)).all()


def require_finite(inputs: dict[str, Tensor], mask_BT: Tensor | None = None,
                   extra_flags: dict[str, tuple[Tensor, str]] | None = None) -> None:
    """Raise if any input holds NaN/inf at a valid token (one host sync for all inputs).

    ``extra_flags`` maps an input name to (0-dim bool flag that must be True, message), so that
    other value checks (e.g. "mask holds only 0/1") share the same sync.
    """
    names: list[str] = []
    flags: list[Tensor] = []
    messages: list[str] = []
    for name, x in inputs.items():
        ok = torch.isfinite(x)
        if mask_BT is not None:
            ok = ok | ~mask_BT
        names.append(name)
        flags.append(ok.all())
        messages.append("holds NaN or inf" + (" at a valid (masked-in) token" if mask_BT is not None else ""))
    for name, (flag, message) in (extra_flags or {}).items():
        names.append(name)
        flags.append(flag)
        messages.append(message)
    if not flags:
        return
    for name, ok, message in zip(names, torch.stack(flags).tolist(), messages):
        if not ok:
            raise ValueError(f"{name} {message}")

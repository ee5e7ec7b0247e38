"""What a shipped launcher does with a config: world size, overrides, SGLang servers.

The world size of a run is not in its config: the launcher decides it (torchrun's
``--nproc_per_node`` times the trainer nodes), and may override config keys (the 30B sbatch
sets EP=8). The planner reads the shipped launchers (``examples/*.sh``,
``examples/slurm/*.sbatch``) instead of restating their numbers, so a launcher edit moves the
plan with it. Only the defaults the scripts spell out (``${VAR:-default}``) are read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Launch:
    path: str
    config: str
    world_size: int
    overrides: tuple[str, ...] = ()
    sglang_servers: int = 0  # servers per launch
    sglang_tp: int = 0
    sglang_dp: int = 1  # data-parallel replicas inside one server
    sglang_mem_fraction: float = 0.0
    colocated: bool = False  # the servers share the trainer's node
    gpus_per_node: int = 8
    extra: dict = field(default_factory=dict)


def _default(text: str, var: str) -> str | None:
    m = re.search(rf"\b{var}=\$?\(?\$\{{\w+:-([^}}]*)\}}", text)
    return m.group(1) if m else None


def _int(text: str, var: str, fallback: int) -> int:
    value = _default(text, var)
    return int(value) if value is not None else fallback


def _config(text: str) -> str | None:
    m = re.search(r"^CONFIG=(\S+)", text, re.M) or re.search(r"--config\s+(configs/\S+)", text) \
        or re.search(r"\$\{CONFIG:-(configs/[^}]+)\}", text)
    return m.group(1).strip("\"'") if m else None


def _overrides(text: str) -> tuple[str, ...]:
    """Literal ``section.key=value`` arguments of the ``train_cmd`` call (not ``$``-expanded ones)."""
    joined = text.replace("\\\n", " ")
    m = re.search(r"^train_cmd .*$", joined, re.M)
    if not m:
        return ()
    return tuple(re.findall(r"(?<![\w\"$])([a-z_]+\.[a-z_.]+=[\w.]+)(?=\s|$)", m.group(0)))


def parse_launcher(path: str | Path) -> Launch | None:
    """The layout a launcher script runs, or None if it launches no training config."""
    path = Path(path)
    text = path.read_text()
    config = _config(text)
    if config is None:
        return None
    mem = re.search(r"--mem-fraction-static\s+([\d.]+)", text)
    mem_fraction = float(mem.group(1)) if mem else 0.0
    rel = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
    if path.suffix == ".sbatch":
        if "TRAINER_NODES" in text:
            nodes, gpus = _int(text, "TRAINER_NODES", 1), _int(text, "GPUS_PER_NODE", 8)
            sbatch_nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
            return Launch(rel, config, nodes * gpus, _overrides(text), sglang_servers=sbatch_nodes - nodes,
                          sglang_tp=_int(text, "SGLANG_TP", 1), sglang_dp=_int(text, "SGLANG_DP", 1),
                          sglang_mem_fraction=mem_fraction, gpus_per_node=gpus)
        # One torchrun agent (one rank) per Slurm task (tiny_cpu.sbatch).
        return Launch(rel, config, _int(text, "NNODES", 1), _overrides(text), gpus_per_node=1)
    trainer_gpus = _default(text, "TRAINER_GPUS")
    if trainer_gpus is not None:
        groups = (_default(text, "SGLANG_GPU_GROUPS") or "").split()
        tps = {len(g.split(",")) for g in groups}
        return Launch(rel, config, len(trainer_gpus.split(",")), sglang_servers=len(groups),
                      sglang_tp=max(tps, default=0), sglang_mem_fraction=mem_fraction, colocated=bool(groups),
                      gpus_per_node=len(trainer_gpus.split(",")) + sum(len(g.split(",")) for g in groups))
    return Launch(rel, config, _int(text, "NPROC", 1), gpus_per_node=0)


def shipped_launchers(root: Path = REPO) -> list[Launch]:
    """Every launcher under ``examples/`` that trains a config (``.sh`` first, then sbatch)."""
    paths = sorted((root / "examples").glob("*.sh")) + sorted((root / "examples" / "slurm").glob("*.sbatch"))
    return [launch for launch in map(parse_launcher, paths) if launch is not None]


def launcher_for(config_path: str | Path, root: Path = REPO) -> Launch | None:
    """The first shipped launcher of ``config_path`` (a single-node ``.sh`` before an sbatch)."""
    target = Path(config_path).resolve()
    for launch in shipped_launchers(root):
        if (root / launch.config).resolve() == target:
            return launch
    return None

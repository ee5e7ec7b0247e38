"""Run configuration: a typed tree (``schema``), YAML + ``key.sub=value`` overrides (``io``),
and the checks that refuse a bad run before anything is built (``validate``).

::

    from sapo_megatron.config import load_config, validate_for_world, save_resolved

    cfg = load_config("configs/tiny_cpu.yaml", ["loss.tau_neg=1.1", "seed=3"])
    plan = validate_for_world(cfg, world_size=2)     # parallel and batch sizes vs the world
    save_resolved(cfg, f"{cfg.run.output_dir}/config.yaml")

From a shell, check a config without launching anything::

    python -m sapo_megatron.config --config configs/tiny_cpu.yaml --world-size 2 [key=value ...]
"""

from sapo_megatron.config.io import (
    ALIASES,
    ConfigError,
    config_from_argv,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    redact,
    save_resolved,
)
from sapo_megatron.config.schema import (
    LossSection,
    ModelSection,
    OptimConfig,
    RolloutConfig,
    RoutingConfig,
    RunConfig,
    SGLangSection,
    TaskSection,
    TrainConfig,
    TrainSection,
)
from sapo_megatron.config.validate import BatchPlan, validate, validate_for_world

__all__ = [
    "ALIASES",
    "BatchPlan",
    "ConfigError",
    "LossSection",
    "ModelSection",
    "OptimConfig",
    "RolloutConfig",
    "RoutingConfig",
    "RunConfig",
    "SGLangSection",
    "TaskSection",
    "TrainConfig",
    "TrainSection",
    "config_from_argv",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_override",
    "redact",
    "save_resolved",
    "validate",
    "validate_for_world",
]

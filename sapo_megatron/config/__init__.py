"""Run configuration: a typed tree (``schema``) used as an OmegaConf structured-config schema,
YAML + ``key.sub=value`` overrides onto it (``io``), and the checks that refuse a bad run before
anything is built (``validate``); ``config show|validate`` (``commands``).

::

    from sapo_megatron.config import load_config, validate_for_world, save_resolved

    cfg = load_config("configs/tiny_cpu.yaml", ["loss.tau_neg=1.1", "seed=3"])
    plan = validate_for_world(cfg, world_size=2)     # parallel and batch sizes vs the world
    save_resolved(cfg, f"{cfg.run.output_dir}/config.yaml")

From a shell, check a config without launching anything::

    sapo-megatron config validate --config configs/tiny_cpu.yaml --world-size 2 [key=value ...]
    python -m sapo_megatron.config show --config configs/tiny_cpu.yaml [key=value ...]
"""

from sapo_megatron.config.errors import ConfigError
from sapo_megatron.config.io import (
    ALIASES,
    config_from_argv,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    load_config,
    redact,
    save_resolved,
    to_saved_dict,
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
from sapo_megatron.config.commands import run_config_command

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
    "dump_yaml",
    "load_config",
    "redact",
    "run_config_command",
    "save_resolved",
    "to_saved_dict",
    "validate",
    "validate_for_world",
]

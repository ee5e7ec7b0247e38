"""Check a configuration and print it resolved, without launching anything.

    python -m sapo_megatron.config --config configs/tiny_cpu.yaml [--world-size 2] [key=value ...]
"""

from __future__ import annotations

import sys

import yaml

from sapo_megatron.config import ConfigError, config_from_argv, config_to_dict, redact, validate_for_world


def main(argv: list[str]) -> int:
    world_size = None
    if "--world-size" in argv:
        i = argv.index("--world-size")
        world_size, argv = int(argv[i + 1]), argv[:i] + argv[i + 2:]
    try:
        cfg = config_from_argv(argv)
        plan = validate_for_world(cfg, world_size) if world_size else None
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    print(yaml.safe_dump(redact(config_to_dict(cfg, resolved=True)), sort_keys=False), end="")
    if plan is not None:
        print(f"# batch plan: {plan}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

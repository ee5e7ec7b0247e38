"""Compatibility shims for running upstream Megatron-Core where it does not expect to run."""

from sapo_megatron.mcore.cpu import (
    activate_cpu_compat,
    cpu_compat_active,
    deactivate_cpu_compat,
    megatron_core_version,
)

__all__ = ["activate_cpu_compat", "cpu_compat_active", "deactivate_cpu_compat", "megatron_core_version"]

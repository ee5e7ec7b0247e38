"""Every Megatron-Core touch point, version-gated: the supported range and the CPU shims.

Importing this package checks the installed megatron-core against ``version.SUPPORTED`` and
refuses any other release with a message naming both (``mcore/version.py`` says why the bounds).
"""

from sapo_megatron.mcore.version import (
    SUPPORTED,
    UnsupportedMegatronCore,
    check_megatron_core,
    megatron_core_version,
)

check_megatron_core()

from sapo_megatron.mcore.cpu import (  # noqa: E402  (after the version check, on purpose)
    activate_cpu_compat,
    cpu_compat_active,
    deactivate_cpu_compat,
)

__all__ = [
    "SUPPORTED",
    "UnsupportedMegatronCore",
    "activate_cpu_compat",
    "check_megatron_core",
    "cpu_compat_active",
    "deactivate_cpu_compat",
    "megatron_core_version",
]

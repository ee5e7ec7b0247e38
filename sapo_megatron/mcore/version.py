"""The megatron-core releases sapo_megatron supports: declared once, enforced at import.

``SUPPORTED`` is the one declaration. ``setup.py`` reads it from this file (without importing
the package) for its ``install_requires`` pin, and :func:`check_megatron_core` refuses any other
release when ``sapo_megatron.mcore`` is imported, which every Megatron touch point goes through
(model building, the CPU layer, routing replay), so a job fails at start-up with the range and
the installed version named, not hours later inside a changed upstream function.

Why these bounds:
- >= 0.16: routing replay hooks ``TopKRouter.router_replay`` (``megatron/core/transformer/moe/
  router_replay.py``), which 0.15.x does not have.
- < 0.20: the newest release checked is 0.19.2 (CI's second pass runs the Megatron-facing tests
  on it, ``.ci/run``); 0.16.1 is the first pass. A newer release is refused until it passes.

Override for a trial on an unlisted release: ``SAPO_MEGATRON_SKIP_MCORE_VERSION_CHECK=1``.
"""

from __future__ import annotations

import os

SUPPORTED = ">=0.16,<0.20"
# Releases the test suite has run on (CI: 0.16.1 on Python 3.11, 0.19.x on Python 3.12).
TESTED = ("0.16.1", "0.19.2")
SKIP_ENV = "SAPO_MEGATRON_SKIP_MCORE_VERSION_CHECK"


class UnsupportedMegatronCore(ImportError):
    """The installed megatron-core is outside :data:`SUPPORTED` (or missing)."""


def installed_version() -> str | None:
    """The installed megatron-core's version string, None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-core")
    except PackageNotFoundError:
        return None


def is_supported(version: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    # Pre-releases and dev builds of a supported minor (0.19.0rc1, NGC's 0.17.0+nv) count.
    return SpecifierSet(SUPPORTED).contains(Version(version).base_version, prereleases=True)


def check_megatron_core(version: str | None = None) -> str:
    """Return the installed (or given) version; raise :class:`UnsupportedMegatronCore` outside
    :data:`SUPPORTED`, with the range, the version found and what to do."""
    found = installed_version() if version is None else version
    if found is None:
        raise UnsupportedMegatronCore(
            f"sapo_megatron needs megatron-core {SUPPORTED}, which is not installed: "
            f"pip install 'megatron-core{SUPPORTED}'"
        )
    if os.environ.get(SKIP_ENV) == "1" or is_supported(found):
        return found
    raise UnsupportedMegatronCore(
        f"sapo_megatron supports megatron-core {SUPPORTED} (tested: {', '.join(TESTED)}); "
        f"megatron-core {found} is installed. Install a supported release "
        f"(pip install 'megatron-core{SUPPORTED}'), or set {SKIP_ENV}=1 to try this one at your own risk"
    )


def megatron_core_version() -> str:
    """The installed megatron-core version (checked against :data:`SUPPORTED`)."""
    return check_megatron_core()

"""megatron-core versions: one declared range, refused outside it by name, the same pin in setup.py."""

from __future__ import annotations

import re

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from sapo_megatron.mcore import version as mv
from tests.launch import ROOT, run_python


@pytest.mark.parametrize("found", ["0.16.0", "0.16.1", "0.17.1", "0.18.2", "0.19.2", "0.19.0rc1", "0.17.0+nv25.9"])
def test_supported_releases_pass(found):
    assert mv.check_megatron_core(found) == found


@pytest.mark.parametrize("found", ["0.15.3", "0.14.0", "0.20.0", "1.0.0", "0.20.0rc0"])
def test_outside_the_range_is_refused_naming_range_and_version(found, monkeypatch):
    monkeypatch.delenv(mv.SKIP_ENV, raising=False)
    with pytest.raises(mv.UnsupportedMegatronCore) as err:
        mv.check_megatron_core(found)
    message = str(err.value)
    assert mv.SUPPORTED in message and f"megatron-core {found} is installed" in message
    assert mv.SKIP_ENV in message  # says what to do


def test_override_lets_an_unlisted_release_through(monkeypatch):
    monkeypatch.setenv(mv.SKIP_ENV, "1")
    assert mv.check_megatron_core("0.21.0") == "0.21.0"


def test_missing_megatron_core_is_named(monkeypatch):
    monkeypatch.setattr(mv, "installed_version", lambda: None)
    with pytest.raises(mv.UnsupportedMegatronCore, match=re.escape(f"megatron-core {mv.SUPPORTED}, which is not installed")):
        mv.check_megatron_core()


def test_the_installed_release_is_supported():
    assert mv.is_supported(mv.installed_version())


def test_importing_the_mcore_layer_enforces_the_range():
    # A fresh interpreter whose package metadata reports megatron-core 0.15.3: importing the
    # version-gated layer (which model building and the CPU launcher do) must fail by name.
    code = (
        "import importlib.metadata as md\n"
        "real = md.version\n"
        "md.version = lambda name: '0.15.3' if name == 'megatron-core' else real(name)\n"
        "try:\n"
        "    import sapo_megatron.models.builder\n"
        "except ImportError as err:\n"
        "    print('REFUSED:', err)\n"
        "else:\n"
        "    print('ACCEPTED')\n"
    )
    out = run_python("-c", code).stdout
    assert "REFUSED:" in out and "0.15.3" in out and mv.SUPPORTED in out, out


def test_setup_py_pins_the_same_range(tmp_path):
    run_python(str(ROOT / "setup.py"), "-q", "egg_info", "--egg-base", str(tmp_path))
    requires = next(tmp_path.glob("*.egg-info")).joinpath("requires.txt").read_text().splitlines()
    pins = [Requirement(r) for r in requires if r.startswith("megatron-core")]
    assert len(pins) == 1, requires
    assert pins[0].specifier == SpecifierSet(mv.SUPPORTED)
    # Not vacuous: the pin excludes what the range excludes.
    assert not pins[0].specifier.contains("0.15.3") and pins[0].specifier.contains("0.16.1")

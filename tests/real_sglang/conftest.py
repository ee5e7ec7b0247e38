"""Fixtures of the ``real_sglang`` tier: the venv, the tiny model, and servers started ONCE per
session and reset between tests (base weights reloaded from disk), never restarted for speed.

Every test here is marked ``real_sglang`` and ``slow`` (``-m "not dist and not slow"``, the fast
loop, never builds the venv). A failed venv build FAILS the test with pip's last line.
"""

from __future__ import annotations

import os

import pytest

from tests.real_sglang.harness import (
    CORRUPTING_LOADER,
    DELTA_LOADER,
    InstallError,
    RealServer,
    ensure_venv,
    make_tiny_model,
)

API_KEY, ADMIN_KEY = "sapo-test-api-key", "sapo-test-admin-key"
_POOL_KEY = pytest.StashKey()


def pytest_collection_modifyitems(items):
    """Marks the tier's tests, and runs them LAST: `.ci/run` builds the SGLang venv in the
    background meanwhile (``ensure_venv`` waits on its lock), and the servers' memory is never
    held while the rest of the suite runs."""
    here = os.path.dirname(__file__)
    ours = [item for item in items if str(item.fspath).startswith(here)]
    for item in ours:
        item.add_marker(pytest.mark.real_sglang)
        item.add_marker(pytest.mark.slow)
    if ours:
        mine = {id(item) for item in ours}
        items[:] = [item for item in items if id(item) not in mine] + ours


@pytest.fixture(scope="session")
def sglang_python():
    try:
        return ensure_venv()
    except InstallError as err:
        pytest.fail(f"the real_sglang tier could not build its SGLang virtualenv: {err}", pytrace=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("served") / "tiny-qwen3-moe")


class ServerPool:
    """Named servers, each started on first use with its flags and kept for the session."""

    def __init__(self, python, model, log_dir) -> None:
        self.python, self.model, self.log_dir = python, model, log_dir
        self.servers: dict[str, RealServer] = {}

    def get(self, name: str, *, args: tuple[str, ...] = (), env: dict | None = None,
            api_key: str | None = None, admin_key: str | None = None, wait: bool = True) -> RealServer:
        server = self.servers.get(name)
        if server is not None and (server.args, server.env) != (tuple(args), dict(env or {})):
            server.stop()
            server = None
        if server is None:
            server = RealServer(self.python, self.model, args=args, env=env, log_dir=self.log_dir,
                                api_key=api_key, admin_key=admin_key)
            self.servers[name] = server
        if not server.alive():
            server.start(wait=wait)
        return server

    def keyed(self, *names: str) -> RealServer | list[RealServer]:
        """Servers with ``--api-key`` and ``--admin-api-key`` (the trainer reads them from the
        environment variables the test sets), started together; one name gives one server. They
        also register the delta sync's loaders (``--custom-weight-loader``: ours, and the tests'
        corrupting wrapper), which changes nothing until a delta is sent."""
        args = ("--api-key", API_KEY, "--admin-api-key", ADMIN_KEY, "--custom-weight-loader", DELTA_LOADER,
                CORRUPTING_LOADER)
        group = [self.get(name, args=args, api_key=API_KEY,
                          admin_key=ADMIN_KEY, wait=False) for name in names]
        for server in group:
            server.wait_healthy(240.0)
        return group[0] if len(names) == 1 else group

    def reset(self) -> None:
        for server in self.servers.values():
            if server.alive():
                server.reset()

    def stop(self, name: str) -> None:
        if name in self.servers:
            self.servers.pop(name).stop()

    def stop_all(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()


@pytest.fixture(scope="session")
def _pool(sglang_python, tiny_model, tmp_path_factory, request):
    pool = ServerPool(sglang_python, tiny_model, tmp_path_factory.mktemp("sglang-logs"))
    request.config.stash[_POOL_KEY] = pool
    yield pool
    pool.stop_all()


@pytest.fixture
def servers(_pool, request):
    """The session's servers, reset to the launch weights before the test; a test that fails
    gets the tail of each server's log in its report."""
    _pool.reset()
    yield _pool
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for name, server in _pool.servers.items():
            print(f"--- SGLang server {name} ({server.url}) log tail ---\n{server.log_tail()}")


def pytest_runtest_teardown(item, nextitem):
    """The servers stop after the tier's last test (the session fixture would keep them, and
    their memory, until the end of the whole run)."""
    here = os.path.dirname(__file__)
    if (nextitem is None or not str(nextitem.fspath).startswith(here)) and str(item.fspath).startswith(here):
        pool = item.session.config.stash.get(_POOL_KEY, None)
        if pool is not None:
            pool.stop_all()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.rep_call = report

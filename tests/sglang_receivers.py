"""Starting and reading the SGLang-like receiving server (``tests/dist/sglang_receiver.py``),
shared by the weight-sync tests."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.launch import ROOT, clean_env


def start_receiver(port_file: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """A receiver process on a free loopback port (it writes the port to ``port_file``)."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.dist.sglang_receiver", "--port-file", str(port_file),
                             *args], cwd=ROOT, env=clean_env())
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "receiver did not start"
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port_file.read_text()}"


@contextlib.contextmanager
def receiver_pool(tmp_path: Path):
    """``start(*options)``: one receiver per tuple of extra arguments, their URLs; every receiver
    started is killed when the block ends (the tests' ``receivers`` fixtures)."""
    procs: list[subprocess.Popen] = []

    def start(*options: tuple[str, ...]) -> list[str]:
        urls = []
        for extra in options:
            proc, url = start_receiver(tmp_path / f"port{len(procs)}", *extra)
            procs.append(proc)
            urls.append(url)
        return urls

    try:
        yield start
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)


def dump_weights(url: str, path: Path) -> dict:
    """The weights the receiver at ``url`` holds now."""
    from sapo_megatron.rollout.sglang.transport import Transport

    t = Transport(concurrency=1, retries=0, backoff_s=0, api_key_env="X_NONE", admin_api_key_env="X_NONE")
    t.call_json(url, "/_test/dump_weights", {"path": str(path)}, timeout=60)
    return torch.load(path)

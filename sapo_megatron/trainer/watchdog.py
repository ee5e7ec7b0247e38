"""The hang guard: a deadline per phase of the loop, so a hang becomes an error that names it.

A rank that waits in a collective its peers never reach, or on a server or a filesystem that
never answers, prints nothing. torch's process-group timeout (30 minutes by default) is the only
limit, it is the same for every collective, it is fixed when the group is created, and it does
not cover waits outside collectives (an HTTP request, a file write) at all. A step's all-reduce
that takes seconds and a 235B checkpoint that takes twenty minutes cannot share one limit.

So the trainer marks each phase of its loop (``with phase("rollout round 2", 1800):``) and one
daemon thread per process, the :class:`Watchdog`, checks the deadline of the phase the main
thread is in. On expiry it writes to stderr which rank, which phase (and the phases around it),
how long and which config key sets the limit, then every thread's Python stack (the main
thread's first), and ends the process with exit code :data:`EXIT_CODE` (``os._exit``: no clean-up
that could block in turn). torchrun sees a failed worker and stops the others, so the job ends
within the phase's limit with the phase named in its log.

Design choices:
- Entering and leaving a phase appends to and pops from a list, with one clock read; only the
  watchdog thread computes anything, once per ``tick_s``.
- Phases nest. The innermost phase is where the rank is, and its limit governs. A phase's clock
  starts when it is entered and restarts when one of its sub-phases ends (progress), so ``step 3``
  bounds the collectives between its sub-phases, not the sum of them. A sub-phase given no limit
  takes its parent's (``phase("weight sync bucket 7")`` inside ``weight sync``); ``None`` is no
  limit.
- The thread runs while the main thread waits: torch releases the GIL in its collectives and
  tensor operations, as ``time.sleep`` and socket reads do. A C extension that blocks while
  holding the GIL stalls the watchdog too; the process-group timeout stays the backstop there
  (the trainer sets it above every phase limit: ``TimeoutsSection.process_group_s``).
- A heartbeat (``heartbeat_s``) writes one line per rank: its phase and how long it has been in
  it. Off by default: with many ranks it is many lines.
- A debugger paused inside a phase is a hang to the watchdog: set the limits to null to debug.
- Without a started watchdog, :func:`phase` only keeps the record (a test, a tool).

Usage (one process, or each rank under torchrun)::

    from sapo_megatron.trainer import watchdog
    guard = watchdog.start(rank=dist.get_rank(), heartbeat_s=60)
    with watchdog.phase("checkpoint save step 10", 1800, key="run.timeouts.checkpoint_s"):
        save(...)
    guard.stop()
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
import traceback
from typing import Callable, Iterator

EXIT_CODE = 124  # as coreutils' timeout(1)
INHERIT = "inherit"  # a sub-phase's default limit: its parent's


@dataclasses.dataclass
class Phase:
    name: str
    timeout_s: float | None
    key: str | None  # the config key that sets timeout_s, named in the report
    entered: float  # time.monotonic()
    armed: float  # entered, or the end of the last sub-phase: the deadline counts from here


_STACK: list[Phase] = []  # the main thread's phases, innermost last
_CURRENT: list["Watchdog"] = []  # the started watchdog, if any


@contextlib.contextmanager
def phase(name: str, timeout_s: float | None | str = INHERIT, *, key: str | None = None) -> Iterator[Phase]:
    """Run the block as phase ``name``, which may go ``timeout_s`` seconds without progress
    (None: no limit; default: the enclosing phase's). Enter phases on the main thread."""
    if timeout_s == INHERIT:
        parent = _STACK[-1] if _STACK else None
        timeout_s, key = (parent.timeout_s, key or parent.key) if parent else (None, key)
    now = time.monotonic()
    record = Phase(name, timeout_s, key, now, now)
    _STACK.append(record)
    try:
        yield record
    finally:
        _STACK.pop()
        if _STACK:
            _STACK[-1].armed = time.monotonic()


def current_phases() -> list[Phase]:
    """The phases the main thread is in, outermost first (a copy)."""
    return list(_STACK)


def describe(phases: list[Phase]) -> str:
    return " > ".join(p.name for p in phases) or "outside any phase"


class Watchdog:
    """Checks the innermost phase's deadline every ``tick_s`` on a daemon thread (module docstring).

    ``on_expire(message)`` runs on that thread once a deadline passes; the default writes the
    message and every thread's stack to ``stream`` (stderr) and exits the process with
    :data:`EXIT_CODE`. ``heartbeat_s``: write the rank's phase this often (None: never).
    """

    def __init__(self, *, rank: int = 0, heartbeat_s: float | None = None, tick_s: float = 1.0,
                 stream=None, on_expire: Callable[[str], None] | None = None):
        self.rank = rank
        self.heartbeat_s = heartbeat_s
        self.tick_s = min(tick_s, heartbeat_s) if heartbeat_s else tick_s
        self.stream = stream
        self.on_expire = on_expire or self._exit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Watchdog":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sapo-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self in _CURRENT:
            _CURRENT.remove(self)

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(text if text.endswith("\n") else text + "\n")
        stream.flush()

    def _run(self) -> None:
        next_beat = time.monotonic() + self.heartbeat_s if self.heartbeat_s else None
        while not self._stop.wait(self.tick_s):
            now = time.monotonic()
            phases = current_phases()
            if phases and (late := self.overdue(phases, now)) is not None:
                self.on_expire(late)
                return
            if next_beat is not None and now >= next_beat:
                self._write(self.heartbeat(phases, now))
                next_beat = now + self.heartbeat_s

    def overdue(self, phases: list[Phase], now: float) -> str | None:
        """The report when the innermost of ``phases`` is past its deadline, else None."""
        inner = phases[-1]
        if inner.timeout_s is None or now - inner.armed <= inner.timeout_s:
            return None
        limit = f"its limit of {inner.timeout_s:g} s" + (f" ({inner.key})" if inner.key else "")
        return (f"[watchdog] rank {self.rank} timed out in phase '{inner.name}' ({describe(phases)}): "
                f"{now - inner.armed:.1f} s without progress, over {limit}. A peer that never reached the same "
                f"collective, or a server or filesystem that does not answer, keeps a rank in a phase; the "
                f"stacks follow, then this rank exits with code {EXIT_CODE} so that torchrun stops every rank.")

    def heartbeat(self, phases: list[Phase], now: float) -> str:
        if not phases:
            return f"[heartbeat] rank {self.rank}: outside any phase"
        return f"[heartbeat] rank {self.rank}: {describe(phases)} for {now - phases[-1].entered:.1f} s"

    def _exit(self, message: str) -> None:
        self._write(message + "\n" + thread_stacks())
        os._exit(EXIT_CODE)


def thread_stacks() -> str:
    """Every live thread's Python stack but the watchdog's, the main thread's first."""
    frames = sys._current_frames()
    threads = sorted(threading.enumerate(), key=lambda t: t is not threading.main_thread())
    out = []
    for thread in threads:
        frame = frames.get(thread.ident)
        if frame is None or thread is threading.current_thread():
            continue
        out.append(f"Thread {thread.name} (most recent call last):\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(out)


def start(*, rank: int = 0, heartbeat_s: float | None = None, **kwargs) -> Watchdog:
    """Start this process's watchdog (one at a time: a running one is stopped first)."""
    for running in list(_CURRENT):
        running.stop()
    guard = Watchdog(rank=rank, heartbeat_s=heartbeat_s, **kwargs).start()
    _CURRENT.append(guard)
    return guard

"""A wall-clock limit on a block of Python code, in any thread: ``with deadline(5): verify(...)``.

Why not math-verify's own timeouts: math-verify 0.9.0 (the newest release) times out through
``signal.alarm``, and ``signal.signal`` raises ``ValueError`` off the main thread, so its
``parse``/``verify`` fail in the worker threads that asynchronous rollout scores rewards in
(trl#5281 and verl#5635 hit the same; verl's scores went silently to 0). We call math-verify
with its timeouts off and bound the call here instead.

How: a timer thread raises :class:`DeadlineExceeded` inside the guarded thread with
``PyThreadState_SetAsyncExc``. The exception lands at the next bytecode boundary, which is
enough for SymPy (pure Python); a single long C call (one huge integer power) finishes first.
A raise that was scheduled but not yet delivered when the block ends is withdrawn, so the
exception never escapes past the ``with``.
"""

from __future__ import annotations

import ctypes
import threading


class DeadlineExceeded(Exception):
    """The guarded block ran longer than its deadline."""


_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)


class deadline:
    """``with deadline(seconds):`` raises :class:`DeadlineExceeded` in this thread if the block
    runs past ``seconds``; ``None`` or ``<= 0`` means no limit. A class rather than a generator
    so that nothing of ours runs between the block's end and the disarming of the timer."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._active = self._fired = False

    def _fire(self) -> None:
        with self._lock:
            if self._active:
                self._fired = True
                _set_async_exc(self._thread_id, ctypes.py_object(DeadlineExceeded))

    def __enter__(self) -> "deadline":
        if self.seconds is None or self.seconds <= 0:
            return self
        self._thread_id = threading.get_ident()
        self._active, self._fired = True, False
        self._timer = threading.Timer(self.seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._timer is None:
            return False
        with self._lock:
            self._active = False
            fired = self._fired
        self._timer.cancel()
        self._timer = None
        if not fired:
            return False
        # Withdraw a raise that has not landed yet (a NULL exception clears the pending one).
        _set_async_exc(self._thread_id, ctypes.py_object())
        if exc_type is None:
            # The block finished after the deadline, before the raise landed: still too late.
            raise DeadlineExceeded(f"ran longer than {self.seconds} s")
        return False

"""Wall-clock deadlines for reward calls, so one slow sample cannot stall a training step.

Two mechanisms, picked per call:

* **Main thread on POSIX** (the trainer's case): ``signal.setitimer(ITIMER_REAL)`` delivers
  SIGALRM at the deadline and the handler raises :class:`RewardTimeout` *inside* the reward,
  which interrupts runaway Python-level work (sympy, regexes in Python loops, ``time.sleep``).
  The exception derives from ``BaseException`` so ``except Exception`` blocks inside a reward
  (math-verify has several) cannot swallow it; a reward that swallows it anyway (bare
  ``except:``) is still reported as timed out, because the handler records that it fired.
  A single long C call (e.g. one huge integer multiplication) is only interrupted when it
  returns to Python, which is why the countdown reward bounds its values itself.
* **Any other thread**: signals can only be handled on the main thread, so the reward runs in
  a daemon worker thread that is waited on until the deadline. A worker that overruns is
  abandoned (Python cannot kill a thread): it may keep using CPU until it finishes.

math-verify implements its own timeouts with ``signal.alarm``, which shares ITIMER_REAL with
the first mechanism and cannot run off the main thread; :func:`deadline_active` and
:func:`on_main_thread` let the math reward switch math-verify's timeouts off when this module
already bounds the call (or when it could not use signals).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_HAS_ITIMER = hasattr(signal, "setitimer") and hasattr(signal, "SIGALRM")
_active_alarm = False  # True while a signal deadline of this module is armed (main thread only)
_worker = threading.local()  # .bounded is True in a worker thread run under a deadline


class RewardTimeout(BaseException):
    """A reward call ran past its deadline (BaseException: ``except Exception`` must not catch it)."""


def on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def signal_deadline_active() -> bool:
    """Whether a SIGALRM deadline of this module is armed for the current (main-thread) call."""
    return _active_alarm and on_main_thread()


def deadline_active() -> bool:
    """Whether the current call runs under a deadline of this module (either mechanism)."""
    return signal_deadline_active() or getattr(_worker, "bounded", False)


def call_with_deadline(fn: Callable[..., T], timeout_s: float | None, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, raising :class:`RewardTimeout` past ``timeout_s`` seconds of wall
    time. ``timeout_s`` None or <= 0 means no deadline."""
    if timeout_s is None or timeout_s <= 0:
        return fn(*args, **kwargs)
    if _HAS_ITIMER and on_main_thread():
        return _call_with_alarm(fn, float(timeout_s), args, kwargs)
    return _call_in_thread(fn, float(timeout_s), args, kwargs)


def _call_with_alarm(fn: Callable[..., T], timeout_s: float, args, kwargs) -> T:
    global _active_alarm
    state = {"armed": True, "fired": False}

    def on_alarm(signum, frame):
        if state["armed"]:
            state["fired"] = True
            raise RewardTimeout(f"reward call exceeded {timeout_s:g}s")

    start = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_active = _active_alarm
    _active_alarm = True
    outer_delay, outer_interval = 0.0, 0.0
    timed_out = False
    try:
        outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            try:
                result = fn(*args, **kwargs)
            finally:
                state["armed"] = False  # a signal arriving from here on is ignored
                signal.setitimer(signal.ITIMER_REAL, 0)
        except RewardTimeout:
            # Raised by our handler, possibly inside the finally above when the deadline fell
            # right after fn returned: the one-shot timer has fired, nothing more will come.
            timed_out = True
    finally:
        signal.signal(signal.SIGALRM, previous_handler)
        _active_alarm = previous_active
        if outer_delay > 0:  # an enclosing timer was armed: give it back what is left of it
            left = outer_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-6), outer_interval)
    if timed_out or state["fired"]:  # fired but swallowed by a bare except inside fn
        raise RewardTimeout(f"reward call exceeded {timeout_s:g}s")
    return result


def _call_in_thread(fn: Callable[..., T], timeout_s: float, args, kwargs) -> T:
    box: dict[str, Any] = {}

    def run():
        _worker.bounded = True
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    worker = threading.Thread(target=run, name="reward-deadline", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise RewardTimeout(f"reward call exceeded {timeout_s:g}s (worker thread abandoned)")
    if "error" in box:
        raise box["error"]
    return box["value"]

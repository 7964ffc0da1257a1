"""The package's one error family. Library code raises these; only the entry points (the recipes,
``grpo-eval.py``, the rewards CLI) turn them into a one-line message and an exit status."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class GRPOError(Exception):
    """Base of every error raised on purpose. ``kind`` prefixes the one-line message."""

    kind = "error"

    def __init__(self, message: str = "", *, checkpoint_step: int | None = None):
        super().__init__(message)
        #: Step of the last checkpoint written before the error reached the entry point (if any).
        self.checkpoint_step = checkpoint_step

    def one_line(self) -> str:
        where = f"; last checkpoint: step {self.checkpoint_step}" if self.checkpoint_step else ""
        return f"{self.kind}: {self}{where}"


class ConfigError(GRPOError, ValueError):
    """A config value is inconsistent, unknown or short of resources; the message names the key."""

    kind = "config error"


class DataError(GRPOError, ValueError):
    """A data file or row is not what the config says it should be (message names ``file:line``)."""

    kind = "data error"


class ModelError(GRPOError):
    """A model or tokenizer cannot be loaded from what ``model.name`` points at."""

    kind = "model error"


class RewardError(GRPOError, RuntimeError):
    """A reward failed on every sample for ``reward.stop_after_failed_steps`` calls in a row: the run
    would only be training on zeros. The message names the reward and its last error."""

    kind = "reward error"


class CheckpointError(GRPOError):
    """A checkpoint to resume from is missing or unreadable."""


class CollectorFailed(GRPOError, RuntimeError):
    """A collector actor died or stopped answering; the message says which and why."""


class WeightSyncError(GRPOError, RuntimeError):
    """Weights could not be delivered to an inference worker."""


class Terminated(BaseException):
    """The process got SIGTERM (e.g. from a scheduler); raised so the run unwinds and checkpoints.

    A ``BaseException``, like ``KeyboardInterrupt``: the signal can land inside library code that
    catches ``Exception`` (Ray wraps an ``Exception`` raised while it deserializes a result into a
    ``RaySystemError``), and it must reach the loop and the entry point as itself."""

    checkpoint_step: int | None = None

    def __str__(self) -> str:
        return "terminated (SIGTERM)"

    def one_line(self) -> str:
        return GRPOError.one_line(self)  # same format: "error: terminated (SIGTERM); last checkpoint: step N"

    kind = GRPOError.kind


def raise_on_sigterm() -> None:
    """A scheduler's SIGTERM unwinds like Ctrl-C (checkpoint, shut Ray down) instead of killing the
    process outright. Ray's ``init`` installs its own handler, so this runs again after it."""
    import signal

    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM that arrive inside the block take effect when it ends (their handlers
    then run as usual). Python runs signal handlers in the main thread at any bytecode, whichever
    thread the signal reached, so blocking it with ``pthread_sigmask`` is not enough: the handlers
    are swapped for ones that only record the signal. Main thread only."""
    import signal

    pending: list[int] = []
    kinds = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in kinds}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)

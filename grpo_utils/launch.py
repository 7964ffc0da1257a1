"""The edge of the program: what a recipe script's ``main`` runs inside. Library code raises
:class:`~grpo_utils.errors.GRPOError`; here, and only here, it becomes one line and an exit status."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpo_utils.config  # noqa: F401  (registers the config schema with Hydra before it composes)
from grpo_utils.errors import GRPOError, Terminated

INTERRUPTED_EXIT_CODE = 130  # the shell's code for a Ctrl-C


@contextmanager
def exit_on_error() -> Iterator[None]:
    """A :class:`GRPOError` exits with its one line (naming the last checkpoint when the loop wrote
    one); Ctrl-C exits with status 130 after the same line on stderr. Anything else propagates
    with its traceback: it is a bug, not a user error."""
    try:
        yield
    except (GRPOError, Terminated) as e:
        sys.exit(e.one_line())
    except KeyboardInterrupt as e:
        step = getattr(e, "checkpoint_step", None)
        print("interrupted" + (f"; last checkpoint: step {step}" if step else ""), file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)


def launch(main: Callable[[], None], mode: str | None, config_dir: str | Path,
           default_config: str = "grpo_quickstart") -> None:
    """Run a recipe's ``@hydra.main`` function: with ``mode=<mode>`` unless the command line picks
    a mode itself (each recipe defaults to its own mode whatever ``--config-name`` says), after
    checking the command line's keys and values against the config (one line, before Hydra): the
    config name and directory, and, for a ``-m`` sweep, every job through the pre-load checks."""
    if mode and not any(arg.split("=", 1)[0].lstrip("+~") == "mode" for arg in sys.argv[1:]):
        sys.argv.append(f"mode={mode}")
    own_configs = any(arg.split("=", 1)[0] in ("--config-path", "-cp", "--config-dir", "-cd") for arg in sys.argv)
    from grpo_utils.config.cli import check_command_line, check_config_name, split_argv

    with exit_on_error():
        if own_configs:
            check_config_name(sys.argv[1:], config_dir, split_argv(sys.argv[1:])[0])
        else:
            check_command_line(sys.argv[1:], config_dir, default_config)
            if mode and any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
                check_sweep(sys.argv[1:], config_dir, default_config, mode)
    main()


def check_sweep(argv: list[str], config_dir: str | Path, default_config: str, mode: str) -> None:
    """A ``-m`` sweep: every job's config passes the pre-load checks before job 0 starts (a bad
    value in job 3 would otherwise stop the sweep after jobs 0-2 trained)."""
    from grpo_utils.config.cli import compose_jobs
    from grpo_utils.train.run import check_run

    for i, cfg in enumerate(compose_jobs(argv, config_dir, default_config, mode)):
        try:
            check_run(cfg, mode)
        except GRPOError as e:
            raise type(e)(f"sweep job {i}: {e}") from None

"""Exceptions -> exit codes, for every command: one line for what the user can fix, a traceback for bugs.

2: the input or config (`MtftError`, and Hydra's or OmegaConf's composition errors); 74: a file the run
must write (`StorageError`, or an `OSError` of that kind); 75: stopped by a signal after a checkpoint
(`Interrupted`); 128 + N: a worker killed by signal N (`WorkerKilled`).
"""

from __future__ import annotations

import logging
import sys

from mtft.core.errors import Interrupted, MtftError, StorageError, WorkerKilled, config_error_message

log = logging.getLogger("mtft")

USAGE_ERROR = 2


def exit_status(error: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for an error the user should see as a message; None for a bug."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, OSError) and not isinstance(error, BrokenPipeError):
        storage = StorageError.from_os_error(error)
        if storage is None:
            return None
        error = storage
    if isinstance(error, MtftError | HydraException | OmegaConfBaseException):
        return USAGE_ERROR, config_error_message(error)
    if isinstance(error, StorageError | Interrupted | WorkerKilled):
        return error.exit_code, str(error)
    return None


def fail(error: Exception, logged: bool = False, resume_hint: str = "") -> int:
    """Report `error` as its one line and return its exit code; re-raise it when it is a bug. `logged`:
    through the "mtft" logger (console and train.log in a training job), else on stderr.
    `resume_hint` follows a resumable stop's message."""
    status = exit_status(error)
    if status is None:
        raise error
    code, message = status
    if code == Interrupted.exit_code:
        message += resume_hint
    else:
        message = f"error: {message}"
    if not logged:
        print(message, file=sys.stderr)
    elif code == Interrupted.exit_code:
        log.warning("%s", message)
    else:
        log.error("%s", message)
    return code

"""The exceptions users see as a message rather than a stack trace, and their exit codes."""

from __future__ import annotations

import errno
import signal


class MtftError(Exception):
    """A problem with the user's input or config: printed as `error: <message>`, exit code 2."""


class Interrupted(Exception):
    """The run was stopped by a signal after saving a checkpoint; `mtft train ... trainer.resume=auto` continues it."""

    exit_code = 75  # EX_TEMPFAIL: "try again" — schedulers and scripts can tell it from a failure

    def __init__(self, step: int, checkpoint: str) -> None:
        super().__init__(f"stopped at step {step}; checkpoint saved to {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class WorkerKilled(Exception):
    """A worker of a multi-process job was killed by a signal (the kernel's out-of-memory killer's
    SIGKILL, an operator's kill): the job exits 128 + the signal's number, as a shell reports a
    process killed by it, and says which rank it was."""

    def __init__(self, rank: int, signum: int, resume_hint: str) -> None:
        name = signal.Signals(signum).name
        why = " (out of memory? the kernel's OOM killer sends it)" if signum == signal.SIGKILL else ""
        super().__init__(f"worker rank {rank} was killed by {name}{why}; {resume_hint}")
        self.exit_code = 128 + signum


class StorageError(Exception):
    """A file the run must write could not be: the disk or quota is full, the file system is
    read-only, a path is not writable. Exit 74 (EX_IOERR); the checkpoints already published stay
    usable, so the run continues from the last one once this is fixed."""

    exit_code = 74
    ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})

    @classmethod
    def from_os_error(cls, error: OSError) -> StorageError | None:
        """The one-line error for an OSError of this kind; None for any other OSError."""
        if error.errno not in cls.ERRNOS:
            return None
        path = f": {error.filename}" if error.filename else ""
        return cls(f"{error.strerror}{path} (once fixed, continue the run with trainer.resume=auto)")


def config_error_message(error: BaseException) -> str:
    """Hydra's or OmegaConf's multi-line message as one line: the innermost cause, prefixed by its key
    (an MtftError's own message as it is)."""
    while error.__cause__ is not None and not isinstance(error, MtftError):  # ours is already one line
        error = error.__cause__
    meta = ("full_key:", "object_type=", "reference_type=")
    lines = [
        line.strip() for line in str(error).splitlines() if line.strip() and not line.strip().startswith(meta)
    ]
    message = " ".join(lines) or type(error).__name__
    key = getattr(error, "full_key", None)
    return f"{key}: {message}" if key and key not in message else message

"""Errors gradlab reports to users as one line each, never as a traceback."""

from __future__ import annotations

import re


def first_line(err: BaseException) -> str:
    """The first informative line of an exception's message, for a one-line report: terminal
    colour codes removed, Keras's "Exception encountered when calling ..." preamble skipped; the
    exception's type name when the message is empty."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line and not line.startswith("Exception encountered")]
    return lines[0] if lines else type(err).__name__


class GradlabError(Exception):
    """An error the user can fix; the CLI prints ``str(err)`` and exits with ``exit_code``."""

    exit_code = 1


class ConfigError(GradlabError):
    """One or more problems in an experiment config.

    Each problem is one line, ``FILE:LINE: key.path: what is wrong (what is allowed)``.
    ``problems`` keeps them as ``(file, line, path, message)`` tuples for tests and tools.
    """

    exit_code = 2

    def __init__(self, problems: list[tuple[str, int | None, str, str]]):
        self.problems = list(problems)
        super().__init__("\n".join(self.format_one(*p) for p in self.problems))

    @staticmethod
    def format_one(file: str, line: int | None, path: str, message: str) -> str:
        where = f"{file}:{line}" if line else file
        return f"{where}: {path}: {message}" if path else f"{where}: {message}"


class UsageError(GradlabError):
    """A bad command-line argument (a value out of range, a path that is not what it should be)."""

    exit_code = 2


class DataError(GradlabError):
    """Bad data: a label out of range, NaN/Inf features, a shape mismatch, an unreadable file."""

    exit_code = 2


class DeviceError(GradlabError):
    """The requested device is not available (for example ``train.device: gpu`` without a GPU)."""

    exit_code = 2


class RunDirError(GradlabError):
    """The run directory cannot be created, would overwrite a run, or cannot be written."""

    exit_code = 2


class NonFiniteError(GradlabError):
    """Training stopped because a loss or gradient became NaN/Inf (``nonfinite`` action ``stop``)."""

    exit_code = 3


class StorageError(RunDirError):
    """Writing to the run directory failed (disk full, permissions, I/O error) during a run."""

    exit_code = 2


class WorkerLostError(GradlabError):
    """Another worker of a multi-worker run died or became unreachable."""

    exit_code = 4


class UserCodeError(GradlabError):
    """A user's own callback or diagnostic (from ``callbacks:`` or a ``diagnostics`` import path)
    raised during training; the message names its config entry and the hook."""

    exit_code = 2


class RunInterrupted(GradlabError, KeyboardInterrupt):
    """Ctrl-C (SIGINT) during training: a checkpoint was saved; the message says how to resume."""

    exit_code = 130

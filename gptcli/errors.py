"""The two kinds of failure gptcli reports, and the exit code each maps to.

Library code raises these; only ``cli.py`` turns them into a one-line message
and an exit code. Anything else that escapes is a bug and keeps its traceback.

A library message names what a notebook caller passed: a parameter (``top_k: must be >= 1``)
or a config key (``train.device 'cuda': ...``), never a command-line flag. The error keeps that
name in ``param``, and other parameters the message mentions are written as Python keywords
(``overwrite=True``); the CLI maps both onto its flags (``--top-k``, ``--device (train.device)``,
``--overwrite``).
"""

from __future__ import annotations


class GptcliError(Exception):
    """Base class: a failure the user can act on, described in one line."""

    exit_code = 1

    def __init__(self, message: str = "", *, param: str | None = None):
        super().__init__(message)
        self.param = param  # the parameter or dotted config key the message begins with, if any


class InputError(GptcliError):
    """Bad usage or bad input (a config, a data file, a flag): exit code 2."""

    exit_code = 2


class RunError(GptcliError):
    """A runtime failure (a corrupt checkpoint, a diverged run, a network error): exit code 1."""

    exit_code = 1


def first_line(e: BaseException, limit: int | None = 200) -> str:
    """The first line of an exception's message, for one-line reports (at most `limit` characters)."""
    return (str(e).strip().splitlines() or [""])[0][:limit]

"""The two kinds of failure gptcli reports, and the exit code each maps to.

Library code raises these; only ``cli.py`` turns them into a one-line message
and an exit code. Anything else that escapes is a bug and keeps its traceback.
"""


class GptcliError(Exception):
    """Base class: a failure the user can act on, described in one line."""

    exit_code = 1


class InputError(GptcliError):
    """Bad usage or bad input (a config, a data file, a flag): exit code 2."""

    exit_code = 2


class RunError(GptcliError):
    """A runtime failure (a corrupt checkpoint, a diverged run, a network error): exit code 1."""

    exit_code = 1


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, for one-line reports."""
    return (str(e).strip().splitlines() or [""])[0][:limit]

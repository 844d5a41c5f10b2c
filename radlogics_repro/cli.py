"""What the command-line entry points share: user errors become one line on stderr and exit code 2.

Library code raises its own exception types (``StudyReadError``, ``DatasetError``,
``ModelLoadError``, ...), each with a one-line message naming the file and the problem. The entry
points wrap their work in :func:`exit_on_user_error`, which prints ``error: <message>`` and exits
with status 2, with no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import sys

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Base for errors caused by the user's input or settings (not by a bug)."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean "bad input": shown as one line, exit code 2."""
    from radlogics_repro.data import DatasetError
    from radlogics_repro.io import StudyReadError
    from radlogics_repro.models import ModelLoadError, PretrainedWeightsError

    return (UserError, StudyReadError, DatasetError, ModelLoadError, PretrainedWeightsError,
            FileExistsError)


@contextlib.contextmanager
def exit_on_user_error():
    """Turn a user error raised inside the block into ``error: <one line>`` and exit code 2."""
    try:
        yield
    except user_error_types() as err:
        message = " ".join(str(err).split())
        log.debug("user error: %s", message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)

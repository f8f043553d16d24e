# SPDX-License-Identifier: Apache-2.0
"""User errors in one line: a problem that is the user's to fix (a missing folder or file, a bad dataset.json, an
unusable output folder, a bad command-line value) ends a command with ``<command>: error: <message>`` on stderr,
not with a traceback.

``python -m monai.bundle run`` offers no place to catch them: an error raised by a config expression reaches the
top wrapped in MONAI's ``RuntimeError: Failed to evaluate ConfigExpression``, at the end of a traceback of 50 to
70 lines with the reason in its middle. Every bundle config imports :mod:`bundletools`, which installs
:func:`excepthook` (:func:`install_excepthook`). Python calls the hook only for an exception that ends the
process, so code that catches exceptions (pytest, MONAI Label's server, a ``ConfigWorkflow`` run in-process)
sees no difference, and any other exception keeps its traceback. The traceback of a user error is printed too,
before its line, with ``BUNDLETOOLS_TRACEBACK=1`` or with the ``bundletools`` logger at ``DEBUG``.
"""

from __future__ import annotations

import logging
import os
import sys
from types import TracebackType

__all__ = ["CommandLineError", "user_error", "one_line", "traceback_wanted", "excepthook", "install_excepthook"]

TRACEBACK_VARIABLE = "BUNDLETOOLS_TRACEBACK"


class CommandLineError(ValueError):
    """A command line cannot be run; the message says why in one line. (Defined here, not in
    :mod:`bundletools.infer`: run as ``python -m bundletools.infer``, that module is ``__main__``, and a class
    defined there would not be the one this module checks for.)"""


def user_error(error: BaseException) -> BaseException | None:
    """The error in ``error``'s chain of causes that is the user's to fix, if any: a
    :class:`~bundletools.data.DatasetError`, :class:`~bundletools.outputs.BatchError`,
    :class:`CommandLineError` or ``FileNotFoundError``.

    Only explicit causes (``raise ... from``) are followed, as MONAI's wrappers raise them: an exception raised
    while another was being handled (``__context__``) is a new problem, and its traceback must stay visible.
    """
    from .images import DatasetError
    from .outputs import BatchError

    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, (CommandLineError, DatasetError, BatchError, FileNotFoundError)):
            return e
        seen.add(id(e))
        e = e.__cause__
    return None


def one_line(error: BaseException) -> str:
    """``error``'s message on one printable line: a message listing problems one per line (``title:`` then
    ``  - problem`` lines) becomes ``title: problem; problem``."""
    from .report import printable

    lines = [line.strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(error).__name__
    items = [line[2:] if line.startswith("- ") else line for line in lines[1:]]
    return printable(" ".join([lines[0], "; ".join(items)]) if items else lines[0])


def traceback_wanted() -> bool:
    """Whether a user error is shown with its traceback: ``BUNDLETOOLS_TRACEBACK=1``, or the ``bundletools``
    logger at ``DEBUG`` (a bundle's ``logging.conf`` with ``level=DEBUG``)."""
    return os.environ.get(TRACEBACK_VARIABLE) == "1" or logging.getLogger("bundletools").isEnabledFor(logging.DEBUG)


def _command() -> str:
    """The command that is running, as users typed it after ``python -m`` (``monai.bundle``), or the script."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return spec.name.removesuffix(".__main__")
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


def excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """``sys.excepthook``: a user error (:func:`user_error`) as ``<command>: error: <message>`` on stderr, the
    last line printed; anything else with Python's traceback."""
    cause = user_error(exc)
    if cause is None or traceback_wanted():
        sys.__excepthook__(exc_type, exc, tb)
    if cause is None:
        return
    try:
        sys.stdout.flush()  # log lines still buffered must come out before the error, not after it
    except (OSError, ValueError):
        pass
    print(f"{_command()}: error: {one_line(cause)}", file=sys.stderr, flush=True)


def install_excepthook() -> None:
    """Make :func:`excepthook` the process's ``sys.excepthook``, unless another program (IPython, a debugger, an
    error reporter) installed its own: then that one stays."""
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = excepthook

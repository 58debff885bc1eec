"""User-facing errors. The CLI prints `str(err)` as one line and exits with `err.exit_code`, no traceback."""

from __future__ import annotations

import numbers


class WsiVssmError(Exception):
    """Base of every error the CLI reports as one line (bad input, missing optional piece...)."""

    exit_code = 1


class UsageError(WsiVssmError):
    """A request that cannot be satisfied as stated: bad input (a table, a recipe, a folder) or bad arguments to a
    library call. On the command line it exits 1; an option's own value is an `OptionError` (exit 2)."""


class OptionError(UsageError):
    """A command-line option's value is rejected (e.g. `--region-px 100` with 32 px tokens): exit 2, as click's
    own usage errors. The message names the option. Raised by `commands`, never for values that come from a
    model file or a slide (those are bad input, exit 1)."""

    exit_code = 2


class MissingDependency(WsiVssmError):
    """An optional package is not installed, or is and fails to load (`broken`: why); the message says how to
    install or repair it."""

    def __init__(self, what: str, install: str, broken: str | None = None):
        super().__init__(f"{what} is not installed; install it with: {install}" if broken is None else
                         f"{what} is installed but fails to load ({one_line(broken)}); repair it with: {install}")
        self.install = install


ONE_LINE_LIMIT = 300  # characters: long enough for a path and a reason, short enough for one terminal line
# our warnings often name a path and then several reasons: cut at ONE_LINE_LIMIT, a long path lost the reasons
WARNING_LINE_LIMIT = 1000


def one_line(err: BaseException | str, limit: int = ONE_LINE_LIMIT) -> str:
    """An error's text on one line (whitespace runs folded to one space), cut to `limit` characters with "...",
    at a word's end when one is near (a word cut in half reads as a different word).

    The one helper for every one-line error message; an error with no text gives its type name.
    """
    text = " ".join(str(err).split())
    if not text:
        text = type(err).__name__ if isinstance(err, BaseException) else ""
    if len(text) <= limit:
        return text
    cut = text[: limit - 3]
    space = cut.rfind(" ")
    if text[limit - 3] != " " and space > limit * 3 // 4:  # mid-word: end at the last whole word instead
        cut = cut[:space]
    return cut.rstrip(" ,;:(") + "..."


def warn_in_one_line(prog: str) -> None:
    """From now on, print each warning as `PROG: warning: ...`, one line on stderr, as the wsi-vssm command does
    (Python's own format adds the file and source line that raised it: noise to a user of a `python -m` tool)."""
    import sys
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{prog}: warning: {one_line(message, WARNING_LINE_LIMIT)}", file=sys.stderr)

    warnings.showwarning = show


def printable(text: str) -> str:
    """`text` with its control characters escaped (`\\n`, `\\x1b`): names from files (slides, model files) go into
    one-line messages, terminals (an escape sequence could clear the screen or retitle the window), CSV and JSON."""
    import unicodedata

    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) == "Cc" else c
                   for c in text)


def is_real_number(value) -> bool:
    """A real number, numpy's included (NaN too: range checks refuse it), not a bool or a string: what argument
    checks test before comparing, so that "1" or None is their one-line error rather than a TypeError."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)

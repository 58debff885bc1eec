"""Progress for long loops (slides, regions, epochs): tqdm bars on a terminal, plain lines otherwise.

On a terminal (stderr is a TTY) each loop gets a bar on stderr and per-slide lines are written through tqdm
so they do not break the bars. In logs (not a TTY: nohup, SLURM, CI) there are no bars: one line per finished
slide and, while a run of several slides works, a line on stderr every minute saying how far it is
("predict slides: 57 of 160 through, 12 min in, about 21 min left; tumor_058 for 4 min"), so a log shows which
slide is working and that the job has not hung. `quiet` keeps only errors and warnings; `verbose` adds the
run's model and parameters and cluster details.

Result lines (one per slide) go to stdout; progress, warnings and errors to stderr. With `--json` stdout holds
only JSON records, one a line (one per slide, and evaluate's report), and the result lines join stderr.
"""

from __future__ import annotations

import contextlib
import errno
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

import click

QUIET, NORMAL, VERBOSE = 0, 1, 2
HEARTBEAT_S = 60.0  # off a terminal: the longest a run of several slides stays silent


class Progress:
    """What a command shows while it works. `level`: QUIET, NORMAL or VERBOSE; `tty`: None asks stderr."""

    def __init__(self, level: int = NORMAL, tty: bool | None = None, err: TextIO | None = None,
                 json_lines: bool = False):
        self.level = level
        self.json_lines = json_lines  # --json: stdout holds one JSON object per line (`record`), nothing else
        self._err = err
        self.tty = bool(tty) if tty is not None else _isatty(err or sys.stderr)
        self._bars: list = []
        self._current: tuple[str, float] | None = None  # the slide being worked on, and since when
        self._worked = [0, 0.0]  # slides worked on (not skipped) and their seconds: what the time left is made of

    def working_on(self, name: str | None) -> None:
        """The slide now being worked on (None: it ended), for the lines of a log and their time left."""
        if name is None and self._current is not None:
            self._worked[0] += 1
            self._worked[1] += time.monotonic() - self._current[1]
        self._current = None if name is None else (name, time.monotonic())

    @classmethod
    def from_flags(cls, quiet: bool = False, verbose: bool = False, json_lines: bool = False) -> Progress:
        return cls(QUIET if quiet else VERBOSE if verbose else NORMAL, json_lines=json_lines)

    @property
    def bars(self) -> bool:
        return self.tty and self.level >= NORMAL

    # -- lines
    def result(self, text: str) -> None:
        """A per-slide result line (stdout; stderr with --json, where stdout is the records'); not shown with
        --quiet."""
        if self.level >= NORMAL:
            self._write(text, err=self.json_lines)

    def record(self, obj: dict) -> None:
        """With --json: one JSON object on one stdout line, whatever the level (it is what was asked for)."""
        if self.json_lines:
            import json

            from wsi_vssm.atomic import to_jsonable  # NaN as null (JSON has none), numpy values as Python's

            self._write(json.dumps(to_jsonable(obj), allow_nan=False, default=str), err=False)

    def info(self, text: str) -> None:
        """A status line on stderr (e.g. the model and device in use); not shown with --quiet."""
        if self.level >= NORMAL:
            self._write(text, err=True)

    def detail(self, text: str) -> None:
        """Only with --verbose."""
        if self.level >= VERBOSE:
            self._write(text, err=True)

    def warn(self, text: str) -> None:
        self._write(f"wsi-vssm: warning: {' '.join(text.split())}", err=True)

    def error(self, text: str) -> None:
        """Always shown: one line, so a CI log shows every failure."""
        self._write(f"wsi-vssm: error: {' '.join(text.split())}", err=True)

    def _write(self, text: str, err: bool) -> None:
        # a file name that is not UTF-8 reaches Python with lone surrogates, which no stream can encode: escape them
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        if self._bars:
            from tqdm import tqdm

            # through tqdm, so an active bar is redrawn below the line instead of being torn
            tqdm.write(text, file=(self._err or sys.stderr) if err else sys.stdout)
        else:
            click.echo(text, err=err, file=self._err if err else None)

    # -- bars
    @contextlib.contextmanager
    def bar(self, total: int | None, desc: str, unit: str = "it", leave: bool = True) -> Iterator[Callable]:
        """A bar over `total` steps; yields `update(n_done)`. Off a terminal no bar is drawn; a loop of several
        steps then writes a line every HEARTBEAT_S seconds instead (none with --quiet)."""
        if not self.bars:
            if self.level < NORMAL or not total or total < 2:
                yield lambda done=None: None
                return
            with self._heartbeat(total, desc) as update:
                yield update
            return
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit=unit, leave=leave, file=self._err or sys.stderr,
                   position=len(self._bars), dynamic_ncols=True)
        self._bars.append(bar)

        def update(done: int | None = None) -> None:
            bar.n = bar.n + 1 if done is None else done
            bar.refresh()

        try:
            yield update
        finally:
            self._bars.remove(bar)
            bar.close()

    @contextlib.contextmanager
    def _heartbeat(self, total: int, desc: str) -> Iterator[Callable]:
        """Off a terminal: a line on stderr every HEARTBEAT_S seconds while the loop runs, from a daemon thread
        (the work itself holds the main one for minutes at a time on a real slide)."""
        t0, seen, stop = time.monotonic(), {"done": 0}, threading.Event()
        self._worked = [0, 0.0]

        def update(done: int | None = None) -> None:
            seen["done"] = seen["done"] + 1 if done is None else done

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                self._write(_how_far(desc, seen["done"], total, time.monotonic() - t0, self._current,
                                     self._worked), err=True)

        thread = threading.Thread(target=beat, name="wsi-vssm-progress", daemon=True)
        thread.start()
        try:
            yield update
        finally:
            stop.set()
            thread.join()
            self._current = None

    @contextlib.contextmanager
    def regions(self, name: str) -> Iterator[Callable[[int, int], None] | None]:
        """Yields a `progress(done, total)` callback for one slide's regions: a transient bar on a terminal,
        None otherwise (no per-region lines in logs). The bar is closed however the slide ends."""
        if not self.bars:
            yield None
            return
        state: dict = {}

        def update(done: int, total: int) -> None:
            if "ctx" not in state:
                state["ctx"] = self.bar(total, name, unit="region", leave=False)
                state["update"] = state["ctx"].__enter__()
            state["update"](done)

        try:
            yield update
        finally:
            if "ctx" in state:
                state["ctx"].__exit__(None, None, None)


class ClosedPipeGuard:
    """The command line's sys.stdout: when the reader of its pipe ends (`| head -1`, a `tee` or monitor that
    died) or the file it goes to cannot grow (`> log` on a full disk or over quota), the stream is sent to
    /dev/null and that is said once on stderr, so the command goes on and writes its files. Without it the first
    line that could not be printed ended the command (click's broken-pipe exit: code 1, no message; an
    evaluation lost its metrics.json, a training run its remaining epochs)."""

    # errors of the stream itself, not of the command: a full disk or quota, a file too large
    _FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

    def __init__(self, stream):
        self._stream, self._closed = stream, False

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as e:
            self._close(e)
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError as e:
            self._close(e)

    def _close(self, err: OSError) -> None:
        if not isinstance(err, BrokenPipeError) and err.errno not in self._FULL:
            raise err
        if not self._closed:
            self._closed = True
            _discard(self._stream)
            why = ("was closed (the reader of its pipe ended)" if isinstance(err, BrokenPipeError)
                   else f"cannot be written ({err.strerror})")
            click.echo(f"wsi-vssm: warning: standard output {why}: its lines are dropped; the command goes on "
                       "and writes its files", err=True)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _discard(stream) -> None:
    """Point `stream`'s file descriptor at /dev/null, so that its later writes and the flush at exit succeed."""
    import os

    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def _how_far(desc: str, done: int, total: int, elapsed: float, current: tuple[str, float] | None,
             worked: list | None = None) -> str:
    """`predict slides: 57 of 160 through, 12 min in, about 21 min left; tumor_058 for 4 min`. The time left is
    the mean time of the slides worked on (`worked`: count, seconds), not of all through: a resumed run skips
    its finished slides in moments."""
    line = f"{desc}: {done} of {total} through, {_duration(elapsed)} in"
    if worked and worked[0]:
        per = worked[1] / worked[0]
    else:  # none finished yet: unknown while the first works; on Dask (no slide is "current") all that are through
        per = None if current is not None or not done else elapsed / done
    if per is not None and done < total:
        line += f", about {_duration(per * (total - done))} left"
    if current is not None:
        line += f"; {current[0]} for {_duration(time.monotonic() - current[1])}"
    return line


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False

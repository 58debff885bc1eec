"""The `wsi-vssm` command line. Each command lives in `wsi_vssm/commands/<name>.py` and is imported only when
it runs, so `wsi-vssm --help` stays fast; commands parse options, call the library and print."""

from __future__ import annotations

import errno
import importlib
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

import click

from wsi_vssm import __version__
from wsi_vssm.errors import WsiVssmError, one_line, warn_in_one_line

# command name -> module in wsi_vssm.commands exposing a click command called `command`
COMMANDS = {
    "info": "info",
    "synth": "synth",
    "export": "export",
    "extract": "extract",
    "train": "train",
    "predict": "predict",
    "evaluate": "evaluate",
    "compare": "compare",
    "run": "run",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        module = COMMANDS.get(name)
        if module is None:
            return None
        return importlib.import_module(f"wsi_vssm.commands.{module}").command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EOFError as e:  # click takes it for Ctrl-D at a prompt (an abort, exit 130); we never prompt:
            # a file cut short (an empty torch checkpoint) is bad input
            raise WsiVssmError(f"unexpected end of a file ({one_line(e)})") from e


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsi-vssm")
@click.option("--debug", is_flag=True, envvar="WSI_VSSM_DEBUG",
              help="Show tracebacks instead of one-line errors (before or after the command; a slide that fails in "
                   "a cohort run stays one line).")
@click.pass_context
def cli(ctx, debug):
    """Whole-slide metastasis detection with a VMamba (VSSM) backbone."""
    ctx.ensure_object(dict)["debug"] = debug


# Torch, numba and OpenBLAS reserve about this much address space as they load. Under about 1.5 GiB (`ulimit -v`)
# OpenBLAS's start-up retries its refused buffers for ever: a review of 2026-12-05 saw `predict` spin 26 minutes
# at 100% CPU, deaf to SIGTERM (it loops inside dlopen); at 2 GiB a run fails cleanly as out of memory.
MIN_ADDRESS_SPACE = 2 << 30


def _check_address_space() -> None:
    try:
        import resource
    except ImportError:  # not a Unix: no such limit
        return
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY and soft < MIN_ADDRESS_SPACE:
        raise WsiVssmError(f"the address-space limit (ulimit -v) is {soft >> 20} MiB; wsi-vssm needs at least "
                           f"{MIN_ADDRESS_SPACE >> 20} MiB to load its libraries: raise the limit (ulimit -v "
                           f"{MIN_ADDRESS_SPACE >> 10} or more)")


# predict's peak RSS on a 50,000 px slide at 2,048 px regions was 1.49-1.58 GiB (bench/predict.py, docs/status.md);
# a cgroup's memory limit kills a process past it with SIGKILL, which no message can report (exit 137)
MIN_MEMORY = 2 << 30
HEAVY_COMMANDS = ("predict", "evaluate", "extract", "train", "run")


def _fit_to_machine(args: list[str]) -> None:
    """Threads to the cgroup's CPU quota (a container's --cpus), matplotlib's folders somewhere writable (a
    read-only home), and a warning when the cgroup's memory limit is below what a slide can take."""
    from wsi_vssm.resources import cgroup_memory_limit, limit_threads_to_quota

    limit_threads_to_quota()
    if "matplotlib" not in sys.modules:  # a library caller's matplotlib has its folders already
        from wsi_vssm_kernels import use_writable_matplotlib_config

        use_writable_matplotlib_config()
    command = next((a for a in args if not a.startswith("-")), None)  # not an argument named like a command
    if command not in HEAVY_COMMANDS:
        return
    limit = cgroup_memory_limit()
    if limit is not None and limit < MIN_MEMORY:
        warnings.warn(f"this process may use {limit / (1 << 30):.2f} GiB (its cgroup's memory limit, e.g. a "
                      f"container's --memory); a large slide takes up to about 1.6 GiB at --region-px 2048, more "
                      "at larger regions and per --workers process: past the limit the system kills the run "
                      "without a message (exit 137)", stacklevel=2)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's walltime or preemption, `kill`): unwinds like Ctrl-C, so locks are released,
    temporaries removed and slides in flight left for the rerun."""


_SIGTERM_SEEN = []  # set by the handler: a Terminated raised where Python ignores exceptions (a __del__, a
# callback) is lost, and the run would end with exit 0 as if no SIGTERM had come (tests/runs: 1 run in 5)


def _terminate(signum, frame) -> None:
    _SIGTERM_SEEN.append(signum)
    raise Terminated


EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as a shell reports a process that SIGTERM killed


def _how_to_go_on(argv: list[str]) -> str:
    """What an interrupted command keeps and how to continue: slide commands keep finished slides; `train cells`
    and `run` keep finished epochs (their checkpoints); the rest keep nothing."""
    args = [a for a in argv if not a.startswith("-")]  # option values too: any of them may be the folder
    words = args[:2]
    if words[:1] == ["evaluate"]:
        from wsi_vssm.runs.cohort import is_patch_folder  # light: this runs in a signal handler

        if any(is_patch_folder(Path(a)) for a in args[1:]):
            return ("the patches scored so far are kept: rerun the same command to resume (the report is written "
                    "when every patch is scored)")
    if words[:1] in (["predict"], ["evaluate"], ["extract"]):
        return "finished slides are kept: rerun the same command to resume"
    if words[:1] == ["run"] or words == ["train", "cells"]:
        return ("every finished epoch of the cells, context and dense stages is kept (none before the first "
                "ends; a slide-head stage starts over): rerun the same command with --resume to continue"
                if words[:1] == ["run"] else
                "every finished epoch is kept (none before the first ends): rerun the same command with --resume "
                "to continue")
    if words == ["train", "mil"]:
        return ("once an epoch had ended, the best head so far is in the --out file (an --ensemble's current "
                "member: its -seedN file), marked unfinished (training_incomplete: attaching it warns); before "
                "that, a file already there is as it was; run the command again to train it in full")
    return "nothing was kept"


def _terminated(argv: list[str]) -> None:
    click.echo(f"wsi-vssm: terminated (SIGTERM); {_how_to_go_on(argv)}", err=True)
    sys.exit(EXIT_TERMINATED)


def _interrupted(argv: list[str]) -> None:
    click.echo(f"wsi-vssm: interrupted; {_how_to_go_on(argv)}", err=True)
    sys.exit(130)


def main(argv=None):
    """Entry point: user errors become one line on stderr and a non-zero exit, never a traceback.

    Exit codes: 0 all done; 1 bad input (one line names the file and the problem); 2 usage: click's own checks,
    and an option value the library rejects (`errors.OptionError`, one line naming the option);
    3 a cohort finished with some slides failed (each named on its own line); 4 incomplete (slides still locked by
    another run after --wait-locked); 130 interrupted; 143 terminated (SIGTERM).
    """
    args = [str(a) for a in (argv if argv is not None else sys.argv[1:])]
    if "--debug" in args[1:]:  # `wsi-vssm info --debug X` as well as `wsi-vssm --debug info X`: click takes it first
        args = ["--debug", *[a for a in args if a != "--debug"]]
    debug = "--debug" in args or bool(os.environ.get("WSI_VSSM_DEBUG"))
    if not debug:  # decoders' own log lines (e.g. tifffile's "invalid offset") would add to our one-line errors;
        # asyncio's are zarr's chunk reads left pending when one tile of a damaged file fails to decode
        for name in ("tifffile", "imagecodecs", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        warn_in_one_line("wsi-vssm")  # warnings outside any slide's run (a model loading), like errors
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: signals are not ours to handle
        previous = None
    from wsi_vssm.progress import ClosedPipeGuard

    stdout = sys.stdout
    sys.stdout = ClosedPipeGuard(stdout)
    try:
        _SIGTERM_SEEN.clear()
        if set(args) & set(COMMANDS) and not {"-h", "--help"} & set(args):  # help and --version need no memory
            _check_address_space()
            _fit_to_machine(args)
        cli.main(args=args, prog_name="wsi-vssm", standalone_mode=False)
        if _SIGTERM_SEEN:  # the handler's exception was swallowed on the way: still end as terminated
            _terminated(args)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort as e:  # click turns KeyboardInterrupt (and so Terminated) into Abort
        if isinstance(e.__context__, Terminated):
            _terminated(args)
        _interrupted(args)
    except click.exceptions.NoArgsIsHelpError as e:  # `wsi-vssm` or `wsi-vssm train` alone: the help itself
        click.echo(e.format_message(), err=True)
        sys.exit(e.exit_code)
    except click.UsageError as e:  # click's own checks: one line like every other error, with where to look
        where = e.ctx.command_path if e.ctx is not None else "wsi-vssm"
        click.echo(f"wsi-vssm: error: {one_line(e.format_message())} (see '{where} --help')", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"wsi-vssm: error: {one_line(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except WsiVssmError as e:
        if debug:
            raise
        click.echo(f"wsi-vssm: error: {e}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:  # a file system problem outside any one slide (e.g. the output folder): one line
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        hint = f"; free space on {'its disk' if e.filename else 'the disk written to'}, then run the same command " \
               "again" if full else ""
        click.echo(f"wsi-vssm: error: {where}{e.strerror or e}{hint}", err=True)
        sys.exit(1)
    except MemoryError as e:  # outside any one slide (a slide's is recorded by the runner and the run goes on)
        if debug:
            raise
        click.echo(f"wsi-vssm: error: out of memory{': ' + one_line(e) if str(e) else ''}; free memory "
                   "(or raise the limit: ulimit -v), then run the same command again", err=True)
        sys.exit(1)
    except ImportError as e:  # a library that cannot load (a broken install, or too little memory to map it)
        if debug or (e.name or "").startswith("wsi_vssm"):  # our own import failing is a bug: its traceback
            raise
        click.echo(f"wsi-vssm: error: a library failed to load: {one_line(e)}", err=True)
        sys.exit(1)
    except Terminated:
        _terminated(args)
    except KeyboardInterrupt:
        _interrupted(args)
    finally:
        if previous is not None:  # main() may run inside another program (tests)
            signal.signal(signal.SIGTERM, previous)
        if isinstance(sys.stdout, ClosedPipeGuard):
            sys.stdout = stdout
    sys.exit(0)


if __name__ == "__main__":
    main()

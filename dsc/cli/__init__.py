"""Command line: a thin click layer. Each command parses options and calls one `dsc.api` function.

The package: this module (the `dsc` group and `main`), `options` (option groups shared by
several commands, each option defined once) and one module per family of commands (`export`,
`build`, `quantize`, `passes`, `validate`, `engine`, `hardware`, `matrix`). Command modules
import click, `dsc.errors`, `dsc.cli.options`, output formatting and, inside each command,
`dsc.api`: nothing else (tests/test_import_graph.py), so `dsc --help` imports no heavy library.

`main()` turns a `DscError` into one line on stderr and its documented exit code (see
`dsc.errors`), a usage error into one line and exit 2, an `OSError` of the machine (disk full,
read-only, permission, a path under a file) into exit 8, SIGINT into exit 130 and SIGTERM into
143 (`dsc.signals`), and any other exception into exit 70 with a short message (set DSC_DEBUG=1
for the traceback).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys

import click

from dsc import __version__
from dsc.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_ENVIRONMENT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    DscError,
    Terminated,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dsc")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Compile DeepSeek-family LLMs into validated, per-GPU TensorRT engines."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # The ONNX libraries' INFO lines (one per merged initializer, per pass run) drown dsc's
    # own at -v; they show at -vv.
    for name in QUIET_AT_V:
        logging.getLogger(name).setLevel(logging.WARNING if verbose == 1 else logging.NOTSET)


QUIET_AT_V = ("onnx_ir", "onnxscript")


def _register() -> None:
    # One module per family of commands; each `COMMANDS` tuple is added in order.
    from dsc.cli import build, engine, export, hardware, matrix, passes, quantize, validate

    for module in (export, hardware, validate, build, quantize, passes, engine, matrix):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


# errno values that mean the machine, not dsc or its input, refused.
ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOSPC",
        "EDQUOT",
        "EFBIG",
        "EROFS",
        "EACCES",
        "EPERM",
        "ENOTDIR",
        "ENAMETOOLONG",
        "EMFILE",
        "ENFILE",
        "ELOOP",
        "ETXTBSY",
    )
    if hasattr(errno, name)
)


_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")
_NO_ROOM = re.compile(r"Not enough free space to write (\d+) bytes after offset (\d+)")


def environment_error(exc: BaseException) -> OSError | None:
    """The OSError of the machine behind `exc` (itself, or its cause/context), if any."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 16:
        if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
            return e
        # numpy's `ndarray.tofile` (onnx_ir's external-data writer) reports a failed write as
        # an OSError with no errno: "N requested and M written" (numpy's convert.c).
        short = isinstance(e, OSError) and e.errno is None and _SHORT_WRITE.fullmatch(str(e))
        if short:
            return OSError(
                errno.ENOSPC,
                f"a write stopped short, {short[2]} of {short[1]} bytes written (the disk or "
                "the quota is full, or the file system failed)",
            )
        # ... and its fallocate of the bytes to come failing with ENOSPC as another (numpy's
        # convert.c, npy_fallocate).
        room = isinstance(e, OSError) and e.errno is None and _NO_ROOM.fullmatch(str(e))
        if room:
            return OSError(
                errno.ENOSPC,
                f"{os.strerror(errno.ENOSPC)}: no room for {int(room[1]):,} bytes at offset "
                f"{int(room[2]):,} of a file being written",
            )
        e = e.__cause__ or e.__context__
        seen += 1
    # Libraries that re-raise an OSError's text as their own exception (torch, onnx, ORT).
    text = str(exc)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        if os.strerror(code) in text:
            return OSError(code, os.strerror(code))
    return None


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports POLLERR on the write
    end of a pipe with no reader); False when stdout has no file descriptor."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _run(argv: list[str] | None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        # make_context/invoke rather than cli.main: click's main turns Ctrl-C into Abort after
        # printing a blank line, and prints usage errors over several lines.
        with cli.make_context("dsc", args) as ctx:
            cli.invoke(ctx)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.NoArgsIsHelpError as e:  # `dsc` or `dsc passes` alone: the help
        e.show()
        return EXIT_USAGE
    except click.UsageError as e:
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        message = _one_line(e.format_message())
        if isinstance(e, click.NoSuchOption) and e.option_name in ("-v", "--verbose") and e.ctx:
            command = e.ctx.command_path.removeprefix("dsc").strip()
            message, where = f"{e.option_name} goes before the command: dsc -v {command} ...", ""
        click.echo(f"dsc: error: {message}{where}", err=True)
        return EXIT_USAGE
    except click.ClickException as e:
        click.echo(f"dsc: error: {_one_line(e.format_message())}", err=True)
        return e.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("dsc: interrupted", err=True)
        return EXIT_INTERRUPTED
    except Terminated:
        click.echo("dsc: terminated", err=True)
        return EXIT_TERMINATED
    except DscError as e:
        click.echo(f"dsc: error: {e}", err=True)
        return e.exit_code
    except Exception as e:
        if isinstance(e, BrokenPipeError) and _stdout_closed():
            # `dsc ... | head -1`: the reader has gone. Say nothing (stderr may be the same
            # pipe); stdout goes to /dev/null so that the exit's flush does not fail again.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
        env = environment_error(e)
        if env is not None:
            where = f": {env.filename}" if getattr(env, "filename", None) else ""
            click.echo(f"dsc: error: {env.strerror or os.strerror(env.errno)}{where}", err=True)
            return EXIT_ENVIRONMENT
        if os.environ.get("DSC_DEBUG"):  # a bug: keep it to one line unless asked
            raise
        click.echo(
            f"dsc: internal error: {type(e).__name__}: {_one_line(e)} "
            "(set DSC_DEBUG=1 for details)",
            err=True,
        )
        return EXIT_INTERNAL
    return 0


def main(argv: list[str] | None = None) -> None:
    """Run one dsc command and `sys.exit` with its exit code (in-process callers: tests)."""
    sys.exit(_command(argv))


def entry() -> None:
    """The `dsc` executable (and `python -m dsc`): `main`, then `fast_exit` with its code."""
    fast_exit(_command(None))


def _command(argv: list[str] | None) -> int:
    from dsc import signals

    previous = signals.install()
    try:
        return _run(argv)
    finally:
        signals.restore(previous)


def fast_exit(code: int) -> None:
    """End the process with `code` without tearing the interpreter down, when nothing else runs.

    What a normal exit runs is run first: the `atexit` functions (logging's flush and
    `weakref.finalize` hooks such as `tempfile.TemporaryDirectory`'s cleanup), then stdout and
    stderr are flushed. What is skipped is the module teardown that frees every object of
    torch, transformers and the graph one by one: 0.7-0.8 s of a 15 s 1.5B `dsc export` on a
    2-core host (docs/BENCHMARKS.md). With another thread alive (a hash or a pool not yet
    finished), the interpreter's own exit runs instead, which joins it."""
    import atexit
    import threading

    if threading.active_count() > 1:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()

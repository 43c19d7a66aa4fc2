"""Errors that reach the user as one line and a documented exit code.

Every failure the user can cause (bad input, an impossible request) is a `DscError` subclass. The
CLI prints `dsc: error: <message>` and exits with the class's code; it never shows a traceback
for these. An `OSError` the machine causes (a full disk, a read-only or unwritable target, an
output path under a file) is an environment error, `EXIT_ENVIRONMENT`. SIGINT exits 130 and
SIGTERM 143 (128 + the signal number), leaving the output path as it was. Anything else is a bug
and exits with `EXIT_INTERNAL`.

Exit codes (also in README.md):

| code | meaning |
|---|---|
| 0 | success |
| 1 | a check failed: validation gate, `dsc verify` hash mismatch |
| 2 | usage error: unknown option, missing argument, value out of range, exclusive flags |
| 3 | bad input: corrupt checkpoint or tensor, config, ONNX, profile, artifact; fp16 overflow;
|   | a name, link or external-data location leading outside its directory; a special file |
| 4 | unsupported: architecture, checkpoint quantization, precision on this target, operation |
| 5 | output path holds something that is not a dsc artifact |
| 6 | the model does not fit the target (or, calibrating gather-form MoE experts, this host) |
| 7 | a backend failed (ONNX export, TensorRT parse/build) |
| 8 | environment: disk full, read-only or unwritable path, output path under a file |
| 70 | internal error (a bug in dsc) |
| 130 | interrupted (SIGINT, Ctrl-C) |
| 141 | stdout closed by its reader (`dsc ... | head -1`), as a process killed by SIGPIPE |
| 143 | terminated (SIGTERM) |
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_UNSUPPORTED = 4
EXIT_OUTPUT_CONFLICT = 5
EXIT_DOES_NOT_FIT = 6
EXIT_BACKEND = 7
EXIT_ENVIRONMENT = 8
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
EXIT_TERMINATED = 143


class DscError(Exception):
    """A failure the user can act on; `str(err)` is the one-line message."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str):
        # One line: the CLI prints exactly this.
        super().__init__(" ".join(str(message).split()))


class CheckFailed(DscError):
    exit_code = EXIT_CHECK_FAILED


class UsageError(DscError):
    """Options that cannot work: out of range, or excluding each other (same code as click's)."""

    exit_code = EXIT_USAGE


class EnvironmentFailure(DscError):
    """The machine refused: no space, a read-only or unwritable path, a path under a file."""

    exit_code = EXIT_ENVIRONMENT


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt is for SIGINT (see `dsc.signals`)."""


class BadInput(DscError):
    exit_code = EXIT_BAD_INPUT


class CheckpointError(BadInput):
    """Missing, malformed or truncated checkpoint."""


class Unsupported(DscError):
    exit_code = EXIT_UNSUPPORTED


class OutputConflict(DscError):
    exit_code = EXIT_OUTPUT_CONFLICT


class DoesNotFit(DscError):
    exit_code = EXIT_DOES_NOT_FIT


class BackendError(DscError):
    exit_code = EXIT_BACKEND


class InternalError(DscError):
    """An invariant of dsc's own output broke (a bug, exit 70), said in one clear line."""

    exit_code = EXIT_INTERNAL


@contextlib.contextmanager
def unwrapped() -> Iterator[None]:
    """Raise, as itself, a `DscError` that a library caught and wrapped in its own exception.

    onnx_ir's pass manager wraps whatever a pass raises in `PassError`s (onnx_ir/passes/
    _pass_infra.py): a pass that reads a lazy checkpoint weight (the optimizer folding a small
    norm weight, the deduplication of small tensors) would turn the reader's one-line
    `CheckpointError` into an internal error. The first `DscError` along the chain of causes is
    raised instead; any other exception passes unchanged."""
    try:
        yield
    except DscError:
        raise
    except Exception as e:
        seen: set[int] = set()
        cause: BaseException | None = e
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, DscError):
                raise cause from None
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        raise

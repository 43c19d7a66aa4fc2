"""Progress of a build: one line per stage on stderr; the same lines (and detail) for build.log.

    [1/5] export    qwen2 fp16 from ./ckpt ... 13.4s
    [2/5] optimize  not run (no passes requested)
    [4/5] compile   a100-80gb: engine for SM80 with TensorRT-RTX 1.7.1 ... 2.9s

`say()` and `sub()` lines go to stderr and the log; `detail()` lines (TensorRT's messages, the
targets' envelopes and plans) only to the log. Long loops inside a stage (the gate's windows and
decode steps, calibration batches) show a bar with counts and an ETA (`counted`) on a terminal.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def reset_peak_rss() -> None:
    """Start a new peak-RSS window for this process (Linux: `clear_refs` 5 resets VmHWM, see
    proc(5)); elsewhere a no-op, and `peak_rss_bytes` then reports the peak since start."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size in bytes since the last `reset_peak_rss` (VmHWM of
    /proc/self/status; without /proc, `getrusage`'s ru_maxrss since start; None if neither)."""
    peak = status_bytes(Path("/proc/self/status"), "VmHWM")
    return peak if peak is not None else rusage_peak_bytes("self")


def status_bytes(status: Path, field: str) -> int | None:
    """A memory field of a /proc/<pid>/status file (proc(5): VmRSS, VmHWM, ... in kB) in bytes;
    None when the file or field cannot be read."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def rusage_peak_bytes(who: str) -> int | None:
    """getrusage(2)'s ru_maxrss in bytes for "self" or "children" (the largest peak of the exited
    children); None where unavailable."""
    try:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        which = resource.RUSAGE_SELF if who == "self" else resource.RUSAGE_CHILDREN
        return int(resource.getrusage(which).ru_maxrss) * scale
    except (ImportError, OSError):
        return None


class Progress:
    """Stage-numbered progress lines; every line is also kept for build.log."""

    def __init__(
        self, total: int, *, echo: Callable[[str], None] | None = None, quiet: bool = False
    ):
        self.total = total
        self.quiet = quiet
        self._echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        self.lines: list[str] = []
        self._t0 = time.perf_counter()

    def _stamp(self) -> str:
        return f"{time.perf_counter() - self._t0:7.1f}s"

    def say(self, line: str) -> None:
        self.lines.append(f"{self._stamp()}  {line}")
        if not self.quiet:
            self._echo(line)

    def sub(self, line: str) -> None:
        """An indented line under the current stage (e.g. the exporter's own steps)."""
        self.say(f"        {line}")

    def detail(self, line: str) -> None:
        self.lines.append(f"{self._stamp()}    {line}")

    def stage_line(self, index: int, name: str, text: str) -> str:
        return f"[{index}/{self.total}] {name:<9} {text}"

    @contextlib.contextmanager
    def stage(self, index: int, name: str, text: str) -> Iterator[dict]:
        """Announce a stage, time it, and print how it ended (`note["end"]`, default the time)."""
        t0 = time.perf_counter()
        self.say(self.stage_line(index, name, f"{text} ..."))
        note: dict = {}
        yield note
        seconds = time.perf_counter() - t0
        end = note.get("end") or f"done in {seconds:.1f}s"
        self.say(self.stage_line(index, name, end))

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


@contextlib.contextmanager
def counted(label: str, total: int, *, quiet: bool = False) -> Iterator[Callable[..., None]]:
    """A progress bar on stderr for a loop of `total` steps: label, bar, `done/total`, elapsed
    time and ETA (rich), removed when the block ends. Yields `advance(n=1, total=None)` (`total`
    replaces the step count, for loops that learn it on the way). Shows nothing when
    `quiet` (`--json`), when stderr is not a terminal (CI, pipes, logs) or when `total` < 1."""
    if quiet or total < 1 or not sys.stderr.isatty():
        yield lambda n=1, total=None: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n=1, total=None: bar.update(task, advance=n, total=total)

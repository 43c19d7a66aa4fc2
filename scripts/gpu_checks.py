#!/usr/bin/env python
"""Run the engine checks that need a GPU (tests marked `gpu`) and print one line per check.

    .venv/bin/python scripts/gpu_checks.py [--runtime tensorrt|tensorrt_rtx] [pytest args...]

On a machine with a CUDA GPU and TensorRT (or TensorRT-RTX) importable. Each check prints
`PASS|FAIL|SKIP <check> <seconds>s <reason>`; then one `gpu-checks:` total line. The exit status
is pytest's (0: every check passed or was skipped with its reason).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _Summary:
    def __init__(self):
        self.counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and not report.passed):
            state = "PASS" if report.passed else "SKIP" if report.skipped else "FAIL"
            why = ""
            if report.skipped and isinstance(report.longrepr, tuple):
                why = report.longrepr[2]
            elif report.failed:
                why = str(report.longrepr).strip().splitlines()[-1][:200]
            self.counts[state] += 1
            name = report.nodeid.split("::")[-1]
            print(f"{state} {name} {report.duration:.1f}s {why}".rstrip(), flush=True)


def main(argv: list[str]) -> int:
    import pytest

    if argv[:1] == ["--runtime"]:
        os.environ["DSC_GPU_RUNTIME"] = argv[1]
        argv = argv[2:]
    summary = _Summary()
    code = pytest.main(
        [
            str(ROOT / "tests" / "test_engine_gpu.py"),
            "-p",
            "no:cacheprovider",
            "-p",
            "no:terminal",
            *argv,
        ],
        plugins=[summary],
    )
    c = summary.counts
    print(f"gpu-checks: {c['PASS']} passed, {c['FAIL']} failed, {c['SKIP']} skipped")
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

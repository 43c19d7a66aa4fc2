"""`dsc matrix`: expand MATRIX.yaml into cells, share their stages, run them, summarise.

The task graph (one node per stage input hash, so equal work is one node):

    export(model) ─▶ optimize(model, pass target) ─▶ quantize(model, precision)
        ─▶ compile(artifact, profile) ×profiles ─▶ assemble(cell): `dsc build` from the store

Ready tasks go to the executor (`dsc.matrix.executors`) as their inputs finish; a failed task
fails the cells that need it and nothing else. A compile for an SM TensorRT-RTX cannot target
(SM87, SM90) asks a Ray node offering the resource `SM<sm>`; with none, the cell gets its
preflight engine and `trtexec.sh`, reported as "needs the device".
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dsc.errors import CheckFailed, DscError
from dsc.matrix.executors import RETRIES, WorkerDied
from dsc.matrix.spec import Cell, Matrix
from dsc.matrix.tasks import cell_plan, memory_bytes

STORE = ".dsc-matrix/store"


@dataclass
class Task:
    id: tuple
    kind: str
    payload: dict
    memory: int
    deps: list[tuple] = field(default_factory=list)
    resources: dict = field(default_factory=dict)
    cells: list[str] = field(default_factory=list)
    attempts: int = 0
    result: dict | None = None


@dataclass
class CellResult:
    cell: Cell
    status: str = "pending"  # ok | needs the device | skipped | failed
    error: str | None = None
    seconds: float = 0.0
    result: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        r = self.result
        return {
            "model": self.cell.model.name,
            "precision": self.cell.precision,
            "output": str(self.cell.output),
            "status": self.status,
            "error": self.error,
            "profiles": r.get("profiles", {}),
            "skipped_profiles": dict(self.cell.skipped),
            "gate": r.get("validation"),
            "seconds": round(self.seconds, 2),
        }


def plan_json(matrix: Matrix, out: Path) -> dict:
    cells = matrix.cells(out)
    return {
        "matrix": str(matrix.path),
        "output": str(out),
        "cells": [c.to_json(matrix.options) for c in cells],
    }


def run_matrix(matrix: Matrix, out: Path, executor, *, quiet: bool = False) -> dict:
    """Run every cell; returns the summary document (`--json`). Never raises for one cell."""
    t0 = time.perf_counter()
    out = Path(out).absolute()
    store = out / STORE
    store.mkdir(parents=True, exist_ok=True)

    def say(line: str) -> None:
        if not quiet:
            print(f"[{time.perf_counter() - t0:7.1f}s] {line}", file=sys.stderr, flush=True)

    say(f"dsc matrix {matrix.path} -> {out}; {executor.describe()}")
    results = {c.key: CellResult(c) for c in matrix.cells(out)}
    devices = executor.device_resources()
    tasks: dict[tuple, Task] = {}

    def add(task: Task, cell: str) -> Task:
        t = tasks.setdefault(task.id, task)
        t.cells.append(cell)
        return t

    for key, res in results.items():
        c = res.cell
        if not c.runnable:
            res.status = "skipped"
            res.error = "; ".join(c.skipped.values())
            say(f"{key}: skipped ({res.error})")
            continue
        values = c.config_values(matrix.options)
        base = {"checkpoint": str(c.model.path), "config": values, "store": str(store)}
        try:
            plan = cell_plan(str(c.model.path), values)
        except DscError as e:
            res.status, res.error = "failed", str(e)
            say(f"{key}: failed before any work: {e}")
            continue
        w = plan["weights_bytes"]
        prev: tuple | None = None
        for stage, h in plan["keys"].items():
            tid = (stage, h)
            add(Task(tid, stage, base, memory_bytes(stage, w), [prev] if prev else []), key)
            prev = tid
        compiles = []
        for t in plan["targets"]:
            resources = {}
            sm = f"SM{t.profile.sm}"
            if t.mode == "preflight" and sm in devices:
                resources = {sm: 1}  # a node with the device builds the real engine there
            tid = ("compile", key, t.name)
            payload = dict(base, profile=t.name)
            add(Task(tid, "compile", payload, memory_bytes("compile", w), [prev], resources), key)
            compiles.append(tid)
        payload = dict(base, output=str(c.output), cell=key)
        add(
            Task(("assemble", key), "assemble", payload, memory_bytes("assemble", w), compiles), key
        )

    running: dict = {}  # handle -> task
    finished: set[tuple] = set()
    failed: dict[tuple, str] = {}
    stats = {"ran": {}, "reused": {}}
    try:
        while True:
            for t in tasks.values():
                if t.id in finished or t.id in failed or t in running.values():
                    continue
                bad = [d for d in t.deps if d in failed]
                if bad:
                    failed[t.id] = failed[bad[0]]
                    continue
                if all(d in finished for d in t.deps) and executor.admits(t.memory, len(running)):
                    t.attempts += 1
                    running[executor.submit(t.kind, t.payload, t.memory, t.resources)] = t
            if not running:
                break
            for h in executor.wait(list(running)):
                t = running.pop(h)
                try:
                    r = executor.result(h)
                except WorkerDied as e:
                    if t.attempts <= RETRIES:
                        say(f"{_label(t)}: {e}; retrying (attempt {t.attempts + 1})")
                        continue
                    r = {"ok": False, "error": str(e)}
                t.result = r
                if not r.get("ok"):
                    failed[t.id] = f"{t.kind}: {r.get('error')}"
                    say(f"{_label(t)}: failed: {r.get('error')}")
                    continue
                finished.add(t.id)
                bucket = "ran" if r.get("ran") else "reused"
                stats[bucket][t.kind] = stats[bucket].get(t.kind, 0) + 1
                if t.kind == "assemble" and r.get("validate_ran"):
                    stats["ran"]["validate"] = stats["ran"].get("validate", 0) + 1
                if t.kind != "assemble":
                    say(f"{_label(t)}: {bucket}, {r.get('seconds', 0):.1f}s")
    finally:
        executor.close()

    for key, res in results.items():
        if res.status != "pending":
            continue
        mine = [t for t in tasks.values() if key in t.cells]
        res.seconds = sum((t.result or {}).get("seconds", 0) for t in mine)
        a = tasks[("assemble", key)]
        if a.id in failed:
            res.status, res.error = "failed", failed[a.id]
        else:
            res.result = a.result or {}
            modes = {p["mode"] for p in res.result.get("profiles", {}).values()}
            res.status = "needs the device" if "preflight" in modes else "ok"
        say(f"{key}: {res.status}" + (f" ({res.error})" if res.error else ""))
    return {
        "matrix": str(matrix.path),
        "output": str(out),
        "executor": executor.name,
        "seconds": round(time.perf_counter() - t0, 2),
        "stages": stats,
        "cells": [r.to_json() for r in results.values()],
        "failed": sum(r.status == "failed" for r in results.values()),
    }


def _label(t: Task) -> str:
    if t.kind == "compile":
        return f"compile {t.id[1]} {t.id[2]}"
    if t.kind == "assemble":
        return f"artifact {t.id[1]}"
    return f"{t.kind} {t.payload['checkpoint'].rstrip('/').split('/')[-1]} [{t.id[1][:12]}]"


def format_summary(doc: dict) -> str:
    rows = [("cell", "status", "gate", "time", "engines / reason")]
    for c in doc["cells"]:
        engines = ", ".join(
            f"{p}: {e['engine'] or 'preflight (needs the device)'}"
            for p, e in c["profiles"].items()
        )
        skipped = "; ".join(f"{p} skipped: {why}" for p, why in c["skipped_profiles"].items())
        what = (
            c["error"] if c["status"] == "failed" else "; ".join(x for x in (engines, skipped) if x)
        )
        rows.append(
            (
                f"{c['model']}/{c['precision']}",
                c["status"],
                c["gate"] or "-",
                f"{c['seconds']:.1f}s",
                what or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    ran = ", ".join(f"{k} {v}" for k, v in doc["stages"]["ran"].items()) or "nothing"
    lines.append(f"stages run: {ran}; {doc['seconds']:.1f}s with the {doc['executor']} executor")
    return "\n".join(lines)


def check(doc: dict) -> None:
    if doc["failed"]:
        raise CheckFailed(f"{doc['failed']} of {len(doc['cells'])} matrix cells failed")


def to_json(doc: dict) -> str:
    return json.dumps(doc, indent=2)

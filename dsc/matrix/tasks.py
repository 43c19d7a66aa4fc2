"""The work of `dsc matrix`, as plain functions of plain data: what a worker process or a Ray
task runs. Each runs one stage object of `dsc build` (`dsc.build.STAGES`) and keeps its output
in the stage store, keyed by the stage's own input hash (`Stage.input_hash`):

    OUT/.dsc-matrix/store/export/<input hash>/       the graph after export (+ <hash>.json)
    OUT/.dsc-matrix/store/optimize/<input hash>/     ... after optimize
    OUT/.dsc-matrix/store/quantize/<input hash>/     ... after quantize
    OUT/.dsc-matrix/store/compile/<input hash>/      engines/<profile>/ (+ <hash>.json)

A stage whose store entry is complete is not run again (a re-run repeats only what failed or
changed). A cell's artifact is then written by `dsc.build.build` itself, seeded with those
records: it reuses (links) every stage, runs validate, and writes the manifest and reports, so
the artifact is what `dsc build` writes for that cell.

Every function returns a JSON-able dict, `{"ok": False, "error": ..., "exit_code": ...}` for a
failure the user can act on: a worker never raises across the process boundary.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from dsc.errors import DscError

SEED_FORMAT = "dsc-artifact"
# Measured host memory per byte of weights (docs/BENCHMARKS.md, DESIGN.md: export 7.15 GB for
# 3.55 GB of weights; the TensorRT-RTX compile 3.2x the weights); a floor for the runtime.
MEMORY_FACTOR = {"export": 2.1, "optimize": 2.0, "quantize": 2.2, "compile": 3.3, "assemble": 2.2}
MEMORY_FLOOR = 768 * 2**20
KILL_ONCE = "DSC_MATRIX_KILL_ONCE"  # test hook: SIGKILL the first compile worker (a marker path)


def run_task(kind: str, payload: dict) -> dict:
    """Entry point of every worker: dispatch, and turn a user-facing error into a result."""
    t0 = time.perf_counter()
    try:
        if kind in ("export", "optimize", "quantize"):
            result = _graph(kind, payload)
        elif kind == "compile":
            result = _compile(payload)
        elif kind == "assemble":
            result = _assemble(payload)
        else:  # pragma: no cover
            raise AssertionError(kind)
    except DscError as e:
        return {"ok": False, "error": str(e), "exit_code": e.exit_code}
    except Exception as e:  # noqa: BLE001 - a worker reports, the driver decides
        return {"ok": False, "error": f"{type(e).__name__}: {' '.join(str(e).split())}"}
    result.setdefault("ok", True)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["pid"] = os.getpid()
    return result


# -- what every task recomputes from the cell (cheap: no graph is read) ----------------------


def cell_plan(checkpoint: str, values: dict) -> dict:
    """The cell's config, checkpoint, targets, pass context, tools and graph-stage inputs."""
    from dsc.build import GRAPH_STAGES, targets_for
    from dsc.build_config import BuildConfig
    from dsc.manifest import tool_versions
    from dsc.models.checkpoint import inspect_checkpoint
    from dsc.stages.graph import graph_inputs
    from dsc.stages.optimize import pass_context

    config = BuildConfig(**values)
    info = inspect_checkpoint(checkpoint, allow_pickle=config.allow_pickle)
    targets = targets_for(config, info)
    tools = tool_versions()
    ctx = pass_context(targets) if config.optimize else None
    graph = graph_inputs(GRAPH_STAGES, config, info, ctx, tools)
    keys = {s.name: s.input_hash(graph[s.name]) for s in GRAPH_STAGES if graph[s.name] is not None}
    weights = sum(p.stat().st_size for p in info.weight_files)
    return {
        "config": config,
        "info": info,
        "targets": targets,
        "ctx": ctx,
        "tools": tools,
        "graph": graph,
        "keys": keys,
        "weights_bytes": weights,
    }


def memory_bytes(kind: str, weights_bytes: int) -> int:
    return int(MEMORY_FLOOR + MEMORY_FACTOR[kind] * weights_bytes)


def _entry(store: Path, stage: str, key: str) -> tuple[Path, Path]:
    return store / stage / key, store / stage / f"{key}.json"


def done(store: Path, stage: str, key: str) -> dict | None:
    """The store's record of a finished stage, or None."""
    d, meta = _entry(store, stage, key)
    if d.is_dir() and meta.is_file():
        try:
            return json.loads(meta.read_text())
        except ValueError:
            return None
    return None


def _commit(src: Path, store: Path, stage: str, key: str, meta: dict) -> None:
    """Move a finished stage's directory into the store, then write its record (the marker)."""
    d, m = _entry(store, stage, key)
    if d.exists():
        shutil.rmtree(d)  # an earlier attempt died between the two steps
    d.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, d)
    tmp = m.with_suffix(f".json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, m)


def _workdir(store: Path, stage: str, key: str) -> Path:
    w = store / stage / f"{key}.work"
    if w.exists():
        shutil.rmtree(w)  # a killed attempt's leftovers
    w.mkdir(parents=True)
    return w


def files(root: Path) -> set[str]:
    """Relative paths of the files under `root` (as `dsc.stages.graph` tracks what each wrote)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a stage's directory (a copy, not links: the next graph stage rewrites files)."""
    for p in sorted(src.rglob("*")):
        if p.is_file():
            q = dst / p.relative_to(src)
            q.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, q)


class _Quiet:
    """A `Progress` that keeps nothing: a worker's stage lines are not shown."""

    def __new__(cls):
        from dsc.pipeline.progress import Progress

        return Progress(5, quiet=True, echo=lambda line: None)


# -- graph stages -------------------------------------------------------------------------------


def _graph(kind: str, payload: dict) -> dict:
    from dsc.artifacts import IO_SPEC
    from dsc.build import EXPORT, GRAPH_STAGES, OPTIMIZE

    store = Path(payload["store"])
    plan = cell_plan(payload["checkpoint"], payload["config"])
    config, info, inputs = plan["config"], plan["info"], plan["graph"][kind]
    key = plan["keys"][kind]
    if done(store, kind, key) is not None:
        return {"ran": False, "key": key}
    names = [s.name for s in GRAPH_STAGES if plan["graph"][s.name] is not None]
    work = _workdir(store, kind, key)
    tmp = work / "graph"
    tmp.mkdir()
    if kind == "export":
        record, g = EXPORT.run(info, tmp, inputs, progress=_Quiet().sub)
        written = files(tmp)
    else:
        upstream = names[names.index(kind) - 1]
        src, _ = _entry(store, upstream, plan["keys"][upstream])
        if done(store, upstream, plan["keys"][upstream]) is None:
            raise DscError(f"{kind}: the {upstream} stage it follows is not in the store")
        _copy_tree(src, tmp)
        io = json.loads((tmp / IO_SPEC).read_text())
        onnx = str(io["onnx"])
        before = files(tmp)
        if kind == "optimize":
            record, _, _ = OPTIMIZE.run(
                tmp, inputs, plan["ctx"], only=config.passes, disable=config.disable_passes
            )
        else:
            from dsc.build import QUANTIZE

            record, _ = QUANTIZE.run(
                tmp,
                inputs,
                calib=config.calib,
                alpha=config.alpha,
                lm_head=config.quantize_lm_head,
                embedding=config.quantize_embedding,
                progress=_Quiet().sub,
            )
        written = (files(tmp) - before) | {onnx, f"{onnx}.data", IO_SPEC}
    meta = {"record": record.to_json(), "written": sorted(written)}
    _commit(tmp, store, kind, key, meta)
    shutil.rmtree(work, ignore_errors=True)
    return {"ran": True, "key": key}


def graph_stage_records(store: Path, plan: dict) -> tuple[Path, dict]:
    """The last graph stage's directory, and every graph stage's record as `dsc build` writes
    it (each file belongs to the last stage that wrote it, `dsc.stages.graph`)."""
    from dsc.manifest import hash_tree

    names = [n for n in ("export", "optimize", "quantize") if n in plan["keys"]]
    metas = {n: done(store, n, plan["keys"][n]) for n in names}
    missing = [n for n, m in metas.items() if m is None]
    if missing:
        raise DscError(f"the {missing[0]} stage is not in the store")
    last, _ = _entry(store, names[-1], plan["keys"][names[-1]])
    final = hash_tree(last)
    records = {n: dict(metas[n]["record"], outputs={}) for n in names}
    owner = {rel: n for n in names for rel in metas[n]["written"] if rel in final}
    for rel, n in owner.items():
        records[n]["outputs"][rel] = final[rel]
    return last, records


# -- compile ------------------------------------------------------------------------------------


def compile_key(plan: dict, profile: str) -> tuple[Any, dict, dict, str, Path]:
    from dsc.artifacts import IO_SPEC
    from dsc.build import COMPILE
    from dsc.manifest import graph_record

    store = plan["store"]
    last, _ = graph_stage_records(store, plan)
    io = json.loads((last / IO_SPEC).read_text())
    graph = graph_record(last, io)
    target = next(t for t in plan["targets"] if t.name == profile)
    key = COMPILE.input_hash(COMPILE.inputs(target, graph, plan["tools"]))
    return target, io, graph, key, last


def _compile(payload: dict) -> dict:
    from dsc.build import COMPILE
    from dsc.stages import link

    store = Path(payload["store"])
    plan = cell_plan(payload["checkpoint"], payload["config"])
    plan["store"] = store
    target, io, graph, key, last = compile_key(plan, payload["profile"])
    if done(store, "compile", key) is not None:
        return {"ran": False, "key": key, "mode": target.mode}
    work = _workdir(store, "compile", key)
    art = work / "artifact"
    link(last, art, [p.relative_to(last).as_posix() for p in last.rglob("*") if p.is_file()])
    records, entries = COMPILE.run([target], art, io, graph, plan["tools"], _Quiet(), None, {}, {})
    marker = os.environ.get(KILL_ONCE)
    if marker and not os.path.exists(marker):
        # Test hook: die like an OOM-killed worker, after the engine is written and before
        # the stage is committed: the retried task must redo it.
        Path(marker).write_text(f"{os.getpid()} {target.name}\n")
        os.kill(os.getpid(), signal.SIGKILL)
    out = work / "result"
    (out / "engines").mkdir(parents=True)
    os.replace(art / "engines" / target.name, out / "engines" / target.name)
    meta = {"record": records[target.name], "entry": entries[target.name], "mode": target.mode}
    _commit(out, store, "compile", key, meta)
    shutil.rmtree(work, ignore_errors=True)
    return {"ran": True, "key": key, "mode": target.mode}


# -- a cell's artifact ----------------------------------------------------------------------------


def _assemble(payload: dict) -> dict:
    """Seed a directory with the stored stages, then `dsc.build.build` the cell from it."""
    from dsc.artifacts import MANIFEST, is_artifact
    from dsc.build import build
    from dsc.manifest import source_record
    from dsc.stages import link

    store = Path(payload["store"])
    output = Path(payload["output"])
    plan = cell_plan(payload["checkpoint"], payload["config"])
    plan["store"] = store
    seed = None
    if not is_artifact(output):
        last, records = graph_stage_records(store, plan)
        seed = store / "seeds" / f"{payload['cell'].replace('/', '--')}.{os.getpid()}"
        if seed.exists():
            shutil.rmtree(seed)
        link(last, seed, [p.relative_to(last).as_posix() for p in last.rglob("*") if p.is_file()])
        stages = dict(records)
        profiles, compiled = {}, {}
        for t in plan["targets"]:
            _, _, _, key, _ = compile_key(plan, t.name)
            meta = done(store, "compile", key)
            if meta is None:
                raise DscError(f"the compile for {t.name} is not in the store")
            d, _ = _entry(store, "compile", key)
            link(d, seed, list(meta["record"]["outputs"]))
            compiled[t.name], profiles[t.name] = meta["record"], meta["entry"]
        stages["compile"] = {"status": "ran", "profiles": compiled}
        manifest = {
            "format": SEED_FORMAT,
            "schema_version": 1,
            "command": "matrix-seed",
            "source": source_record(plan["info"], plan["graph"]["export"]["checkpoint"]),
            "stages": stages,
            "profiles": profiles,
        }
        (seed / MANIFEST).write_text(json.dumps(manifest, indent=1))
    try:
        outcome = build(payload["checkpoint"], output, plan["config"], quiet=True, seed=seed)
    finally:
        if seed is not None:
            shutil.rmtree(seed, ignore_errors=True)
    m = outcome.manifest
    return {
        "ran": not outcome.up_to_date if hasattr(outcome, "up_to_date") else True,
        "validate_ran": bool(outcome.ran.get("validate")),
        "validation": _verdict(m.get("validation")),
        "profiles": {
            name: {
                "mode": e.get("mode"),
                "engine": str(output / e["engine"]["path"]) if e.get("engine") else None,
                "device_command": e.get("device_command"),
            }
            for name, e in (m.get("profiles") or {}).items()
        },
    }


def _verdict(v: dict | None) -> str | None:
    if not isinstance(v, dict):
        return None
    if v.get("kind") == "gate":
        return "passed" if v.get("passed") else "failed"
    return str(v.get("kind")) + (": ok" if v.get("passed", True) else ": failed")

"""Build time per stage and engine size of `dsc build` at fp16 on SM80 (a100) and SM89 (rtx-4090).

For every test fixture (`dsc.fixtures`: llama, qwen2, deepseek_v2, deepseek_v3, random weights)
and the two trained tiny models in `examples/models/`, runs

    dsc build CHECKPOINT -o OUT --profile a100,rtx-4090 --dtype fp16

in-process, reads the per-stage seconds and engine sizes from the manifest, then runs the same
command again and times the no-op re-run (every stage reused). Each build runs in a fresh
process-wide state only as far as Python allows (one process, sequential), on whatever machine
this is: the CPU-only build machines here have 2 cores and are shared.

    python benchmarks/build_times.py [--only qwen2,tiny-qwen2] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROFILES = ("a100", "rtx-4090")


def _checkpoints(work: Path, only: set[str] | None) -> dict[str, Path]:
    from dsc.fixtures import FAMILIES, make_fixture, train_tokenizer

    out: dict[str, Path] = {}
    wanted = [f for f in FAMILIES if not only or f in only]
    if wanted:
        tok = train_tokenizer(work / "tokenizer")
        for fam in wanted:
            out[fam] = make_fixture(fam, work / "ckpt" / fam, tokenizer_dir=tok)
    for d in sorted((REPO / "examples" / "models").iterdir()):
        if (d / "config.json").is_file() and (not only or d.name in only):
            out[d.name] = d
    return out


def measure(name: str, ckpt: Path, out: Path) -> dict:
    from dsc import api
    from dsc.build_config import BuildConfig

    config = BuildConfig(profiles=(",".join(PROFILES),), dtype="fp16")
    t0 = time.perf_counter()
    outcome = api.build(ckpt, out, config, quiet=True)
    wall = time.perf_counter() - t0
    m = outcome.manifest
    st = m["stages"]
    t0 = time.perf_counter()
    again = api.build(ckpt, out, config, quiet=True)
    rerun = time.perf_counter() - t0
    assert again.up_to_date and not any(again.ran.values()), again.ran
    row = {
        "model": name,
        "family": m["source"]["family"],
        "parameters": m["source"]["num_parameters"],
        "onnx_bytes": sum(
            (out / f).stat().st_size for f in m["graph"]["files"] if f.startswith("model.onnx")
        ),
        "export_s": st["export"]["seconds"],
        "validate_s": st["validate"]["seconds"],
        "wall_s": round(wall, 2),
        "rerun_s": round(rerun, 2),
        "engines": {},
    }
    for pname, p in m["profiles"].items():
        eng = p["engine"]
        row["engines"][pname] = {
            "sm": eng["target_sm"],
            "compile_s": st["compile"]["profiles"][pname]["seconds"],
            "trt_build_s": eng["build_seconds"],
            "engine_bytes": eng["size_bytes"],
            "envelope": p["envelope"],
            "trt_version": eng["trt_version"],
        }
    return row


def table(rows: list[dict]) -> str:
    head = (
        "| model | params | ONNX MB | export s | SM80 compile s | SM80 engine MB | "
        "SM89 compile s | SM89 engine MB | validate s | total s | re-run s |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        a, b = r["engines"]["a100-80gb"], r["engines"]["rtx-4090"]
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['onnx_bytes'] / 1e6:.2f} | "
            f"{r['export_s']:.1f} | {a['compile_s']:.1f} | {a['engine_bytes'] / 1e6:.2f} | "
            f"{b['compile_s']:.1f} | {b['engine_bytes'] / 1e6:.2f} | {r['validate_s']:.2f} | "
            f"{r['wall_s']:.1f} | {r['rerun_s']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", default=None, help="Comma-separated model names.")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dsc-build-times-"))
    rows = []
    for name, ckpt in _checkpoints(work, only).items():
        rows.append(measure(name, ckpt, work / "out" / name))
        print(f"{name}: {rows[-1]['wall_s']:.1f}s", flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

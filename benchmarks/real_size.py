"""`dsc build` at real size: random weights in the exact configs of DeepSeek models (bf16).

Makes the checkpoints with `dsc.fixtures.random_checkpoint` (skipped when present), then runs
each build in a child process under GNU time (`/usr/bin/time -v`) and records, per build: exit
code, wall time and peak RSS of the whole process (the largest of GNU time's figure and the
stage peaks: dsc resets the kernel's high-water mark per stage, which GNU time then reads),
and from the artifact's manifest (or the
rejected artifact's, when the accuracy gate refuses a random-weight model) each stage's wall
time and peak RSS (`seconds`, `peak_rss_bytes`), plus engine sizes and the gate verdict.

    python benchmarks/real_size.py --work /work/bench [--only q15-orin-int8,...] [--samples N]
        [--validate smoke]

Cases (the exact configs are in examples/configs/):
  q15-orin-int8   DeepSeek-R1-Distill-Qwen-1.5B   --profile jetson-orin --int8
  q15-orin-int4   DeepSeek-R1-Distill-Qwen-1.5B   --profile jetson-orin --int4-awq
  q15-4090-fp8    DeepSeek-R1-Distill-Qwen-1.5B   --profile rtx-4090 --fp8
  v2l3-a100-int8  DeepSeek-V2-Lite, first 3 layers at full width   --profile a100-80gb --int8
  v2l3-t4-fp16    DeepSeek-V2-Lite, first 3 layers at full width   --profile t4

Results: `<work>/results.json` and a markdown table on stdout (docs/BENCHMARKS.md holds one run).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "examples" / "configs"
CASES = {
    "q15-orin-int8": ("q15", ["--profile", "jetson-orin", "--int8"]),
    "q15-orin-int4": ("q15", ["--profile", "jetson-orin", "--int4-awq"]),
    "q15-4090-fp8": ("q15", ["--profile", "rtx-4090", "--fp8"]),
    "v2l3-a100-int8": ("v2l3", ["--profile", "a100-80gb", "--int8"]),
    "v2l3-t4-fp16": ("v2l3", ["--profile", "t4"]),
}
STAGES = ("export", "optimize", "quantize", "validate")


def make_checkpoints(work: Path) -> dict[str, Path]:
    """The two checkpoints: R1-Distill-Qwen-1.5B, and V2-Lite cut to 3 layers (bf16)."""
    cfg = json.loads((CONFIGS / "DeepSeek-V2-Lite" / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    v2_cfg = work / "cfg-v2lite-3l" / "config.json"
    v2_cfg.parent.mkdir(parents=True, exist_ok=True)
    v2_cfg.write_text(json.dumps(cfg, indent=2))
    out = {
        "q15": (CONFIGS / "DeepSeek-R1-Distill-Qwen-1.5B" / "config.json", work / "qwen1p5b"),
        "v2l3": (v2_cfg, work / "v2lite3"),
    }
    for config, ckpt in out.values():
        if not (ckpt / "config.json").is_file():
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import sys; from dsc.fixtures import random_checkpoint; "
                    "random_checkpoint(sys.argv[1], sys.argv[2], dtype='bf16')",
                    str(config),
                    str(ckpt),
                ],
                check=True,
                cwd=REPO,
            )
    return {k: ckpt for k, (_, ckpt) in out.items()}


def _time_v(text: str) -> dict:
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    seconds = None
    if wall:
        parts = [float(p) for p in wall.group(1).split(":")]
        seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    return {"wall_s": seconds, "peak_rss_bytes": int(rss.group(1)) * 1024 if rss else None}


def run_case(name: str, ckpt: Path, flags: list[str], work: Path) -> dict:
    out = work / "out" / name
    log = work / f"{name}.log"
    cmd = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "dsc",
        "build",
        str(ckpt),
        *flags,
        "-o",
        str(out),
        "--rebuild",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    rec = {
        "case": name,
        "command": " ".join(["dsc", "build", ckpt.name, *flags]),
        "exit": proc.returncode,
        **_time_v(proc.stderr),
        "wall_s_outer": round(time.perf_counter() - t0, 1),
    }
    art = out if (out / "manifest.json").is_file() else out.with_name(out.name + ".rejected")
    if not (art / "manifest.json").is_file():
        rec["error"] = [ln for ln in proc.stderr.splitlines() if ln.startswith("dsc: error")][-1:]
        return rec
    m = json.loads((art / "manifest.json").read_text())
    rec["artifact"] = str(art)
    rec["stages"] = {}
    for s in STAGES:
        st = m["stages"].get(s) or {}
        rec["stages"][s] = {k: st.get(k) for k in ("status", "seconds", "peak_rss_bytes")}
    for prof, st in (m["stages"].get("compile") or {}).get("profiles", {}).items():
        rec["stages"][f"compile:{prof}"] = {
            k: st.get(k) for k in ("status", "seconds", "peak_rss_bytes")
        }
    rec["engines"] = {
        p: {
            "sm": e.get("sm"),
            "status": e.get("status"),
            "engine_bytes": (e.get("engine") or {}).get("size_bytes"),
            "preflight_bytes": (e.get("preflight") or {}).get("size_bytes"),
            "preflight_sm": (e.get("preflight") or {}).get("sm"),
        }
        for p, e in (m.get("profiles") or {}).items()
    }
    # dsc resets VmHWM per stage (clear_refs 5), which also lowers the ru_maxrss GNU time
    # reports at exit: the whole build's peak is the largest stage peak.
    peaks = [v.get("peak_rss_bytes") or 0 for v in rec["stages"].values()]
    rec["peak_rss_bytes"] = max([rec.get("peak_rss_bytes") or 0, *peaks])
    rec["validation"] = m.get("validation")
    rec["onnx_bytes"] = sum(f.stat().st_size for f in art.glob("model.onnx*"))
    return rec


def table(results: list[dict]) -> str:
    gib = 2**30
    lines = [
        "| case | exit | wall s | peak RSS GiB | "
        + " | ".join(
            f"{s} s / GiB" for s in ("export", "optimize", "quantize", "compile", "validate")
        )
        + " | engine MiB | gate |",
        "|---" * 11 + "|",
    ]
    for r in results:
        st = r.get("stages", {})

        def cell(key, st=st):
            s = st.get(key) or {}
            if s.get("seconds") is None:
                return s.get("status") or "—"
            return f"{s['seconds']:.0f} / {(s.get('peak_rss_bytes') or 0) / gib:.2f}"

        comp = next((k for k in st if k.startswith("compile:")), None)
        eng = next(iter((r.get("engines") or {}).values()), {})
        size = eng.get("engine_bytes") or eng.get("preflight_bytes")
        kind = "" if eng.get("engine_bytes") else f" (preflight SM{eng.get('preflight_sm')})"
        v = r.get("validation") or {}
        gate = f"{v.get('kind')} {'pass' if v.get('passed') else 'FAIL'}" if v else "—"
        if v.get("kind") == "gate":
            gate += (
                f" (ppl {v.get('perplexity_delta', 0):+.2%}, top-1 {v.get('top1_prefill', 0):.2f})"
            )
        lines.append(
            f"| {r['case']} | {r['exit']} | {r['wall_s'] or 0:.0f} | "
            f"{(r['peak_rss_bytes'] or 0) / gib:.2f} | {cell('export')} | {cell('optimize')} | "
            f"{cell('quantize')} | {cell(comp) if comp else '—'} | {cell('validate')} | "
            f"{(size or 0) / 2**20:,.0f}{kind} | {gate} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--only", default=None, help="Comma-separated case names.")
    ap.add_argument(
        "--samples",
        type=int,
        default=None,
        help="Calibration windows for quantized cases (dsc's default: 64).",
    )
    ap.add_argument(
        "--validate",
        choices=("auto", "smoke", "gate", "none"),
        default=None,
        help="dsc build --validate (default: dsc's, the gate for quantized builds; "
        "at 1.5B the gate's greedy decode takes over 30 min here, see "
        "docs/BENCHMARKS.md).",
    )
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ckpts = make_checkpoints(args.work)
    names = args.only.split(",") if args.only else list(CASES)
    path = args.work / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else []
    for name in names:
        which, flags = CASES[name]
        if args.samples and any(f in flags for f in ("--int8", "--fp8", "--int4-awq")):
            flags = [*flags, "--samples", str(args.samples)]
        if args.validate:
            flags = [*flags, "--validate", args.validate]
        rec = run_case(name, ckpts[which], flags, args.work)
        results = [r for r in results if r["case"] != name] + [rec]
        path.write_text(json.dumps(results, indent=2))
        print(json.dumps(rec), flush=True)
    order = {n: i for i, n in enumerate(CASES)}
    print(table(sorted(results, key=lambda r: order.get(r["case"], 99))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

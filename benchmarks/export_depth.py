"""Peak RSS and wall time of `dsc export` against model depth: a flat line when streaming.

For each depth, a random-weight bf16 checkpoint with the exact config of a real model
(default: DeepSeek-R1-Distill-Qwen-7B) cut to that many decoder layers is made with
`dsc.fixtures.random_checkpoint`, then exported (`dsc export --dtype fp16`, streaming, one
decoder layer per kind traced and copied: `--trace-layers kinds`, the default) under GNU time,
one depth after the other; the checkpoint and the export are deleted after each depth unless
`--keep` (disk: about 2x the weights of the deepest one at a time). `--all-layers` adds the
export that traces every layer (`--trace-layers all`) and `--no-stream` the in-memory export
at the depths they name, for comparison. `--checkpoint 28=DIR` exports an existing checkpoint
of that depth instead of making one (it is never deleted).

    python benchmarks/export_depth.py --work /work/depth [--layers 4,8,16,28]
        [--config examples/configs/DeepSeek-R1-Distill-Qwen-7B/config.json]
        [--all-layers 4,8] [--no-stream 4] [--checkpoint 28=DIR] [--append]
        [--plot docs/img/export_depth.png]

Results: `<work>/export_depth.json`, a markdown table on stdout, and the plot (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from real_size import _time_v  # noqa: E402  (GNU time's wall time and peak RSS)


def make_checkpoint(config: Path, layers: int, out: Path) -> tuple[Path, int]:
    cfg = json.loads(config.read_text())
    cfg["num_hidden_layers"] = layers
    cut = out.parent / f"{out.name}-config" / "config.json"
    cut.parent.mkdir(parents=True, exist_ok=True)
    cut.write_text(json.dumps(cfg, indent=2))
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from dsc.fixtures import random_checkpoint; "
            "random_checkpoint(sys.argv[1], sys.argv[2], dtype='bf16')",
            str(cut),
            str(out),
        ],
        check=True,
        cwd=REPO,
    )
    weight_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return out, weight_bytes


MODES = {"kinds": [], "all": ["--trace-layers", "all"], "no-stream": ["--no-stream"]}


def export(ckpt: Path, out: Path, *, mode: str) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "dsc", "export", str(ckpt)]
    cmd += ["-o", str(out), "--dtype", "fp16", "--force", *MODES[mode]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    rec = {"exit": proc.returncode, **_time_v(proc.stderr)}
    if proc.returncode:
        rec["error"] = [ln for ln in proc.stderr.splitlines() if ln.startswith("dsc: ")][-1:]
    shutil.rmtree(out, ignore_errors=True)
    return rec


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "kinds": "streaming, one layer per kind traced",
        "all": "streaming, every layer traced",
        "no-stream": "--no-stream",
    }
    fig, (ax, at) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, label in labels.items():
        rows = sorted(
            (r for r in results if r["mode"] == mode and r["exit"] == 0), key=lambda r: r["layers"]
        )
        if rows:
            x = [r["layers"] for r in rows]
            ax.plot(x, [r["peak_rss_bytes"] / 2**30 for r in rows], marker="o", label=label)
            at.plot(x, [r["wall_s"] for r in rows], marker="o", label=label)
    rows = sorted((r for r in results if r["mode"] == "kinds"), key=lambda r: r["layers"])
    ax.plot(
        [r["layers"] for r in rows],
        [r["weight_bytes"] / 2**30 for r in rows],
        linestyle="--",
        color="grey",
        label="checkpoint weights (bf16)",
    )
    for axis, unit, what in ((ax, "GiB", "peak RSS"), (at, "s", "wall time")):
        axis.set_xlabel("decoder layers")
        axis.set_ylabel(unit)
        axis.set_title(f"{title}: {what}", fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument(
        "--config",
        type=Path,
        default=REPO / "examples/configs/DeepSeek-R1-Distill-Qwen-7B/config.json",
    )
    ap.add_argument("--layers", default="4,8,16,28")
    ap.add_argument("--no-stream", default="", help="depths to also export with --no-stream")
    ap.add_argument(
        "--all-layers", default="", help="depths to also export with --trace-layers all"
    )
    ap.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="LAYERS=DIR",
        help="an existing checkpoint of that depth (kept)",
    )
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument(
        "--append", action="store_true", help="add to the results already in WORK (table, plot)"
    )
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    extra = {
        mode: {int(x) for x in depths.split(",") if x}
        for mode, depths in (("all", args.all_layers), ("no-stream", args.no_stream))
    }
    given = {int(k): Path(v) for k, v in (c.split("=", 1) for c in args.checkpoint)}
    saved = args.work / "export_depth.json"
    results = json.loads(saved.read_text()) if args.append and saved.exists() else []
    for layers in [int(x) for x in args.layers.split(",")]:
        if layers in given:
            ckpt = given[layers]
            weight_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
        else:
            ckpt, weight_bytes = make_checkpoint(args.config, layers, args.work / f"ckpt-{layers}l")
        for mode in MODES:
            if mode != "kinds" and layers not in extra[mode]:
                continue
            rec = export(ckpt, args.work / f"out-{layers}l", mode=mode)
            rec.update(layers=layers, mode=mode, weight_bytes=weight_bytes)
            results.append(rec)
            print(json.dumps(rec), flush=True)
            (args.work / "export_depth.json").write_text(json.dumps(results, indent=2))
        if not args.keep and layers not in given:
            shutil.rmtree(ckpt, ignore_errors=True)
    print("| layers | weights (bf16) GiB | export | wall s | peak RSS GiB | peak / weights |")
    print("|---|---|---|---|---|---|")
    for r in results:
        mode = {"kinds": "streaming", "all": "every layer traced"}.get(r["mode"], r["mode"])
        print(
            f"| {r['layers']} | {r['weight_bytes'] / 2**30:.2f} | {mode} | {r['wall_s']:.0f} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['peak_rss_bytes'] / r['weight_bytes']:.2f} |"
        )
    if args.plot:
        plot(results, args.plot, f"dsc export, {args.config.parent.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

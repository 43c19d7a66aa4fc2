"""Host memory of one TensorRT-RTX engine build, by builder option (issue 15, item 5).

    python benchmarks/compile_rss.py ARTIFACT [--sm 80] [--variants default,WEIGHT_STREAMING,...]

Builds ARTIFACT/model.onnx with `dsc.backends.tensorrt.builder.build_engine` (the compile stage's
call: two optimization profiles from the envelope below, workspace 4 GiB, optimization level 3)
once per variant, each in a fresh process, and prints per variant: exit, engine bytes, build
seconds, peak RSS (ru_maxrss) and the sampled peaks of anonymous and file-backed resident memory
(/proc/self/status RssAnon / RssFile, every 0.2 s). Variants:

- `default`: what dsc does (`OnnxParser.parse_from_file`).
- a `+`-joined list of `trt.BuilderFlag` names set on the builder config, e.g. `WEIGHT_STREAMING`,
  `REFIT`, `STRIP_PLAN+REFIT` (the weight-stripped build that TensorRT-RTX 1.7's weight
  placeholders belong to).
- `layers`: what a preflight compiles by default above 1 GiB of weights
  (`dsc.pipeline.preflight_graph`): layers 0..m-1, layer N-1 and the head.
- `initializers`: the parser gets every external initializer as a pointer into a read-only
  memory map of model.onnx.data (`load_model_proto` + `load_initializer` + `parse_model_proto`,
  TensorRT 10.13's user-initializer API) instead of reading the file itself.

The envelope is jetson-orin's (batch 8, input 4096, KV 16384, 8192 prefill tokens), the engine is
written to a temporary directory and deleted. docs/BENCHMARKS.md holds one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = ("default", "layers", "WEIGHT_STREAMING", "REFIT", "STRIP_PLAN+REFIT", "initializers")


def _child(art: Path, variant: str, sm: int, engine: Path) -> dict:
    import mmap
    import resource
    import threading
    import time
    import types

    import numpy as np
    import onnx

    from dsc.backends.tensorrt import builder as B
    from dsc.backends.tensorrt._shapes import ShapeEnvelope

    peaks = {"RssAnon": 0, "RssFile": 0}

    def sample():
        while True:
            for line in Path("/proc/self/status").read_text().splitlines():
                key = line.split(":")[0]
                if key in peaks:
                    peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    keep: list = []
    real_load = B.load_trt

    def load_trt(backend):
        trt, flavour = real_load(backend)
        ns = types.SimpleNamespace(**{k: getattr(trt, k) for k in dir(trt) if k[:2] != "__"})
        ns.__name__ = trt.__name__
        if variant not in ("default", "initializers", "layers"):

            class Builder(trt.Builder):
                def create_builder_config(self):
                    cfg = super().create_builder_config()
                    for flag in variant.split("+"):
                        cfg.set_flag(getattr(trt.BuilderFlag, flag))
                    return cfg

            ns.Builder = Builder
        if variant == "initializers":

            class Parser(trt.OnnxParser):
                def parse_from_file(self, path):
                    path = Path(path)
                    if not self.load_model_proto(path.read_bytes(), str(path)):
                        return False
                    maps = {}
                    proto = onnx.load(str(path), load_external_data=False)
                    for t in proto.graph.initializer:
                        if t.data_location != onnx.TensorProto.EXTERNAL:
                            continue
                        info = {e.key: e.value for e in t.external_data}
                        loc = info["location"]
                        if loc not in maps:
                            fh = open(path.parent / loc, "rb")  # noqa: SIM115  (kept mapped)
                            maps[loc] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                            keep.append(fh)
                        n = int(info["length"])
                        view = np.frombuffer(
                            maps[loc], np.uint8, count=n, offset=int(info.get("offset", 0))
                        )
                        keep.append(view)
                        if not self.load_initializer(t.name, view.ctypes.data, n):
                            return False
                    return self.parse_model_proto()

            ns.OnnxParser = Parser
        return ns, flavour

    from dsc.pipeline.preflight_graph import preflight_graph

    B.load_trt = load_trt
    mode = "layers" if variant == "layers" else "full"
    with preflight_graph(art / "model.onnx", mode) as (path, graph):
        res = B.build_engine(
            path,
            ShapeEnvelope(max_batch=8, max_input_len=4096, max_kv=16384, max_num_tokens=8192),
            B.BuildOptions(target_sm=sm, workspace_mib=4096, optimization_level=3),
            backend="tensorrt_rtx",
            io_spec=json.loads((art / "model_io.json").read_text()),
            engine_path=engine,
        )
    return {
        "graph": graph.get("layers", "whole"),
        "engine_bytes": res.size_bytes,
        "build_s": round(res.build_seconds, 1),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_anon_bytes": peaks["RssAnon"],
        "peak_file_bytes": peaks["RssFile"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--sm", type=int, default=80)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as d:
            out = _child(args.artifact, args.child, args.sm, Path(d) / "model.engine")
        print("RESULT " + json.dumps(out))
        return 0
    gib = 2**30
    print(
        "| variant | exit | layers compiled | engine GiB | build s | peak RSS GiB | anon GiB "
        "| file-backed GiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for v in args.variants.split(","):
        cmd = [sys.executable, __file__, str(args.artifact), "--sm", str(args.sm), "--child", v]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if p.returncode or line is None:
            err = (p.stderr.strip().splitlines() or ["?"])[-1][:120]
            print(f"| {v} | {p.returncode} | failed: {err} | | | | | |", flush=True)
            continue
        r = json.loads(line[7:])
        print(
            f"| {v} | 0 | {r['graph']} | {r['engine_bytes'] / gib:.2f} | {r['build_s']:.0f} | "
            f"{r['peak_rss_bytes'] / gib:.2f} | {r['peak_anon_bytes'] / gib:.2f} | "
            f"{r['peak_file_bytes'] / gib:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

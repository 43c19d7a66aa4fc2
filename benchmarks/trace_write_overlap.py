"""Would tracing beside the weight write shorten a first export? Times, in one warm `dsc export`
process, the write of `model.onnx.data` (`_save_external`, 2 writer threads) and a trace of the
checkpoint's 1-layer cut model (`torch.onnx.export`, as a trace-cache miss runs it): one after
the other, then at once (the write on its own thread, the trace on the main thread), with
Python's default GIL switch interval and with 1 ms. The export itself takes its cut graph from
the trace cache, so its output is the normal one; the extra trace is thrown away.

usage: python benchmarks/trace_write_overlap.py CKPT [ROUNDS]
  CKPT: e.g. python -c "import sys; from dsc.fixtures import random_checkpoint;
        random_checkpoint(sys.argv[1], sys.argv[2], dtype='bf16')" \\
        examples/configs/DeepSeek-R1-Distill-Qwen-1.5B CKPT
Each mode runs in a fresh `dsc export` process (output in a temporary directory, deleted;
`$DSC_CACHE_DIR` set to a temporary cache, filled by a first export). Prints one line per run:
mode, seconds from the write's start to the end of both. docs/BENCHMARKS.md (session 15) has
the 1.5B's figures.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

MODES = ("sequential", "overlapped", "overlapped-1ms")


def _child(ckpt: str, out: str, mode: str) -> None:
    import threading

    import torch

    from dsc.cli import entry
    from dsc.export import onnx_export as oe
    from dsc.export.streaming import fake_model
    from dsc.models.checkpoint import inspect_checkpoint

    info = inspect_checkpoint(ckpt)
    save = oe._save_external

    def trace_once() -> None:
        cut, _, fake_mode = fake_model(info, torch.float16, num_layers=1)
        wrapper = oe.KVCacheWrapper(cut, info.family)
        ids, mask, pos, cache = oe._export_example(cut.config.to_dict(), info.family, torch.float16)
        args = tuple(fake_mode.from_tensor(t) for t in (ids, mask, pos, *cache))
        oe._trace(wrapper, args, info.family, 1, None, optimize=False)

    def timed(model, path, **kw):
        t0 = time.perf_counter()
        if mode == "sequential":
            written = save(model, path, **kw)
            trace_once()
        else:
            if mode == "overlapped-1ms":
                sys.setswitchinterval(0.001)
            result: dict = {}
            writer = threading.Thread(target=lambda: result.update(w=save(model, path, **kw)))
            writer.start()
            trace_once()
            writer.join()
            written = result["w"]
        print(f"{mode}\t{time.perf_counter() - t0:.2f}", file=sys.stderr, flush=True)
        return written

    oe._save_external = timed
    sys.argv = ["dsc", "export", ckpt, "-o", out, "--dtype", "fp16"]
    entry()


def main() -> None:
    ckpt = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, DSC_CACHE_DIR=os.path.join(tmp, "cache"))
        out = os.path.join(tmp, "out")
        run = [sys.executable, "-m", "dsc", "export", ckpt, "-o", out, "--dtype", "fp16"]
        subprocess.run(run, env=env, check=True, stdout=subprocess.DEVNULL)  # fills the cache
        for _ in range(rounds):
            for mode in MODES:
                subprocess.run(["rm", "-rf", out], check=True)
                subprocess.run(["sync"], check=True)
                time.sleep(3)
                child = [sys.executable, __file__, "--child", ckpt, out, mode]
                p = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
                print(next(line for line in p.stderr.splitlines() if line.startswith(mode)))


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        _child(*sys.argv[2:5])
    else:
        main()

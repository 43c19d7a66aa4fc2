"""`WeightReader.read_into` over every 2-D tensor of a checkpoint: one reused chunk buffer per
thread (what dsc does) against a fresh `bytearray` per chunk (what it did before 43d8b5b).

One thread, cast to fp16, not transposed; the checkpoint is read once first so both variants
find it in the page cache. Alternates the variants `--rounds` times and prints wall and CPU
seconds for each run.

    python benchmarks/read_into_buffers.py CKPT [--rounds 2]

Session 12, random-weight DeepSeek-R1-Distill-Qwen-1.5B (bf16, 198 2-D tensors), second
round: fresh 5.27 s wall / 5.26 s CPU, reused 2.06 s / 2.06 s (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def reader_benchmark_setup(doc: str):
    """(args, checkpoint info) of a reader benchmark's command line `CKPT [--rounds N]`
    (`doc`: the script's docstring, whose first line describes it), with torch on one thread
    and the checkpoint's shards read once, so that every variant finds them in the page cache.
    Also used by benchmarks/transposed_copy.py."""
    import torch

    from dsc.models.checkpoint import inspect_checkpoint

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = inspect_checkpoint(args.checkpoint)
    for f in sorted(args.checkpoint.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    return args, info


def main() -> None:
    import torch

    from dsc.models.weights import WeightReader

    args, info = reader_benchmark_setup(__doc__)
    for _ in range(args.rounds):
        for variant in ("fresh", "reused"):
            with WeightReader.for_checkpoint(info, dtype=torch.float16) as reader:
                if variant == "fresh":
                    reader._chunk_buffer = lambda nbytes: bytearray(nbytes)
                names = [n for n in reader.names if len(reader.shape(n)) == 2]
                wall, cpu = time.perf_counter(), time.process_time()
                for name in names:
                    reader.read_into(name, torch.empty(reader.shape(name), dtype=torch.float16))
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(f"{variant:6s} {len(names)} tensors: {wall:.2f} s wall, {cpu:.2f} s CPU")


if __name__ == "__main__":
    main()

"""Transposed reads (`WeightReader.read_into(transpose=True)`) of every 2-D tensor of a
checkpoint but the embedding, as the streaming export writes the weights its MatMuls use: the
copy in tiles of `TRANSPOSE_TILE_ROWS` source rows (what dsc does) against one `copy_` of each
chunk (what it did before; the tile then spans the whole chunk).

One thread, cast to fp16; the checkpoint is read once first so both variants find it in the page
cache. Alternates the variants `--rounds` times and prints wall and CPU seconds for each run,
then the per-shape time of one tensor of each shape in the last round.

    python benchmarks/transposed_copy.py CKPT [--rounds 2]

Session 13, random-weight DeepSeek-R1-Distill-Qwen-1.5B (bf16): docs/BENCHMARKS.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from read_into_buffers import reader_benchmark_setup  # noqa: E402


def main() -> None:
    import torch

    from dsc.models import weights
    from dsc.models.weights import WeightReader

    args, info = reader_benchmark_setup(__doc__)
    tile = weights.TRANSPOSE_TILE_ROWS
    per_shape: dict[str, dict[tuple, float]] = {}
    for _ in range(args.rounds):
        for variant, rows in (("whole", 1 << 62), ("tiled", tile)):
            weights.TRANSPOSE_TILE_ROWS = rows
            shapes = per_shape.setdefault(variant, {})
            with WeightReader.for_checkpoint(info, dtype=torch.float16) as reader:
                names = [
                    n
                    for n in reader.names
                    if len(reader.shape(n)) == 2 and not n.endswith("embed_tokens.weight")
                ]
                wall, cpu = time.perf_counter(), time.process_time()
                for name in names:
                    rows_, cols = reader.shape(name)
                    out = torch.empty(cols, rows_, dtype=torch.float16)
                    t = time.perf_counter()
                    reader.read_into(name, out, transpose=True)
                    shapes[(rows_, cols)] = time.perf_counter() - t
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(f"{variant:5s} {len(names)} tensors: {wall:.2f} s wall, {cpu:.2f} s CPU")
    weights.TRANSPOSE_TILE_ROWS = tile
    for shape in per_shape["whole"]:
        whole, tiled = per_shape["whole"][shape], per_shape["tiled"][shape]
        print(f"{list(shape)}: whole {whole * 1e3:.1f} ms, tiled {tiled * 1e3:.1f} ms")


if __name__ == "__main__":
    main()

"""Greedy generation on an artifact's graph, whole or one decoder layer at a time.

    /usr/bin/time -v python benchmarks/run_by_layer.py ARTIFACT graph|layer [--tokens 8]

`graph`: one ONNX Runtime session (`OrtCausalLM`); `layer`: `SegmentedCausalLM`. Prints the
runner and the generated token ids (the two must agree); GNU time gives wall time and peak RSS.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> int:
    from dsc.backends.onnxruntime.segmented import artifact_runner
    from dsc.models.loading import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("way", choices=("graph", "layer"))
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--prompt", default="The capital of France is")
    args = ap.parse_args()
    runner = artifact_runner(args.artifact, by_layer=args.way == "layer")
    ids = load_tokenizer(args.artifact)(args.prompt)["input_ids"]
    print(type(runner).__name__, runner.generate([ids], args.tokens)[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

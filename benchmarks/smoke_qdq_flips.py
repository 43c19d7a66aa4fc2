"""Why a quantized graph's decode and prefill differ: rounding flips in the activation Q/DQ.

    python benchmarks/smoke_qdq_flips.py ARTIFACT [--prompt-tokens 4] [--steps 8]

Runs the smoke check's comparison by hand on a quantized artifact (`dsc quantize` output): a
prefill of the prompt, greedy decode steps through the KV cache, and one prefill of the prompt and
the generated tokens. Every activation QuantizeLinear's float input and DequantizeLinear output
are exposed as graph outputs; for each decode step it prints the logits' difference relative to
the largest logit, and for every activation Q/DQ pair where the two paths rounded differently:
how many elements, the largest pre-quantization difference and the quantization step. Steps
without a flip show float noise only (as the fp16 graph does); a flip moves everything
downstream by whole steps. The result that motivated `dsc.pipeline.smoke`'s check without
activation Q/DQ is in that module's docstring and docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--prompt-tokens", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()

    import onnx_ir as ir
    import onnxruntime as ort

    from dsc.artifacts import load_io_spec
    from dsc.backends.onnxruntime.runner import ort_dtype

    io = load_io_spec(args.artifact)
    model = ir.load(str(args.artifact / io["onnx"]))
    pairs = {}  # DequantizeLinear output -> (QuantizeLinear input, step)
    exposed = {v.name for v in model.graph.outputs}
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or node.inputs[0].producer() is None:
            continue
        q = node.inputs[0].producer()
        if q.op_type != "QuantizeLinear" or q.inputs[0].const_value is not None:
            continue
        step = float(np.max(node.inputs[1].const_value.numpy().astype(np.float32)))
        pairs[node.outputs[0].name] = (q.inputs[0].name, step)
        for v in (node.outputs[0], q.inputs[0]):
            if v.name not in exposed:
                model.graph.outputs.append(v)
                exposed.add(v.name)
    if not pairs:
        sys.exit(f"{args.artifact}: no activation Q/DQ pairs")
    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    cache = io["cache"]
    dtype = ort_dtype(cache["dtype"])

    def run(tokens, start, past):
        feeds = {
            "input_ids": np.array([tokens], np.int64),
            "attention_mask": np.ones((1, start + len(tokens)), np.int64),
            "position_ids": np.arange(start, start + len(tokens))[None],
        }
        feeds.update(zip(cache["inputs"], past, strict=False))
        return dict(zip(names, session.run(names, feeds), strict=False))

    empty = [
        np.zeros((1, e["heads"], 0, e["dim"]), dtype)
        for _ in range(cache["num_layers"])
        for e in cache["entries"]
    ]
    vocab = int(io.get("vocab_size") or 1000)
    prompt = [(7 * i + 3) % vocab for i in range(args.prompt_tokens)]
    out = run(prompt, 0, empty)
    steps, generated = [out], []
    for i in range(args.steps):
        generated.append(int(out["logits"][0, -1].argmax()))
        if i == args.steps - 1:
            break
        out = run([generated[-1]], len(prompt) + i, [out[n] for n in cache["outputs"]])
        steps.append(out)
    full = run(prompt + generated[:-1], 0, empty)
    n = len(prompt)
    scale = float(np.abs(full["logits"][0, n - 1 :]).max())
    print(
        f"{args.artifact}: {len(pairs)} activation Q/DQ pairs, prompt {n} tokens, "
        f"{args.steps} steps"
    )
    for i, st in enumerate(steps):
        pos = n - 1 + i
        rel = (
            float(
                np.abs(
                    st["logits"][0, -1].astype(np.float32)
                    - full["logits"][0, pos].astype(np.float32)
                ).max()
            )
            / scale
        )
        flips = []
        for dq, (pre, step) in pairs.items():
            a, b = st[dq][0, -1], full[dq][0, pos]
            k = int((a != b).sum())
            if k:
                d = float(
                    np.abs(
                        st[pre][0, -1].astype(np.float32) - full[pre][0, pos].astype(np.float32)
                    ).max()
                )
                flips.append(f"{dq}: {k} elements (pre-Q diff {d:.2e}, step {step:.2e})")
        print(
            f"step {i}: logits differ by {rel:.2e} of the largest; "
            f"{'; '.join(flips) if flips else 'no rounding flips'}"
        )


if __name__ == "__main__":
    main()

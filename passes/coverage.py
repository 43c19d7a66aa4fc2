"""Fusion coverage: per kind of block, how many were fused, and why any other was not.

A block is found two ways: the node a fusion tagged (`dsc.block`, see fusion/_common.py), or an
anchor op the exporter emits once per block that is still there untagged:

    rmsnorm    ReduceMean of a square (Pow(x, 2) or x*x)
    attention  Softmax
    mlp        SiLU, g * Sigmoid(g), whose g comes from a GEMM with a constant 2-D weight
    moe        GatherND of a constant [E, ., .] expert weight (one per routing index)

For every untagged anchor the fusion rules are tried at the nodes just downstream of it; the
block is `kept` when a rule matches but the target has no fused op for it (e.g. RMSNorm on a
parser without RMSNormalization: the decomposed pattern is the form TensorRT fuses), and
`unfused` otherwise, with the reason of the attempt that matched the most pattern nodes.
With the model's config.json, the expected number of blocks per kind is checked too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import onnx_ir as ir

from dsc.passes._ir import const_info, const_scalar, producer, rank
from dsc.passes.fusion import block_of, explain, form_of

KINDS = ("rmsnorm", "attention", "mlp", "moe", "rope")


def _downstream(node: ir.Node, depth: int) -> list[ir.Node]:
    seen, frontier, out = {id(node)}, [node], [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for v in n.outputs:
                for use in v.uses():
                    if id(use.node) not in seen and use.node.graph is node.graph:
                        seen.add(id(use.node))
                        nxt.append(use.node)
        out += nxt
        frontier = nxt
    return out


def _is_square(v: ir.Value) -> bool:
    n = producer(v, "Pow", "Mul")
    if n is None:
        return False
    if n.op_type == "Pow":
        return const_scalar(n.inputs[1]) == 2
    return n.inputs[0] is n.inputs[1]


def _const_weight_gemm(v: ir.Value | None) -> bool:
    n = producer(v, "Split")
    if n is not None:
        v = n.inputs[0]
    n = producer(v, "MatMul", "Gemm")
    if n is None:
        return False
    w = const_info(n.inputs[1])
    return w is not None and w.ndim == 2


def _anchors(graph: ir.Graph) -> dict[str, list[ir.Node]]:
    from dsc.passes.fusion.moe import expert_gathers

    found: dict[str, list[ir.Node]] = {k: [] for k in KINDS}
    for node in graph:
        if node.domain not in ("", "ai.onnx") or block_of(node):
            continue
        op = node.op_type
        if op == "ReduceMean" and _is_square(node.inputs[0]):
            found["rmsnorm"].append(node)
        elif op == "Softmax" and rank(node.inputs[0]) in (None, 4):
            found["attention"].append(node)  # (MoE routers' softmax is 2-D)
        elif op == "Mul" and len(node.inputs) == 2:
            g, s = node.inputs
            sig = producer(s, "Sigmoid")
            if sig is None:
                g, s = s, g
                sig = producer(s, "Sigmoid")
            if sig is not None and sig.inputs[0] is g and _const_weight_gemm(g):
                found["mlp"].append(node)
    # One MoE block per routing index: its first expert gather.
    found["moe"] = [g[0] for g in expert_gathers(graph, lambda n: not block_of(n)).values()]
    return found


def _rules(kind: str, model: ir.Model):
    """The rules that would fuse a block of `kind` (in their most permissive target)."""
    from dsc.passes._target import OPSET23
    from dsc.passes.fusion import attention, mla, mlp, moe, rmsnorm

    if kind == "rmsnorm":
        return list(rmsnorm.RULES), False
    if kind == "attention":
        return [attention.AttentionFusion.rule(OPSET23), mla.MlaAbsorb.rule(OPSET23, 1)], False
    if kind == "mlp":
        return [mlp.RULE], True
    if kind == "moe":
        return [moe.MoeLowering.rule(True)], False
    return [], False


def expected_blocks(config: dict) -> dict[str, int]:
    """Blocks per kind a transformers config implies (dsc's four families)."""
    layers = int(config["num_hidden_layers"])
    mla = "kv_lora_rank" in config and config.get("kv_lora_rank")
    expected = {"rmsnorm": 2 * layers + 1, "attention": layers}
    if mla:
        expected["rmsnorm"] += layers * (2 if config.get("q_lora_rank") else 1)
    experts = int(config.get("n_routed_experts") or 0)
    if experts:
        dense = int(config.get("first_k_dense_replace") or 0)
        moe_layers = layers - dense
        shared = int(config.get("n_shared_experts") or 0)
        expected["mlp"] = dense + (moe_layers if shared else 0)
        expected["moe"] = moe_layers
    else:
        expected["mlp"] = layers
    return expected


def _kept_reason(kind: str, target) -> str | None:
    """Why a block the rules match may stay as it is on this target (None: it should not)."""
    if target is None:
        return None
    if kind == "rmsnorm" and not target.rms_normalization:
        return f"{target.name}: no RMSNormalization; the decomposed form is what TensorRT fuses"
    if kind == "rope" and not target.rotary_embedding:
        return f"{target.name}: no RotaryEmbedding; the elementwise form is what TensorRT fuses"
    return None


_PASS_OF = {
    "rmsnorm": "fuse-rmsnorm",
    "attention": "fuse-attention/fuse-mla",
    "mlp": "fuse-mlp",
    "moe": "lower-moe",
    "rope": "fuse-rotary",
}


def coverage(model: ir.Model, config: dict | None = None, *, target=None) -> dict:
    """The coverage record (JSON-ready) of an optimized model for `target` (a TargetOps)."""
    tagged: dict[str, list[ir.Node]] = {k: [] for k in KINDS}
    for node in model.graph:
        kind = block_of(node)
        if kind in tagged:
            tagged[kind].append(node)
    anchors = _anchors(model.graph)
    expected = expected_blocks(config) if config else {}
    kinds = {}
    for kind in KINDS:
        kept, unfused = 0, []
        rules, commute = _rules(kind, model)
        for node in anchors[kind]:
            depth = {"mlp": 2, "moe": 14}.get(kind, 8)
            ok, reason = (
                explain(rules, model, _downstream(node, depth), commute=commute)
                if rules
                else (False, "no rule")
            )
            if ok and _kept_reason(kind, target):
                kept += 1
                continue
            if ok:
                reason = f"{_PASS_OF[kind]} would fuse it: the pass was not run or was disabled"
            unfused.append({"node": node.name or node.op_type, "reason": reason})
        blocks = len(tagged[kind]) + len(anchors[kind])
        entry = {
            "blocks": blocks,
            "fused": len(tagged[kind]),
            "kept": kept,
            "forms": dict(Counter(form_of(n) for n in tagged[kind])),
            "unfused": unfused,
        }
        if kind in expected:
            entry["expected"] = expected[kind]
        entry["percent"] = round(100.0 * (entry["fused"] + kept) / blocks, 1) if blocks else None
        kinds[kind] = entry
    complete = all(
        not e["unfused"] and e.get("expected", e["blocks"]) == e["blocks"]
        for k, e in kinds.items()
        if k != "rope"
    )
    return {
        "target": target.name if target is not None else None,
        "kinds": kinds,
        "complete": complete,
    }


def format_coverage(cov: dict, title: str = "") -> str:
    lines = [title] if title else []
    for kind, e in cov["kinds"].items():
        if not e["blocks"] and "expected" not in e:
            continue
        pct = f"{e['percent']:.0f}%" if e["percent"] is not None else "-"
        extra = f", {e['kept']} kept in target form" if e["kept"] else ""
        exp = (
            f" (config: {e['expected']})"
            if "expected" in e and e["expected"] != e["blocks"]
            else ""
        )
        forms = ", ".join(f"{f} x{n}" for f, n in e["forms"].items())
        lines.append(
            f"  {kind:<9} {e['fused'] + e['kept']}/{e['blocks']} {pct}{exp}"
            f"{extra}{' [' + forms + ']' if forms else ''}"
        )
        for u in e["unfused"]:
            lines.append(f"    not fused: {u['node']}: {u['reason']}")
    return "\n".join(lines)


def summary_rows(cov: dict, kinds: Iterable[str] = ("rmsnorm", "attention", "mlp", "moe")):
    return {
        k: f"{cov['kinds'][k]['fused'] + cov['kinds'][k]['kept']}/{cov['kinds'][k]['blocks']}"
        for k in kinds
        if k in cov["kinds"]
    }

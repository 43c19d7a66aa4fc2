"""What every fusion pass shares: block tags, rule application with per-rule counts, reasons.

A rewrite marks the node that stands for the block it produced with two metadata properties,
`dsc.block` (rmsnorm, mlp, rope, attention, moe) and `dsc.form` (the op or canonical form it
chose). They are saved with the graph, so coverage can be computed from any optimized model,
and a second run of a pass sees the block is done.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
from onnxscript.rewriter import MatchingTracer, pattern

from dsc.passes._framework import DscPass
from dsc.passes._ir import DerivedTensor  # noqa: F401  (re-exported: the fusions' lazy weights)

BLOCK_KEY = "dsc.block"
FORM_KEY = "dsc.form"


def tag(value_or_node: ir.Value | ir.Node, block: str, form: str) -> None:
    node = value_or_node if isinstance(value_or_node, ir.Node) else value_or_node.producer()
    node.metadata_props[BLOCK_KEY] = block
    node.metadata_props[FORM_KEY] = form


def block_of(node: ir.Node) -> str | None:
    return node.metadata_props.get(BLOCK_KEY)


def form_of(node: ir.Node) -> str | None:
    return node.metadata_props.get(FORM_KEY)


def new_const(op, graph: ir.Graph | ir.Function, stem: str, array) -> ir.Value:
    """A new initializer in the rewritten graph, with a name no value of it has yet."""
    import numpy as np

    from dsc.passes._ir import unique_name

    array = np.ascontiguousarray(array)
    name = unique_name(graph, stem) if isinstance(graph, ir.Graph) else stem
    return op.initializer(ir.tensor(array, name=name), name=name)


def lazy_const(
    op,
    graph: ir.Graph | ir.Function,
    stem: str,
    make,
    shape: tuple[int, ...],
    dtype: ir.DataType,
    sources: tuple[ir.Value, ...] = (),
) -> ir.Value:
    """A new initializer whose content `make()` (an array of `shape` and `dtype`) computes when
    it is read: when the graph is saved, one tensor at a time, or by a pass that reads it. A
    weight a fusion derives from others (the gate/up concat, MLA's absorbed W_uk / W_uv, the MoE
    expert relayout) is therefore never held with the rest: the optimize stage's peak memory
    does not grow with the number of layers. `make` should read `sources` (the values it
    derives from, recorded on the `DerivedTensor`) with `dsc.passes._ir.read_consts`, which
    releases their memory maps."""
    import numpy as np

    from dsc.passes._ir import unique_name

    name = unique_name(graph, stem) if isinstance(graph, ir.Graph) else stem

    def compute():
        array = np.ascontiguousarray(make())
        if tuple(array.shape) != tuple(shape):
            raise RuntimeError(f"{name}: made {array.shape}, declared {shape} (a dsc bug)")
        return ir.tensor(array, dtype=dtype, name=name)

    tensor = DerivedTensor(
        compute,
        dtype,
        ir.Shape(shape),
        name=name,
        sources=tuple(v.name for v in sources),
        source_tensors=tuple(sources),
    )
    return op.initializer(tensor, name=name)


def branch_graph(tape, out: ir.Value, like: ir.Value, main: ir.Graph, name: str) -> ir.Graph:
    """An If branch from the nodes a TapeBuilder recorded: its initializers go to the main
    graph (branches read them from the outer scope) and every value and node gets a name unique
    in the model (ONNX wants names unique across a graph and its subgraphs)."""
    from dsc.passes._ir import unique_name

    for init in tape.initializers:
        main.register_initializer(init)
    result = ir.Value(name=unique_name(main, f"{name}_out"), type=like.type)
    nodes = [*tape.nodes, ir.node("Identity", [out], outputs=[result])]
    for node in nodes:
        node.name = unique_name(main, f"{name}_{node.op_type}")
        for value in node.outputs:
            if value is not result:
                value.name = unique_name(main, f"{name}_v")
    return ir.Graph([], [result], nodes=nodes, name=name)


def all_nodes(graph: ir.Graph):
    """Nodes of the graph and of every subgraph, parents first."""
    return ir.traversal.RecursiveGraphIterator(graph)


def graph_of(node: ir.Node) -> ir.Graph:
    return node.graph


class FusionPass(DscPass):
    """Applies `rules()` one rule at a time (so each is counted) to the graph and subgraphs.

    With `commute`, each rule also matches with the inputs of commutative ops swapped
    (onnxscript cannot commute patterns that contain OrValue alternatives).
    """

    commute = False

    def rules(self) -> Sequence[pattern.RewriteRule]:
        raise NotImplementedError

    def may_emit_opset23(self) -> bool:
        """Whether a rewrite may emit an opset-23 op (the model is upgraded first if so)."""
        return False

    def _any_match(self, model: ir.Model, rules) -> bool:
        variants = [v for r in rules for v in (r.commute() if self.commute else [r])]
        for node in all_nodes(model.graph):
            for rule in variants:
                if rule.match(model, node.graph, node):
                    return True
        return False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.counts = {}
        total = 0
        rules = list(self.rules())
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if rules and opset < 23 and self.may_emit_opset23() and self._any_match(model, rules):
            # Run without `upgrade-opset` (e.g. --passes fuse-rmsnorm): the fused op needs 23.
            from onnxscript.version_converter import convert_version

            convert_version(model, 23, fallback=False)
            self.notes.append(f"upgraded the model from opset {opset} to 23 first")
            total += 1
        for rule in rules:
            n = pattern.RewriteRuleSet([rule], commute=self.commute).apply_to_model(model)
            if n:
                self.counts[rule.name] = self.counts.get(rule.name, 0) + n
                total += n
        return ir.passes.PassResult(model, total > 0)


def explain(
    rules: Sequence[pattern.RewriteRule],
    model: ir.Model,
    candidates: Sequence[ir.Node],
    commute: bool = False,
) -> tuple[bool, str]:
    """(matched, reason): does any rule match rooted at one of `candidates`; if not, why.

    The reason is the failure of the attempt that got furthest (most pattern nodes matched).
    """
    best: tuple[int, str] = (-1, "no rule's pattern matches here")
    variants = [v for rule in rules for v in (rule.commute() if commute else [rule])]
    for node in candidates:
        for rule in variants:
            tracer = MatchingTracer()
            match = rule.match(
                model, node.graph, node, tracer=tracer, check_nodes_are_removable=False
            )
            if match:
                return True, ""
            for info in tracer.best_matches_map.get(rule, []):
                score = info.score()
                if score > best[0]:
                    best = (score, f"{rule.name}: {info.match_result.reason}")
    return False, best[1]

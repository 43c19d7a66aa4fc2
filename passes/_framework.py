"""The pass framework: a frozen context, a name registry, the pipeline order, the records.

A pass is an `onnx_ir` pass (`call(model) -> PassResult`) built by a factory from a frozen
`PassContext` (hardware profile + options). Passes register under a name with a one-line doc:

    register_pass("fuse-rmsnorm", RmsNormFusionPass, "x*rsqrt(mean(x^2)+eps)*w -> ...", "fusion")

`PIPELINE` is the one place that holds the default order. The pass modules import this module
to register; `dsc.passes._pipeline` imports them all and builds and runs pipelines (kept apart
so that no pass module imports the module that imports it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from dsc.errors import BadInput

if TYPE_CHECKING:
    from dsc.hardware import HardwareProfile
    from dsc.passes._target import TargetOps

# The default order. Cleanup first (fusion patterns assume folded constants and no dead
# branches); the opset upgrade before the fusions that may emit opset-23 ops; MLA before
# attention (it rewrites MLA's key construction into the plain form the attention rule matches,
# and builds the absorbed decode attention itself); cleanup again to drop what fusions left.
PIPELINE: tuple[str, ...] = (
    "fold-constants",
    "simplify",
    "cse",
    "remove-unused",
    "half-fp32-gemm",
    "upgrade-opset",
    "fuse-rmsnorm",
    "fuse-mlp",
    "fuse-rotary",
    "fuse-mla",
    "fuse-attention",
    "lower-moe",
    "cse",
    "remove-unused",
    "shape-inference",
    "topo-sort",
)


@dataclass(frozen=True)
class PassOptions:
    """Options every pass can read. Frozen: a pass never changes its context."""

    # Which fused ops to emit: "auto" (from the profile; portable without one), "portable"
    # (only ops every supported TensorRT parses), "opset23" (RMSNormalization,
    # RotaryEmbedding, Attention wherever the dtype allows, whatever the target).
    target_ops: str = "auto"
    # MLA: sequence lengths up to this run the weight-absorbed attention (decode); longer
    # ones the expanded form. 0 disables absorption.
    mla_absorb_max_seq: int = 1
    # MoE: token counts (batch*seq*top_k) below num_experts keep the per-token expert-weight
    # gather (reads only the chosen experts); others run the dense two-GEMM form.
    moe_gather_decode: bool = True
    # Lower fp32 GEMMs over half-precision operands to half GEMMs even when the target runs
    # FP32 GEMMs (a build whose targets disagree sets it when any of them cannot).
    half_fp32_gemm: bool = False
    # How `half-fp32-gemm` computes an fp32 GEMM in half GEMMs (dsc.passes.precision): "round"
    # (weight rounded: one GEMM), "split" (weight as hi + lo: two), "compensated" (split, plus
    # the hi GEMM's output rounding recovered by a third: fp32-exact as measured).
    half_fp32_gemm_mode: str = "compensated"

    def __post_init__(self):
        if self.target_ops not in ("auto", "portable", "opset23"):
            raise BadInput(
                f"unknown target_ops {self.target_ops!r} (expected auto, portable or opset23)"
            )
        if self.half_fp32_gemm_mode not in ("round", "split", "compensated"):
            raise BadInput(
                f"unknown half_fp32_gemm_mode {self.half_fp32_gemm_mode!r} "
                f"(expected round, split or compensated)"
            )
        if self.mla_absorb_max_seq < 0:
            raise BadInput("mla_absorb_max_seq must be >= 0")


@dataclass(frozen=True)
class PassContext:
    """What a pass may know: the target (or None for target-independent passes) and options."""

    profile: HardwareProfile | None = None
    options: PassOptions = field(default_factory=PassOptions)

    @property
    def target(self) -> TargetOps:
        from dsc.passes._target import target_ops

        return target_ops(self.profile, self.options.target_ops)


class DscPass(ir.passes.InPlacePass):
    """Base of dsc's passes: holds the context and the counts of the last run."""

    def __init__(self, ctx: PassContext | None = None):
        super().__init__()
        self.ctx = ctx or PassContext()
        self.counts: dict[str, int] = {}
        self.notes: list[str] = []


@dataclass(frozen=True)
class PassInfo:
    name: str
    factory: Callable[[PassContext], ir.passes.PassBase]
    doc: str
    kind: str  # "cleanup" | "fusion" | "lowering" | "opset" | "precision"


_REGISTRY: dict[str, PassInfo] = {}


def register_pass(
    name: str, factory: Callable[[PassContext], ir.passes.PassBase], doc: str, kind: str = "cleanup"
) -> None:
    if name in _REGISTRY and _REGISTRY[name].factory is not factory:
        raise ValueError(f"pass {name!r} is already registered")
    _REGISTRY[name] = PassInfo(name, factory, doc, kind)


# -- running ------------------------------------------------------------------------------------


@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    modified: bool
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    verify_max_abs: float | None = None

    def to_json(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "seconds": round(self.seconds, 4),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "modified": self.modified,
            "counts": dict(self.counts),
        }
        if self.notes:
            d["notes"] = list(self.notes)
        if self.verify_max_abs is not None:
            d["verify_max_abs"] = self.verify_max_abs
        return d


@dataclass
class PipelineReport:
    target: str
    passes: list[PassRecord] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    seconds: float = 0.0
    dumps: list[str] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return any(p.modified for p in self.passes)

    def counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for p in self.passes:
            for k, v in p.counts.items():
                total[k] = total.get(k, 0) + v
        return total

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "seconds": round(self.seconds, 3),
            "counts": self.counts(),
            "passes": [p.to_json() for p in self.passes],
            **({"dumps": self.dumps} if self.dumps else {}),
        }


def count_nodes(model: ir.Model) -> int:
    """Nodes in the main graph and every subgraph (If branches)."""
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


__all__ = [
    "PIPELINE",
    "DscPass",
    "PassContext",
    "PassInfo",
    "PassOptions",
    "PassRecord",
    "PipelineReport",
    "count_nodes",
    "register_pass",
]

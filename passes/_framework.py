"""The pass framework: a frozen context, a name registry, the pipeline order, and a runner.

A pass is an `onnx_ir` pass (`call(model) -> PassResult`) built by a factory from a frozen
`PassContext` (hardware profile + options). Passes register under a name with a one-line doc:

    register_pass("fuse-rmsnorm", RmsNormFusionPass, "x*rsqrt(mean(x^2)+eps)*w -> ...", "fusion")

`build_pipeline(ctx, only=..., disable=...)` instantiates them in `PIPELINE`, the one place that
holds the order. `run_pipeline` runs a pipeline on a model and returns a `PipelineReport`: per
pass its time, node count before/after, `modified`, and the counts the pass reports (fusions
applied per rule); optionally it saves the graph after named passes (`dump_after`) and runs ONNX
Runtime after every pass against the previous result (`verify_each`), failing with the name of
the pass that changed the outputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from dsc.artifacts import EXTERNAL_DATA_THRESHOLD, weight_bytes
from dsc.passes._ir import reset_unique_names
from dsc.errors import BadInput, CheckFailed

if TYPE_CHECKING:
    from dsc.passes._target import TargetOps

    from dsc.hardware import HardwareProfile

logger = logging.getLogger(__name__)

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
            raise BadInput(f"unknown target_ops {self.target_ops!r} "
                           f"(expected auto, portable or opset23)")
        if self.half_fp32_gemm_mode not in ("round", "split", "compensated"):
            raise BadInput(f"unknown half_fp32_gemm_mode {self.half_fp32_gemm_mode!r} "
                           f"(expected round, split or compensated)")
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


def register_pass(name: str, factory: Callable[[PassContext], ir.passes.PassBase], doc: str,
                  kind: str = "cleanup") -> None:
    if name in _REGISTRY and _REGISTRY[name].factory is not factory:
        raise ValueError(f"pass {name!r} is already registered")
    _REGISTRY[name] = PassInfo(name, factory, doc, kind)


def _ensure_loaded() -> None:
    # The pass modules register themselves on import.
    import dsc.passes.cleanup
    import dsc.passes.fusion
    import dsc.passes.precision  # noqa: F401


def get_pass(name: str) -> PassInfo:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise BadInput(f"unknown pass {name!r} (known: {known})") from None


def list_passes() -> list[PassInfo]:
    """Registered passes, in pipeline order first, then any others by name."""
    _ensure_loaded()
    order = list(dict.fromkeys(PIPELINE))
    rest = sorted(n for n in _REGISTRY if n not in order)
    return [_REGISTRY[n] for n in order + rest if n in _REGISTRY]


def build_pipeline(ctx: PassContext, only: Sequence[str] | None = None,
                   disable: Iterable[str] = ()) -> list[tuple[str, ir.passes.PassBase]]:
    """The passes to run, as (name, pass): `only` in its given order, else `PIPELINE`."""
    disable = set(disable)
    for name in disable:
        get_pass(name)
    names = list(only) if only else list(PIPELINE)
    return [(n, get_pass(n).factory(ctx)) for n in names if n not in disable]


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
        d = {"name": self.name, "seconds": round(self.seconds, 4),
             "nodes_before": self.nodes_before, "nodes_after": self.nodes_after,
             "modified": self.modified, "counts": dict(self.counts)}
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
        return {"target": self.target, "nodes_before": self.nodes_before,
                "nodes_after": self.nodes_after, "seconds": round(self.seconds, 3),
                "counts": self.counts(), "passes": [p.to_json() for p in self.passes],
                **({"dumps": self.dumps} if self.dumps else {})}


def count_nodes(model: ir.Model) -> int:
    """Nodes in the main graph and every subgraph (If branches)."""
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def run_pipeline(model: ir.Model, ctx: PassContext | None = None, *,
                 only: Sequence[str] | None = None, disable: Iterable[str] = (),
                 passes: Sequence[tuple[str, ir.passes.PassBase]] | None = None,
                 dump_after: Iterable[str] = (), dump_dir: Path | None = None,
                 verify_each: bool = False, verify_atol: float = 1e-4,
                 progress: Callable[[str], None] | None = None) -> PipelineReport:
    """Run the pipeline in place on `model`; return the report.

    `verify_each` runs ONNX Runtime on fixed small inputs (a prefill and a decode step) before
    the first pass and after every pass that modified the graph, and raises `CheckFailed`
    naming the first pass whose outputs differ from the previous graph's by more than
    `verify_atol` (absolute, scaled by the outputs' magnitude when that exceeds 1).
    """
    ctx = ctx or PassContext()
    reset_unique_names()
    pipeline = list(passes) if passes is not None else build_pipeline(ctx, only, disable)
    dump_after = set(dump_after)
    unknown = dump_after - {n for n, _ in pipeline}
    if unknown:
        raise BadInput(f"--dump-after names passes not in this pipeline: {', '.join(sorted(unknown))}")
    if dump_after and dump_dir is None:
        raise BadInput("dump_after needs a dump directory")
    report = PipelineReport(target=ctx.target.name, nodes_before=count_nodes(model))
    verifier = None
    if verify_each:
        from dsc.passes._verify import Verifier

        verifier = Verifier(model, atol=verify_atol)
    start = time.perf_counter()
    for index, (name, p) in enumerate(pipeline):
        if progress:
            progress(f"pass {index + 1}/{len(pipeline)}: {name}")
        before = count_nodes(model)
        t0 = time.perf_counter()
        result = p(model)
        seconds = time.perf_counter() - t0
        if result.model is not model:
            raise RuntimeError(f"pass {name} returned a new model; dsc passes work in place")
        record = PassRecord(name, seconds, before, count_nodes(model), bool(result.modified),
                            dict(getattr(p, "counts", {}) or {}),
                            list(getattr(p, "notes", []) or []))
        if verifier is not None and result.modified:
            record.verify_max_abs = verifier.check(model, name)
        report.passes.append(record)
        logger.info("%s: %.3fs, %d -> %d nodes%s", name, seconds, before, record.nodes_after,
                    f" {record.counts}" if record.counts else "")
        if name in dump_after:
            path = Path(dump_dir) / f"after-{index:02d}-{name}.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            # A dump carries its own weights: references to the artifact's data file would
            # not resolve from dumps/ (and that file is rewritten when the stage ends).
            external = weight_bytes(model) >= EXTERNAL_DATA_THRESHOLD or any(
                isinstance(v.const_value, ir.ExternalTensor)
                for v in model.graph.initializers.values())
            ir.save(model, path, external_data=f"{path.name}.data" if external else None)
            report.dumps.append(str(path))
    report.seconds = time.perf_counter() - start
    report.nodes_after = count_nodes(model)
    return report


__all__ = [
    "PIPELINE", "CheckFailed", "DscPass", "PassContext", "PassInfo", "PassOptions", "PassRecord",
    "PipelineReport", "build_pipeline", "count_nodes", "get_pass", "list_passes",
    "register_pass", "run_pipeline",
]

"""Graph passes on onnx_ir (installed as `dsc.passes`; always import it by that name)."""

from dsc.passes._framework import (
    PIPELINE,
    DscPass,
    PassContext,
    PassInfo,
    PassOptions,
    PassRecord,
    PipelineReport,
    build_pipeline,
    count_nodes,
    get_pass,
    list_passes,
    register_pass,
    run_pipeline,
)
from dsc.passes._target import TargetOps, target_ops

__all__ = [
    "PIPELINE", "DscPass", "PassContext", "PassInfo", "PassOptions", "PassRecord",
    "PipelineReport", "TargetOps", "build_pipeline", "count_nodes", "get_pass", "list_passes",
    "optimize_artifact", "register_pass", "run_pipeline", "target_ops",
]


def optimize_artifact(*args, **kwargs):
    """`dsc optimize` (see dsc.passes._optimize.optimize_artifact)."""
    from dsc.passes._optimize import optimize_artifact as impl

    return impl(*args, **kwargs)

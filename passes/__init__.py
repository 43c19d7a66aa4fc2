"""Graph passes on onnx_ir (installed as `dsc.passes`; always import it by that name)."""

from dsc.passes._framework import (
    PIPELINE,
    DscPass,
    PassContext,
    PassInfo,
    PassOptions,
    PassRecord,
    PipelineReport,
    count_nodes,
    register_pass,
)
from dsc.passes._ir import reset_unique_names, set_base_dir
from dsc.passes._pipeline import build_pipeline, get_pass, list_passes, run_pipeline
from dsc.passes._target import TargetOps, target_ops

__all__ = [
    "PIPELINE",
    "DscPass",
    "PassContext",
    "PassInfo",
    "PassOptions",
    "PassRecord",
    "PipelineReport",
    "TargetOps",
    "build_pipeline",
    "count_nodes",
    "get_pass",
    "list_passes",
    "set_base_dir",
    "register_pass",
    "reset_unique_names",
    "run_pipeline",
    "target_ops",
]

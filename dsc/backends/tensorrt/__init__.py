"""TensorRT engines: one builder for standard TensorRT (on the device) and TensorRT-RTX (AOT).

Importing this package imports neither `tensorrt` nor `tensorrt_rtx` (nor onnx): they are loaded
by `load_trt`, which `build_engine` and `inspect_engine` call. Findings about the TensorRT-RTX
Python API (targets, strong typing, timing cache, what needs a GPU) are in docs/TENSORRT.md.
"""

from __future__ import annotations

from dsc.backends.tensorrt._loader import (
    RTX_TARGET_SMS,
    Flavour,
    TrtFlavourApi,
    available_backends,
    load_trt,
)
from dsc.backends.tensorrt._shapes import (
    ProfileRanges,
    ProfileShapes,
    ShapeEnvelope,
    infer_io_roles,
    io_roles_from_spec,
    profile_shapes,
    roles_for_input,
)
from dsc.backends.tensorrt.builder import (
    BuildOptions,
    EngineBuildResult,
    EngineInspection,
    LogRecord,
    WorkspaceTooSmall,
    build_engine,
    inspect_engine,
    trtexec_command,
    trtexec_command_line,
)

__all__ = [
    "RTX_TARGET_SMS",
    "BuildOptions",
    "EngineBuildResult",
    "EngineInspection",
    "Flavour",
    "LogRecord",
    "WorkspaceTooSmall",
    "ProfileRanges",
    "ProfileShapes",
    "ShapeEnvelope",
    "TrtFlavourApi",
    "available_backends",
    "build_engine",
    "infer_io_roles",
    "inspect_engine",
    "io_roles_from_spec",
    "load_trt",
    "profile_shapes",
    "roles_for_input",
    "trtexec_command",
    "trtexec_command_line",
]

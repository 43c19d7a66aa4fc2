"""The pipeline's stages, one module each: export, optimize, quantize, compile, validate.

A stage (`dsc.stages._base.Stage`) declares its inputs, hashes them in one place
(`Stage.input_hash`), runs, and returns a typed record (`StageRecord`). `dsc.build.STAGES` is
`dsc build`; each standalone command runs the same stage object (`dsc export` the export
stage, `dsc optimize` the optimize stage, ...). docs/ARCHITECTURE.md has the diagram.
"""

from dsc.stages._base import Stage, StageRecord, link, reusable, reused

__all__ = ["Stage", "StageRecord", "link", "reusable", "reused"]

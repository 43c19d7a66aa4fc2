"""The stages behind `dsc build` and `dsc compile` (orchestrated by `dsc.build`).

- `targets`: hardware profiles → build targets (envelope, builder options, where the engine is
  built, the fit check), all decided before any heavy work.
- `engines`: one target's compile: a TensorRT-RTX engine here, a standard TensorRT engine on the
  device, or a preflight compile plus the `trtexec` command for the device.
- `smoke`: the validate stage of this release: ONNX Runtime on the graph handed to the builder.
- `progress`: per-stage lines on stderr and in build.log.
"""

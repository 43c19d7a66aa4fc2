"""Quantization: calibration (run the graph, collect ranges) and the deterministic Q/DQ passes.

- `calibrate`: runs the graph in ONNX Runtime with the activation input of every quantizable
  MatMul (and every MoE router's top-k indices) exposed as outputs; collects per-channel
  absolute maxima, |x| histograms, a fixed sample of activation rows and per-expert token counts;
  caches them keyed by sha256(model) + sha256(data).
- `ranges`: activation amax from those statistics by max, percentile, entropy (KL) or MSE.
- `smoothquant`: SmoothQuantPass (migrates activation outliers into the weights, folded into the
  preceding RMSNorm gamma).
- `awq`: AWQScalePass (activation-aware per-channel scale search for INT4 weight-only).
- `qdq`: InsertQDQPass (weights stored quantized + DequantizeLinear; activations Q→DQ), placed
  on MatMul inputs only, as TensorRT fuses Q/DQ + MatMul into quantized GEMMs.
"""

from __future__ import annotations

from dsc.passes.quant.qdq import DEFAULT_EXCLUDE, InsertQDQPass, QuantScheme, find_targets

__all__ = ["DEFAULT_EXCLUDE", "InsertQDQPass", "QuantScheme", "find_targets"]

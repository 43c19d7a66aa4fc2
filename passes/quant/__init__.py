"""Quantization: calibration (run the graph, collect ranges) and the deterministic Q/DQ passes.

- `calibrate`: runs the graph in ONNX Runtime with the activation input of every quantizable
  MatMul (and every MoE router's top-k indices) exposed as outputs; collects per-channel
  absolute maxima, |x| histograms, a fixed sample of activation rows and per-expert token counts;
  caches them keyed by sha256(model) + sha256(data).
- `ranges`: activation amax from those statistics by max, percentile, entropy (KL) or MSE.
- `fold`: where a per-channel 1/s can be folded exactly (a norm's gamma or `RMSNormalization`
  scale; the output columns of up_proj, v_proj, kv_b_proj, traced op by op).
- `smoothquant`: SmoothQuantPass (migrates activation outliers into the weights where that
  lowers the quantized-GEMM error on the calibration rows; 1/s folded by `fold`).
- `awq`: AWQScalePass (activation-aware per-channel scales and per-block clip search for INT4
  weight-only).
- `qdq`: InsertQDQPass (weights stored quantized + DequantizeLinear; activations Q→DQ), placed
  on MatMul inputs only, as TensorRT fuses Q/DQ + MatMul into quantized GEMMs; routed-expert
  weights (3-D, per expert and channel, blocked DequantizeLinear) and MatMuls inside the
  If branches of the MLA/MoE passes included.
- `vocab`: VocabQDQPass (lm_head and the embedding table stored quantized, weight-only, when
  `--quantize-lm-head` / `--quantize-embedding` ask; DequantizeLinear before the Gather).
"""

from __future__ import annotations

from dsc.passes.quant.qdq import DEFAULT_EXCLUDE, InsertQDQPass, QuantScheme, find_targets

__all__ = ["DEFAULT_EXCLUDE", "InsertQDQPass", "QuantScheme", "find_targets"]

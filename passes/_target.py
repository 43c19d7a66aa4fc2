"""Which fused ONNX ops the target's TensorRT parser accepts (findings: docs/PASSES.md).

Measured here with TensorRT-RTX 1.7.1 (`tests/passes/test_target.py` re-checks it):

- `RMSNormalization` (opset 23) parses, into primitive layers (no dedicated layer); builds on
  SM80/SM89 in fp32 and fp16.
- `RotaryEmbedding` (opset 23) parses into one `IRotaryEmbeddingLayer`; builds in fp32 and fp16.
  With `interleaved=1`, once its output feeds an `If` branch (MLA absorption), the build fails
  in Myelin ("ssa.cpp:698: CHECK(false) failed"); the same graph with `interleaved=0` builds,
  so interleaved RoPE is emitted as halves (strided Slices) + interleaved=0 + re-pairing.
- `Attention` (opset 23) parses into a non-decomposable `IAttention`: fp16/bf16 builds, fp32
  fails at build time ("Attention operation was not supported by a dedicated kernel") for any
  query length above 1 (so for a prefill profile); the
  3-output form with past key/value is refused by the parser ("only supports Attention nodes
  with one output"); head sizes above 256 fail to build ("not supported by a dedicated
  kernel": 264, 288, 320, 384, 448, 512, 576 tried). TensorRT's IAttention takes one head size
  for q, k and v.

- FP32 GEMMs are refused for SM75 ("FP32 GEMM is not supported" on Turing): the DeepSeek MoE
  router, which the model computes in fp32 (weight kept fp32 by transformers >= 5.24), is
  computed with fp16 GEMMs summed in fp32 there (`half-fp32-gemm`).

Standard TensorRT: the ONNX parser gained `Attention` in 10.14 and `RotaryEmbedding` (with
`IRotaryEmbeddingLayer`) in 10.15.1, per NVIDIA's release notes; no release note for
`RMSNormalization` was found, so dsc does not emit it there (the parser would decompose it into
the same primitives anyway). Older parsers (Jetson's 10.3) get only opset <= 20 ops.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsc.hardware import HardwareProfile

_HALF = frozenset({"float16", "bfloat16"})


@dataclass(frozen=True)
class TargetOps:
    """The fused ops a fusion may emit for this target."""

    name: str
    rms_normalization: bool = False
    rotary_embedding: bool = False
    attention_dtypes: frozenset[str] = frozenset()  # element types IAttention builds for
    attention_equal_head_dims: bool = True  # TensorRT's IAttention: q, k, v share head size
    attention_max_head_dim: int | None = 256  # IAttention builds up to 256 (measured, fp16/bf16)
    rotary_interleaved: bool = True  # emit RotaryEmbedding(interleaved=1)
    fp32_gemm: bool = True  # False: TensorRT-RTX on SM75 refuses FP32 GEMMs (measured)

    @property
    def needs_opset23(self) -> bool:
        return self.rms_normalization or self.rotary_embedding or bool(self.attention_dtypes)

    def attention_for(self, dtype_name: str, head_dim: int | None = None) -> bool:
        if dtype_name not in self.attention_dtypes:
            return False
        limit = self.attention_max_head_dim
        return head_dim is None or limit is None or head_dim <= limit

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "rms_normalization": self.rms_normalization,
            "rotary_embedding": self.rotary_embedding,
            "attention_dtypes": sorted(self.attention_dtypes),
            "fp32_gemm": self.fp32_gemm,
        }


PORTABLE = TargetOps("portable (opset <= 20 ops only)")
RTX_1_7 = TargetOps(
    "TensorRT-RTX 1.7 (RMSNormalization, RotaryEmbedding; Attention fp16/bf16)",
    rms_normalization=True,
    rotary_embedding=True,
    attention_dtypes=_HALF,
    rotary_interleaved=False,
)
OPSET23 = TargetOps(
    "opset 23 (every fused op, any float dtype)",
    rms_normalization=True,
    rotary_embedding=True,
    attention_dtypes=frozenset({"float32", "float16", "bfloat16"}),
    attention_equal_head_dims=False,
    attention_max_head_dim=None,
)


def _version(text: str | None) -> tuple[int, ...]:
    parts = []
    for piece in str(text or "0").split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def target_ops(profile: HardwareProfile | None, mode: str = "auto") -> TargetOps:
    """The ops to emit: from the profile's engine builder, or forced by `mode`."""
    if mode == "portable":
        return PORTABLE
    if mode == "opset23":
        return OPSET23
    if profile is None:
        return PORTABLE
    if profile.rtx_target_sm is not None:
        # The engine for this target is compiled ahead of time by TensorRT-RTX (measured).
        if profile.rtx_target_sm < 80:
            return replace(RTX_1_7, name=RTX_1_7.name + "; no FP32 GEMM on SM75", fp32_gemm=False)
        return RTX_1_7
    version = _version(profile.tensorrt.version)
    attention = version >= (10, 14)
    rotary = version >= (10, 15, 1)
    if not (attention or rotary):
        return TargetOps(f"TensorRT {profile.tensorrt.version} (opset <= 20 ops only)")
    return TargetOps(
        f"TensorRT {profile.tensorrt.version}",
        rotary_embedding=rotary,
        attention_dtypes=_HALF if attention else frozenset(),
    )

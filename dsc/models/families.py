"""One adapter per DeepSeek model family.

An adapter knows what the exporter needs about its family: which HF architectures it covers,
what its KV cache holds per layer (expanded K/V for GQA/MHA; the compressed latent and the
rotary key for MLA, which is the whole point of MLA), and the patches that make the transformers
implementation exportable without changing its numbers:

- DeepSeek-V2 computes RoPE with complex tensors (`torch.polar`, `view_as_complex`), which the
  ONNX exporter cannot convert. The patch computes the same interleaved rotation with real
  cos/sin arithmetic. Tests compare the exported graph with the unpatched model.
- DeepSeek-V2/V3 experts default to `grouped_mm`, a custom op the exporter cannot convert;
  `batched_mm` computes the same mixture with ordinary batched matmuls, and keeps routing
  data-dependent (top-k indices select expert weights inside the graph).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """What the exporter needs to know about one model family."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    description: str
    cache_kind: str  # "gqa" (expanded K/V per kv-head) or "mla" (compressed latent + rope key)
    moe: bool = False

    @property
    def cache_entries(self) -> tuple[str, str]:
        """Names of the two cache tensors per layer, in cache order."""
        return ("compressed_kv", "k_pe") if self.cache_kind == "mla" else ("key", "value")

    def cache_dims(self, config: dict) -> tuple[tuple[int, int], tuple[int, int]]:
        """(heads, last dim) of each cache tensor; the tensors are [batch, heads, past, dim]."""
        if self.cache_kind == "mla":
            return (1, int(config["kv_lora_rank"])), (1, int(config["qk_rope_head_dim"]))
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
        return (kv_heads, head_dim), (kv_heads, head_dim)

    def prepare_model(self, model) -> None:
        """Settings on a loaded transformers model that export needs (numbers unchanged)."""
        if self.moe:
            # grouped_mm is a custom op the ONNX exporter cannot convert (see module docstring).
            model.config._experts_implementation = "batched_mm"
            for module in model.modules():
                cfg = getattr(module, "config", None)
                if cfg is not None and hasattr(cfg, "_experts_implementation"):
                    cfg._experts_implementation = "batched_mm"

    @contextlib.contextmanager
    def export_patches(self) -> Iterator[None]:
        """Context in which the transformers code for this family is exportable."""
        if self.name == "deepseek_v2":
            with _real_valued_v2_rope():
                yield
        else:
            yield


FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama",
        architectures=("LlamaForCausalLM",),
        model_types=("llama",),
        description="DeepSeek-LLM, DeepSeek-Coder v1, R1-Distill-Llama (GQA/MHA, RoPE, SwiGLU)",
        cache_kind="gqa",
    ),
    Family(
        name="qwen2",
        architectures=("Qwen2ForCausalLM",),
        model_types=("qwen2",),
        description="DeepSeek-R1-Distill-Qwen (GQA with QKV bias)",
        cache_kind="gqa",
    ),
    Family(
        name="deepseek_v2",
        architectures=("DeepseekV2ForCausalLM",),
        model_types=("deepseek_v2",),
        description="DeepSeek-V2, V2-Lite, Coder-V2 (MLA, MoE with shared experts)",
        cache_kind="mla",
        moe=True,
    ),
    Family(
        name="deepseek_v3",
        architectures=("DeepseekV3ForCausalLM",),
        model_types=("deepseek_v3",),
        description="DeepSeek-V3, R1 (MLA with q-LoRA, grouped top-k sigmoid routing)",
        cache_kind="mla",
        moe=True,
    ),
)


def supported_architectures() -> list[str]:
    return [a for f in FAMILIES for a in f.architectures]


def family_for_architecture(architecture: str) -> Family | None:
    for family in FAMILIES:
        if architecture in family.architectures:
            return family
    return None


def family_by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(name)


@contextlib.contextmanager
def _real_valued_v2_rope() -> Iterator[None]:
    """Swap DeepSeek-V2's complex RoPE for the same rotation in real arithmetic."""
    import torch
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m

    def rotary_forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(
            device=x.device, dtype=torch.float
        )
        # [..., dim/2, 2] holding (cos, sin): the real form of polar(1, freqs).
        return torch.stack((freqs.cos(), freqs.sin()), dim=-1) * self.attention_scaling

    def apply_rotary_emb(xq, xk, freqs_cis):
        cos_sin = freqs_cis.unsqueeze(1)
        cos, sin = cos_sin[..., 0], cos_sin[..., 1]

        def rotate(x):
            pairs = x.float().reshape(*x.shape[:-1], -1, 2)
            a, b = pairs[..., 0], pairs[..., 1]
            # (a + ib)(cos + i sin), interleaved back as (real, imag) pairs like view_as_real.
            out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
            return out.flatten(3).type_as(x)

        return rotate(xq), rotate(xk)

    saved = (m.DeepseekV2RotaryEmbedding.forward, m.apply_rotary_emb)
    m.DeepseekV2RotaryEmbedding.forward = torch.no_grad()(rotary_forward)
    m.apply_rotary_emb = apply_rotary_emb
    try:
        yield
    finally:
        m.DeepseekV2RotaryEmbedding.forward, m.apply_rotary_emb = saved

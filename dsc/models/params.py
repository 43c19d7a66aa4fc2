"""Parameter and KV-cache accounting from a Hugging Face `config.json` alone (no weights).

`weight_inventory(config)` lists every weight tensor family of the *exported* model as
`WeightGroup`s (shape, how many instances, how many are read per decoded token, and whether the
quantization passes touch it). Everything else is arithmetic over that list:

- `count_params(config)` sums it by component: embeddings, lm_head, attention, mlp (dense FFN),
  experts (routed), shared_experts, router, norms (+ biases).
- `kv_bytes_per_token(config, dtype_bytes)`: MLA caches the compressed latent, so
  layers x (kv_lora_rank + qk_rope_head_dim) x bytes; GQA/MHA caches expanded K and V, so
  2 x layers x kv_heads x head_dim x bytes.

Architectures: LlamaForCausalLM, Qwen2ForCausalLM (q/k/v bias), DeepseekV2ForCausalLM and
DeepseekV3ForCausalLM (MLA with optional q LoRA; MoE after `first_k_dense_replace` every
`moe_layer_freq` layers, routed + shared experts and a router gate, V3 adds the router's
`e_score_correction_bias`).

Counting conventions (tests hold these against published sizes):

- *Total* is what the exported model holds. DeepSeek-V3's multi-token-prediction module
  (`num_nextn_predict_layers`) is not part of inference export, so it is reported separately as
  `mtp` (as stored in the checkpoint: its decoder layer, `eh_proj`, three norms and its own copies
  of the embedding and output head; `mtp_unique` leaves the two copies out). 671B + 14B = 685B.
- *Active* is what one token touches: every non-expert weight except the input embedding table
  (a lookup reads one row), plus top-k routed and all shared experts. That is the convention of
  DeepSeek's "37B activated" (V3) and "2.4B activated" (V2-Lite). With tied embeddings the
  table doubles as the output head and is counted once, as active.
- `expected_active_experts(n, k, batch)` is how many distinct routed experts a decode step of
  `batch` tokens touches if routing were uniform: n x (1 - (1 - k/n)^batch); k at batch 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsc.errors import BadInput, CheckpointError, Unsupported

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
)

COMPONENTS = (
    "embeddings",
    "lm_head",
    "attention",
    "mlp",
    "experts",
    "shared_experts",
    "router",
    "norms",
)


@dataclass(frozen=True)
class WeightGroup:
    """Identical weight tensors: `count` instances of an `out_features x in_features` matrix.

    A vector (norm weight, bias) has `in_features == 1`. `active` is how many instances one
    decoded token reads at batch 1; `quantizable` is True for the linear weights that INT8/FP8/
    INT4 apply to (embeddings, lm_head, router, norms and biases stay in 16-bit).
    """

    name: str
    component: str
    out_features: int
    in_features: int
    count: int
    active: int
    quantizable: bool
    moe_routed: bool = False  # routed-expert weights: `active` grows with batch (see module doc)

    @property
    def params(self) -> int:
        return self.out_features * self.in_features * self.count

    @property
    def active_params(self) -> int:
        return self.out_features * self.in_features * self.active


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts by component (exported model), active per token, and the MTP module."""

    by_component: Mapping[str, int]
    active_by_component: Mapping[str, int]
    mtp: int = 0
    mtp_unique: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_component.values())

    @property
    def active(self) -> int:
        return sum(self.active_by_component.values())

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "active_per_token": self.active,
            "by_component": dict(self.by_component),
            "active_by_component": dict(self.active_by_component),
            "mtp_not_exported": self.mtp,
            "mtp_unique_not_exported": self.mtp_unique,
            "total_with_mtp": self.total_with_mtp,
        }


@dataclass(frozen=True)
class ModelShape:
    """The few numbers the planner needs besides the weights."""

    architecture: str
    name: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    ffn_width: int  # widest FFN a token goes through: dense intermediate or top-k+shared experts
    attn_width: int  # q, k and v features per token inside attention (MLA: after kv_b_proj)
    max_position_embeddings: int | None
    attention: str  # "mla" or "gqa"
    n_routed_experts: int = 0
    experts_per_token: int = 0
    moe_layers: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)


# --- loading ------------------------------------------------------------------------------------


def load_config(path: str | Path) -> tuple[dict[str, Any], Path]:
    """Read a HF `config.json`, given the file or a checkpoint directory holding it."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise CheckpointError(f"no config.json at {path} (pass a checkpoint directory or the file)")
    from dsc.models.config_check import check_config
    from dsc.paths import read_text_bounded

    try:
        config = json.loads(read_text_bounded(p, what="config"))
    except BadInput as e:
        raise CheckpointError(str(e)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: not a readable JSON config ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{p}: a config.json must hold a JSON object")
    architecture(config)  # an unsupported architecture is exit 4, before the sizes are checked
    check_config(config, str(p))
    return config, p


def architecture(config: Mapping[str, Any]) -> str:
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch is None:
        # Older configs name only the model type.
        arch = {
            "llama": "LlamaForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "deepseek_v2": "DeepseekV2ForCausalLM",
            "deepseek_v3": "DeepseekV3ForCausalLM",
        }.get(str(config.get("model_type")))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise Unsupported(
            f"architecture {arch or config.get('model_type')!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _int(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:
        if default is None:
            raise BadInput(f"config.json: missing {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadInput(f"config.json: {key!r} must be a non-negative integer, got {value!r}")
    return value


def _is_mla(arch: str) -> bool:
    return arch in ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")


def _moe_layer_flags(config: Mapping[str, Any], layers: int) -> list[bool]:
    """Which decoder layers are MoE (same rule as the HF DeepSeek-V2/V3 code)."""
    n_routed = config.get("n_routed_experts")
    if not n_routed:
        return [False] * layers
    first_dense = _int(config, "first_k_dense_replace", 0)
    freq = _int(config, "moe_layer_freq", 1) or 1
    return [i >= first_dense and i % freq == 0 for i in range(layers)]


# --- inventory ----------------------------------------------------------------------------------


def _attention_groups(config: Mapping[str, Any], arch: str, layers: int) -> list[WeightGroup]:
    h = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    bias = bool(config.get("attention_bias", False))
    g: list[WeightGroup] = []

    def lin(name: str, out_f: int, in_f: int, *, with_bias: bool = False) -> None:
        g.append(WeightGroup(f"attn.{name}", "attention", out_f, in_f, layers, layers, True))
        if with_bias:
            g.append(WeightGroup(f"attn.{name}.bias", "norms", out_f, 1, layers, layers, False))

    def norm(name: str, width: int) -> None:
        g.append(WeightGroup(f"attn.{name}", "norms", width, 1, layers, layers, False))

    if _is_mla(arch):
        q_lora = config.get("q_lora_rank")
        kv_lora = _int(config, "kv_lora_rank")
        nope = _int(config, "qk_nope_head_dim")
        rope = _int(config, "qk_rope_head_dim")
        v_dim = _int(config, "v_head_dim")
        if q_lora:  # V3 and V2 full; V2-Lite has q_lora_rank null and a plain q_proj
            lin("q_a_proj", q_lora, h, with_bias=bias)
            norm("q_a_layernorm", q_lora)
            lin("q_b_proj", heads * (nope + rope), q_lora)
        else:
            lin("q_proj", heads * (nope + rope), h)
        lin("kv_a_proj_with_mqa", kv_lora + rope, h, with_bias=bias)
        norm("kv_a_layernorm", kv_lora)
        lin("kv_b_proj", heads * (nope + v_dim), kv_lora)
        lin("o_proj", h, heads * v_dim, with_bias=bias)
        return g

    kv_heads = _int(config, "num_key_value_heads", heads) or heads
    head_dim = config.get("head_dim") or h // heads
    qkv_bias = arch == "Qwen2ForCausalLM" or bias  # Qwen2: q/k/v carry a bias, o does not
    lin("q_proj", heads * head_dim, h, with_bias=qkv_bias)
    lin("k_proj", kv_heads * head_dim, h, with_bias=qkv_bias)
    lin("v_proj", kv_heads * head_dim, h, with_bias=qkv_bias)
    lin("o_proj", h, heads * head_dim, with_bias=bias and arch == "LlamaForCausalLM")
    return g


def _ffn(
    name: str,
    component: str,
    h: int,
    inter: int,
    count: int,
    active: int,
    *,
    routed: bool = False,
    bias: bool = False,
) -> list[WeightGroup]:
    """SwiGLU MLP: gate and up (inter x h) and down (h x inter)."""
    g = [
        WeightGroup(f"{name}.gate_proj", component, inter, h, count, active, True, routed),
        WeightGroup(f"{name}.up_proj", component, inter, h, count, active, True, routed),
        WeightGroup(f"{name}.down_proj", component, h, inter, count, active, True, routed),
    ]
    if bias:
        g += [
            WeightGroup(f"{name}.gate_proj.bias", "norms", inter, 1, count, active, False),
            WeightGroup(f"{name}.up_proj.bias", "norms", inter, 1, count, active, False),
            WeightGroup(f"{name}.down_proj.bias", "norms", h, 1, count, active, False),
        ]
    return g


def _decoder_groups(
    config: Mapping[str, Any], arch: str, layers: int, moe_flags: list[bool]
) -> list[WeightGroup]:
    """Attention, FFN/MoE and norms of `layers` decoder layers whose MoE flags are given."""
    h = _int(config, "hidden_size")
    g = _attention_groups(config, arch, layers)
    g.append(WeightGroup("input_layernorm", "norms", h, 1, layers, layers, False))
    g.append(WeightGroup("post_attention_layernorm", "norms", h, 1, layers, layers, False))
    n_moe = sum(moe_flags)
    n_dense = layers - n_moe
    if n_dense:
        inter = _int(config, "intermediate_size")
        mlp_bias = bool(config.get("mlp_bias", False)) and arch == "LlamaForCausalLM"
        g += _ffn("mlp", "mlp", h, inter, n_dense, n_dense, bias=mlp_bias)
    if n_moe:
        n_routed = _int(config, "n_routed_experts")
        top_k = _int(config, "num_experts_per_tok")
        n_shared = _int(config, "n_shared_experts", 0)
        moe_inter = _int(config, "moe_intermediate_size")
        g += _ffn("experts", "experts", h, moe_inter, n_moe * n_routed, n_moe * top_k, routed=True)
        if n_shared:
            # HF builds the shared experts as one MLP of width moe_intermediate_size x n_shared.
            g += _ffn("shared_experts", "shared_experts", h, moe_inter * n_shared, n_moe, n_moe)
        g.append(WeightGroup("router.gate", "router", n_routed, h, n_moe, n_moe, False))
        if config.get("topk_method") == "noaux_tc":
            g.append(
                WeightGroup(
                    "router.e_score_correction_bias", "router", n_routed, 1, n_moe, n_moe, False
                )
            )
    return g


def weight_inventory(config: Mapping[str, Any]) -> list[WeightGroup]:
    """Every weight of the exported model (the MTP module excluded), grouped."""
    arch = architecture(config)
    h = _int(config, "hidden_size")
    vocab = _int(config, "vocab_size")
    layers = _int(config, "num_hidden_layers")
    tied = bool(config.get("tie_word_embeddings", False))
    g = [
        # A tied table is the output head too, so it is read in full every token.
        WeightGroup("embed_tokens", "embeddings", vocab, h, 1, 1 if tied else 0, False),
    ]
    g += _decoder_groups(config, arch, layers, _moe_layer_flags(config, layers))
    g.append(WeightGroup("norm", "norms", h, 1, 1, 1, False))
    if not tied:
        g.append(WeightGroup("lm_head", "lm_head", vocab, h, 1, 1, False))
    return g


def _mtp_params(config: Mapping[str, Any]) -> tuple[int, int]:
    """(as stored, unique) parameters of DeepSeek-V3's MTP modules; (0, 0) when absent."""
    n = config.get("num_nextn_predict_layers") or 0
    if not n:
        return 0, 0
    arch = architecture(config)
    h = _int(config, "hidden_size")
    vocab = _int(config, "vocab_size")
    # Each module is one full decoder layer at the MoE position (it sits after the last layer).
    layer = sum(
        x.params for x in _decoder_groups(config, arch, 1, [bool(config.get("n_routed_experts"))])
    )
    unique = layer + 2 * h * h + 3 * h  # + eh_proj, enorm, hnorm, shared_head.norm
    copies = 2 * vocab * h  # the checkpoint stores its own embed_tokens and shared_head.head
    return n * (unique + copies), n * unique


def count_params(config: Mapping[str, Any]) -> ParamCounts:
    """Parameters by component, active per token, and the (not exported) MTP module."""
    inv = weight_inventory(config)
    total = {c: 0 for c in COMPONENTS}
    active = {c: 0 for c in COMPONENTS}
    for w in inv:
        total[w.component] += w.params
        active[w.component] += w.active_params
    mtp, mtp_unique = _mtp_params(config)
    return ParamCounts(total, active, mtp, mtp_unique)


def expected_active_experts(n_routed: int, top_k: int, batch: int) -> float:
    """Distinct experts a step of `batch` tokens touches under uniform routing (see module doc)."""
    if n_routed <= 0 or top_k <= 0:
        return 0.0
    if batch <= 1:
        return float(top_k)
    return n_routed * (1.0 - (1.0 - top_k / n_routed) ** batch)


def kv_bytes_per_token(config: Mapping[str, Any], dtype_bytes: float) -> float:
    """KV-cache bytes one token adds across all layers (MLA: the compressed latent)."""
    arch = architecture(config)
    layers = _int(config, "num_hidden_layers")
    if _is_mla(arch):
        return (
            layers * (_int(config, "kv_lora_rank") + _int(config, "qk_rope_head_dim")) * dtype_bytes
        )
    heads = _int(config, "num_attention_heads")
    kv_heads = _int(config, "num_key_value_heads", heads) or heads
    head_dim = config.get("head_dim") or _int(config, "hidden_size") // heads
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def model_shape(config: Mapping[str, Any], name: str = "") -> ModelShape:
    """Widths and limits the planner needs (activation sizes, context limit, MoE routing)."""
    arch = architecture(config)
    layers = _int(config, "num_hidden_layers")
    flags = _moe_layer_flags(config, layers)
    n_moe = sum(flags)
    if n_moe:
        moe_inter = _int(config, "moe_intermediate_size")
        top_k = _int(config, "num_experts_per_tok")
        shared = _int(config, "n_shared_experts", 0)
        width = max(
            _int(config, "intermediate_size") if n_moe < layers else 0, moe_inter * (top_k + shared)
        )
    else:
        top_k = 0
        width = _int(config, "intermediate_size")
    heads = _int(config, "num_attention_heads")
    if _is_mla(arch):
        nope, rope = _int(config, "qk_nope_head_dim"), _int(config, "qk_rope_head_dim")
        attn = heads * (nope + rope) * 2 + heads * _int(config, "v_head_dim")
    else:
        kv_heads = _int(config, "num_key_value_heads", heads) or heads
        head_dim = config.get("head_dim") or _int(config, "hidden_size") // heads
        attn = (heads + 2 * kv_heads) * head_dim
    max_pos = config.get("max_position_embeddings")
    return ModelShape(
        architecture=arch,
        name=name,
        hidden_size=_int(config, "hidden_size"),
        num_layers=layers,
        vocab_size=_int(config, "vocab_size"),
        ffn_width=width,
        attn_width=attn,
        max_position_embeddings=max_pos if isinstance(max_pos, int) else None,
        attention="mla" if _is_mla(arch) else "gqa",
        n_routed_experts=int(config.get("n_routed_experts") or 0) if n_moe else 0,
        experts_per_token=top_k,
        moe_layers=n_moe,
    )


def groups_per_row(in_features: int, group_size: int) -> int:
    """Quantization groups along the input dimension of one output row."""
    return math.ceil(in_features / group_size)

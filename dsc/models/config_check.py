"""Types and ranges of a Hugging Face `config.json`, checked before anything is built from it.

transformers builds whatever a config says: `num_hidden_layers: 1000000000` allocates layers
until memory runs out, `hidden_size: "abc"` or `num_attention_heads: 0` fail deep inside torch,
and `vocab_size: 0` plans a model with no vocabulary. `check_config` refuses such a config in one
line naming the key (`CheckpointError`, exit 3). Used by `dsc.models.checkpoint` (export, build)
and `dsc.models.params.load_config` (plan).

The upper bounds are far above every published DeepSeek-family model (61 layers, hidden 7168,
vocab 129280, 256 experts, 163840 positions) and far below what would exhaust memory while the
model is merely described.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dsc.errors import CheckpointError

# key -> (smallest, largest) allowed integer value
_REQUIRED = {
    "hidden_size": (1, 2**18),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 2**12),
    "vocab_size": (1, 2**24),
}
_OPTIONAL = {
    "intermediate_size": (1, 2**20),
    "num_key_value_heads": (1, 2**12),
    "head_dim": (1, 2**14),
    "max_position_embeddings": (1, 2**24),
    "moe_intermediate_size": (1, 2**20),
    "n_routed_experts": (0, 2**14),
    "num_experts_per_tok": (1, 2**14),
    "n_shared_experts": (0, 2**10),
    "first_k_dense_replace": (0, 1024),
    "moe_layer_freq": (1, 1024),
    "n_group": (1, 2**14),
    "topk_group": (1, 2**14),
    "kv_lora_rank": (1, 2**16),
    "q_lora_rank": (1, 2**16),
    "qk_nope_head_dim": (1, 2**14),
    "qk_rope_head_dim": (1, 2**14),
    "v_head_dim": (1, 2**14),
    "num_nextn_predict_layers": (0, 64),
    "bos_token_id": (0, 2**24),
    "eos_token_id": (0, 2**24),
    "pad_token_id": (0, 2**24),
}
# key -> must be > 0 (else >= 0); finite floats
_FLOATS = {
    "rms_norm_eps": True,
    "rope_theta": True,
    "routed_scaling_factor": True,
    "initializer_range": False,
    "attention_dropout": False,
}
_MLA = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_MLA_ARCHS = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(config: Mapping[str, Any], key: str, lo: int, hi: int, where: str) -> None:
    value = config[key]
    if key.endswith("_token_id") and isinstance(value, list):  # eos_token_id may be a list
        for v in value:
            if not _is_int(v) or not lo <= v <= hi:
                raise CheckpointError(
                    f"{where}: {key!r} must hold integers in {lo}..{hi}, got {value!r}"
                )
        return
    if not _is_int(value):
        raise CheckpointError(f"{where}: {key!r} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise CheckpointError(f"{where}: {key!r} must be in {lo}..{hi}, got {value}")


def check_config(config: Mapping[str, Any], where: str = "config.json") -> None:
    """Refuse a config whose sizes are missing, of the wrong type, out of range or inconsistent."""
    for key, (lo, hi) in _REQUIRED.items():
        if config.get(key) is None:
            raise CheckpointError(f"{where}: missing {key!r}")
        _check_int(config, key, lo, hi, where)
    for key, (lo, hi) in _OPTIONAL.items():
        if config.get(key) is not None:
            _check_int(config, key, lo, hi, where)
    for key, positive in _FLOATS.items():
        value = config.get(key)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
            or (positive and value == 0)
        ):
            raise CheckpointError(
                f"{where}: {key!r} must be a finite "
                f"{'positive' if positive else 'non-negative'} number, got "
                f"{value!r}"
            )
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise CheckpointError(
            f"{where}: num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {kv_heads}"
        )
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch in _MLA_ARCHS:
        for key in _MLA:
            if config.get(key) is None:
                raise CheckpointError(f"{where}: missing {key!r} (an {arch} config needs it)")
    elif config["hidden_size"] % heads:  # transformers refuses it even with a head_dim
        raise CheckpointError(
            f"{where}: hidden_size {config['hidden_size']} is not a multiple of "
            f"num_attention_heads {heads}"
        )
    if config.get("n_routed_experts"):
        for key in ("num_experts_per_tok", "moe_intermediate_size"):
            if config.get(key) is None:
                raise CheckpointError(f"{where}: missing {key!r} (the config has routed experts)")
        if config["num_experts_per_tok"] > config["n_routed_experts"]:
            raise CheckpointError(
                f"{where}: num_experts_per_tok {config['num_experts_per_tok']} "
                f"exceeds n_routed_experts {config['n_routed_experts']}"
            )
    elif config.get("intermediate_size") is None:
        raise CheckpointError(f"{where}: missing 'intermediate_size'")

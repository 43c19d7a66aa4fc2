"""Small checkpoints made in code, in the real Hugging Face layout, for tests and benchmarks.

One per family, with random weights in the real architecture: `llama` (DeepSeek-LLM/Coder and
R1-Distill-Llama, with Llama-3 RoPE scaling), `qwen2` (R1-Distill-Qwen, QKV bias), `deepseek_v2`
(MLA without q-LoRA, MoE with a shared expert and group-limited greedy softmax routing) and
`deepseek_v3` (MLA with q-LoRA, YaRN RoPE, grouped top-k sigmoid routing with the score-correction
bias). Each is saved with `save_pretrained` (config.json, model.safetensors, generation_config.json)
and a byte-level BPE tokenizer trained with `tokenizers` on the shipped public-domain text.

Weights are drawn wider than transformers' default (std 0.02) so logits have real margins:
greedy decoding of a near-uniform random model flips on rounding noise, which would make
exact-token comparisons test the noise instead of the export. Router weights get the same
treatment so routing decisions are not ties.

`random_checkpoint(config, out)` builds a random-weight checkpoint with any real config
(e.g. the dimensions of DeepSeek-R1-Distill-Qwen-1.5B) for memory and time measurements.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

FAMILIES = ("llama", "qwen2", "deepseek_v2", "deepseek_v3")
_TEXT = Path(__file__).resolve().parent.parent / "examples" / "data" / "kjv.txt.gz"
_SPECIAL = {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": "<|pad|>"}


def train_tokenizer(out_dir: Path, *, vocab_size: int = 512, chars: int = 400_000) -> Path:
    """Train a byte-level BPE on the start of the shipped text; save it HF-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = gzip.decompress(_TEXT.read_bytes()).decode("utf-8")[:chars]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[_SPECIAL["bos"], _SPECIAL["eos"], _SPECIAL["pad"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    bos_id = tok.token_to_id(_SPECIAL["bos"])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{_SPECIAL['bos']} $A", special_tokens=[(_SPECIAL["bos"], bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=_SPECIAL["bos"],
        eos_token=_SPECIAL["eos"],
        pad_token=_SPECIAL["pad"],
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def fixture_config(family: str, vocab_size: int, *, bos: int = 0, eos: int = 1, pad: int = 2):
    """A small transformers config of the family's real architecture."""
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=64, num_attention_heads=4, max_position_embeddings=512,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False,
        initializer_range=0.08, rms_norm_eps=1e-6,
    )
    if family == "llama":
        return transformers.LlamaConfig(
            **common, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64},
        )
    if family == "qwen2":
        return transformers.Qwen2Config(
            **common, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    mla = dict(
        num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=16, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=2,
        n_group=4, topk_group=2,
    )
    if family == "deepseek_v2":
        return transformers.DeepseekV2Config(
            **common, **mla, q_lora_rank=None, topk_method="group_limited_greedy",
            routed_scaling_factor=1.0, norm_topk_prob=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    if family == "deepseek_v3":
        return transformers.DeepseekV3Config(
            **common, **mla, q_lora_rank=24, routed_scaling_factor=2.5, norm_topk_prob=True,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 128, "beta_fast": 32.0,
                             "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        )
    raise ValueError(f"unknown fixture family {family!r}; choose from {FAMILIES}")


def make_fixture(family: str, out_dir: str | Path, *, seed: int = 0,
                 tokenizer_dir: Path | None = None) -> Path:
    """Write a random-weight checkpoint of `family` to `out_dir`; return the directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer_dir = train_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer_dir != out_dir:
        tok.save_pretrained(out_dir)
    config = fixture_config(family, len(tok), bos=tok.bos_token_id, eos=tok.eos_token_id,
                            pad=tok.pad_token_id)
    config.architectures = [type(AutoModelForCausalLM.from_config(config)).__name__]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            # Decisive routing: the router (`gate`) is zero- or narrow-initialised by default.
            if name.endswith("mlp.gate") and hasattr(module, "weight"):
                module.weight.normal_(0.0, 0.5)
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.uniform_(-0.05, 0.05)
    model.generation_config.do_sample = False
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def random_checkpoint(config_path: str | Path, out_dir: str | Path, *, dtype: str = "fp16",
                      tokenizer_dir: Path | None = None, seed: int = 0) -> Path:
    """A random-weight checkpoint with a real model's config.json (for measurements)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(Path(config_path).parent if Path(config_path).is_file()
                                        else config_path)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    torch.manual_seed(seed)
    # Build straight in the target dtype so a 1.5B model never exists in fp32 (6 GB).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    train_tokenizer(out_dir if tokenizer_dir is None else tokenizer_dir)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir

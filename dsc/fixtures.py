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
(e.g. the dimensions of DeepSeek-R1-Distill-Qwen-1.5B) for memory and time measurements,
streamed: shapes from a meta-device model, each tensor drawn and written shard by shard (peak
about one shard: 3.16 GB for the 3.55 GB 1.5B bf16 checkpoint, 94 s, 2 GiB shards).

Two rewrites turn any of these into the layouts checkpoints are published in:
`write_sharded(src, dst)` stores the tensors in bf16 across shards with a
`model.safetensors.index.json`, and `to_fp8_published(src, dst)` writes DeepSeek-V3/R1's FP8
layout (linear weights in float8_e4m3fn with one float32 `weight_scale_inv` per 128×128 block,
a `quantization_config`, and tensors of the multi-token-prediction layer).
`make_fp8_fixture(out)` is the tiny V3 in that layout; its kv_lora_rank + qk_rope_head_dim is 576,
as in V3, so `kv_a_proj_with_mqa` has a partial last row block like the real one.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import re
import shutil
from pathlib import Path

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


def fixture_config(
    family: str,
    vocab_size: int,
    *,
    bos: int = 0,
    eos: int = 1,
    pad: int = 2,
    overrides: dict | None = None,
):
    """A small transformers config of the family's real architecture.

    `overrides` replace fields before the config is constructed, so derived fields follow
    (V3's head_dim is its qk_rope_head_dim).
    """
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
        initializer_range=0.08,
        rms_norm_eps=1e-6,
    )
    mla = dict(
        num_key_value_heads=4,
        kv_lora_rank=32,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=16,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        n_shared_experts=1,
        n_routed_experts=16,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
    )
    if family == "llama":
        cls, kwargs = (
            transformers.LlamaConfig,
            dict(
                **common,
                intermediate_size=128,
                num_hidden_layers=2,
                num_key_value_heads=2,
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            ),
        )
    elif family == "qwen2":
        cls, kwargs = (
            transformers.Qwen2Config,
            dict(
                **common,
                intermediate_size=128,
                num_hidden_layers=2,
                num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
        )
    elif family == "deepseek_v2":
        cls, kwargs = (
            transformers.DeepseekV2Config,
            dict(
                **common,
                **mla,
                q_lora_rank=None,
                topk_method="group_limited_greedy",
                routed_scaling_factor=1.0,
                norm_topk_prob=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
        )
    elif family == "deepseek_v3":
        cls, kwargs = (
            transformers.DeepseekV3Config,
            dict(
                **common,
                **mla,
                q_lora_rank=24,
                routed_scaling_factor=2.5,
                norm_topk_prob=True,
                rope_parameters={
                    "rope_type": "yarn",
                    "rope_theta": 10000.0,
                    "factor": 4.0,
                    "original_max_position_embeddings": 128,
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                    "mscale": 1.0,
                    "mscale_all_dim": 1.0,
                },
            ),
        )
    else:
        raise ValueError(f"unknown fixture family {family!r}; choose from {FAMILIES}")
    kwargs.update(overrides or {})
    return cls(**kwargs)


def make_fixture(
    family: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    tokenizer_dir: Path | None = None,
    overrides: dict | None = None,
) -> Path:
    """Write a random-weight checkpoint of `family` to `out_dir`; return the directory.

    `overrides` sets config fields on top of the family's tiny config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer_dir = train_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer_dir != out_dir:
        tok.save_pretrained(out_dir)
    config = fixture_config(
        family,
        len(tok),
        bos=tok.bos_token_id,
        eos=tok.eos_token_id,
        pad=tok.pad_token_id,
        overrides=overrides,
    )
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


# Largest safetensors shard `random_checkpoint` writes (DeepSeek publishes 4-5 GB shards; a
# smaller one keeps the writer's peak memory, about one shard, low).
RANDOM_SHARD_BYTES = 2 * 2**30


def _random_init(name: str, shape: tuple[int, ...], dtype, std: float, seed: int):
    """One tensor drawn as transformers' `_init_weights` would: norm weights 1, biases and the
    router's score-correction bias 0, everything else N(0, std). Seeded per (seed, name), so
    any tensor is reproducible alone; drawn in fp32 blocks of rows and cast (no fp32 copy of a
    large tensor)."""
    import hashlib

    import torch

    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias" or leaf.endswith("_bias"):
        return torch.zeros(shape, dtype=dtype)
    if "norm" in name and leaf == "weight":
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(
        int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    )
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(shape[0], -1) if len(shape) > 1 else out.view(1, -1)
    rows = max(1, (64 * 2**20) // max(1, flat.shape[1] * 4))  # 64 MiB of fp32 at a time
    for r in range(0, flat.shape[0], rows):
        block = torch.empty((min(rows, flat.shape[0] - r), flat.shape[1]), dtype=torch.float32)
        flat[r : r + block.shape[0]] = block.normal_(0.0, std, generator=gen).to(dtype)
    return out


def random_checkpoint(
    config_path: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "fp16",
    tokenizer_dir: Path | None = None,
    seed: int = 0,
    shard_bytes: int = RANDOM_SHARD_BYTES,
) -> Path:
    """A random-weight checkpoint with a real model's config.json (for measurements), streamed.

    The model is built on PyTorch's meta device (shapes only, no memory); each tensor of its
    state dict as `save_pretrained` writes it (tied weights once, persistent buffers included,
    fused experts split per expert) is then drawn by `_random_init` and written to safetensors
    shards of at most `shard_bytes` (default 2 GiB) in state-dict order, i.e. layer by layer, with
    `model.safetensors.index.json` ("model.safetensors" alone when one shard holds all). Peak
    memory is about one shard whatever the model's size, so a 31 GB V2-Lite checkpoint can be
    made on a 24 GB host. `dtype`: fp16, bf16 or fp32 storage. Raises ValueError for another
    dtype; transformers' errors for a config it cannot build.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    torch_dtype = dtypes[dtype]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(
        Path(config_path).parent if Path(config_path).is_file() else config_path
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    seen: set[int] = set()
    state = {}  # tied tensors once
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            state[name] = t.detach()
    # The names and shapes `save_pretrained` writes: transformers 5 keeps some weights fused in
    # memory (MoE experts as one [E, 2I, D] tensor) and splits them back on save, in layer
    # order; its conversion is shape-only, so it runs on meta tensors.
    with contextlib.suppress(ImportError):
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    specs = [(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    del state, model
    std = float(getattr(config, "initializer_range", 0.02))
    shards: list[list[tuple]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * torch.empty((), dtype=spec[2]).element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    weight_map, total = {}, 0
    for k, group in enumerate(shards):
        file = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors = {name: _random_init(name, shape, dt, std, seed) for name, shape, dt in group}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, out_dir / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(out_dir)
    with contextlib.suppress(Exception):  # a config without generation defaults writes none
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    train_tokenizer(out_dir if tokenizer_dir is None else tokenizer_dir)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


# --- published layouts: sharded bf16, DeepSeek's FP8 blocks ------------------------------------

FP8_BLOCK = (128, 128)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# V3's latent width: kv_a_proj_with_mqa then has 512 + 64 = 576 rows, 4.5 blocks of 128.
FP8_V3_OVERRIDES = {"kv_lora_rank": 512, "qk_rope_head_dim": 64}
# The linear weights DeepSeek stores in FP8: attention projections, dense MLP, routed and shared
# experts (and the MTP layer's eh_proj). Embeddings, norms, lm_head and the router stay bf16.
_FP8_LINEAR = re.compile(
    r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj)|eh_proj)\.weight$"
)
_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def read_tensors(src: str | Path) -> dict:
    """Every tensor of a safetensors checkpoint (single file or shards), in memory."""
    from safetensors.torch import load_file

    src = Path(src)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def write_shards(tensors: dict, dst: str | Path, *, shards: int = 2) -> Path:
    """Save `tensors` as `shards` safetensors files plus `model.safetensors.index.json`."""
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    total = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
    groups: list[list[str]] = [[] for _ in range(shards)]
    done = 0
    for n in names:  # contiguous groups of about equal bytes, the way save_pretrained splits
        groups[min(shards - 1, done * shards // max(total, 1))].append(n)
        done += tensors[n].numel() * tensors[n].element_size()
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(
            {n: tensors[n].contiguous() for n in group}, dst / file, metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(group, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return dst


def _copy_side_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in _SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def write_sharded(
    src: str | Path, dst: str | Path, *, shards: int = 2, dtype: str = "bf16"
) -> Path:
    """Copy checkpoint `src` to `dst` with its float tensors in `dtype`, over `shards` files."""
    import torch

    src, dst = Path(src), Path(dst)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    tensors = {
        n: t.to(torch_dtype) if t.is_floating_point() else t for n, t in read_tensors(src).items()
    }
    _copy_side_files(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return write_shards(tensors, dst, shards=shards)


def quantize_fp8_blocks(weight, block: tuple[int, int] = FP8_BLOCK):
    """(float8_e4m3fn weight, float32 scale_inv per block) with scale = block amax / 448.

    Edge blocks are partial: the scale grid is ceil(rows / 128) × ceil(cols / 128).
    """
    import torch

    w = weight.float()
    rows, cols = w.shape
    br, bc = block
    grid = (-(-rows // br), -(-cols // bc))
    scale = torch.ones(grid, dtype=torch.float32)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            tile = w[i * br : (i + 1) * br, j * bc : (j + 1) * bc]
            amax = float(tile.abs().max())
            s = amax / FP8_MAX if amax > 0 else 1.0
            scale[i, j] = s
            q[i * br : (i + 1) * br, j * bc : (j + 1) * bc] = (
                (tile / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            )
    return q, scale


def _mtp_tensors(config: dict, seed: int) -> dict:
    """Representative tensors of DeepSeek-V3's multi-token-prediction layer (never loaded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h, v = int(config["hidden_size"]), int(config["vocab_size"])
    p = f"model.layers.{int(config['num_hidden_layers'])}."
    latent = int(config["kv_lora_rank"]) + int(config["qk_rope_head_dim"])
    inter = int(config["moe_intermediate_size"])

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    return {
        p + "embed_tokens.weight": rnd(v, h),
        p + "enorm.weight": torch.ones(h),
        p + "hnorm.weight": torch.ones(h),
        p + "eh_proj.weight": rnd(h, 2 * h),
        p + "input_layernorm.weight": torch.ones(h),
        p + "self_attn.kv_a_proj_with_mqa.weight": rnd(latent, h),
        p + "mlp.experts.0.down_proj.weight": rnd(h, inter),
        p + "shared_head.norm.weight": torch.ones(h),
        p + "shared_head.head.weight": rnd(v, h),
    }


def to_fp8_published(
    src: str | Path,
    dst: str | Path,
    *,
    shards: int = 2,
    block: tuple[int, int] = FP8_BLOCK,
    mtp: bool = True,
    seed: int = 0,
) -> Path:
    """Rewrite checkpoint `src` into DeepSeek-V3/R1's published FP8 layout at `dst`.

    Each FP8 linear weight becomes float8_e4m3fn `<name>` plus float32 `<name>_scale_inv`
    (one per block, amax / 448); other float tensors are bf16, except the router's
    e_score_correction_bias (float32, as published). `config.json` gains the
    `quantization_config`, and with `mtp` the MTP layer's tensors (`model.layers.<L>.*`, L =
    num_hidden_layers) are added and listed in the index.
    """
    import torch

    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    tensors = read_tensors(src)
    if mtp:
        config["num_nextn_predict_layers"] = 1
        tensors.update(_mtp_tensors(config, seed))
    out = {}
    for name, t in tensors.items():
        if t.ndim == 2 and _FP8_LINEAR.search(name):
            out[name], out[name + "_scale_inv"] = quantize_fp8_blocks(t, block)
        elif name.endswith("e_score_correction_bias"):
            out[name] = t.float()
        elif t.is_floating_point():
            out[name] = t.to(torch.bfloat16)
        else:
            out[name] = t
    _copy_side_files(src, dst)
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return write_shards(out, dst, shards=shards)


def make_fp8_fixture(
    out_dir: str | Path, *, seed: int = 0, tokenizer_dir: Path | None = None
) -> Path:
    """The tiny DeepSeek-V3 (with V3's 576-wide latent) in the published FP8 layout."""
    out_dir = Path(out_dir)
    plain = out_dir.with_name(out_dir.name + ".plain")
    make_fixture(
        "deepseek_v3", plain, seed=seed, tokenizer_dir=tokenizer_dir, overrides=FP8_V3_OVERRIDES
    )
    try:
        return to_fp8_published(plain, out_dir, seed=seed)
    finally:
        shutil.rmtree(plain, ignore_errors=True)

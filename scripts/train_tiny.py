#!/usr/bin/env python
"""Train the tiny example models in ``examples/models/`` on the shipped KJV text, on the CPU.

Two real Hugging Face checkpoints come out, sharing one byte-level BPE tokenizer:

* ``tiny-deepseek-v3``: ``DeepseekV3ForCausalLM`` with MLA + q-LoRA and an MoE with grouped
  top-k sigmoid routing (8 routed experts in 2 groups, top-2 from the best group, one shared
  expert, first layer dense). Experts are kept balanced the DeepSeek-V3 way, without an aux
  loss: after every optimizer step each MoE layer's ``e_score_correction_bias`` moves by
  ``--bias-update-speed`` towards the under-loaded experts (``bias += u * sign(mean - load)``).
* ``tiny-qwen2``: ``Qwen2ForCausalLM`` (GQA, QKV bias), the DeepSeek-R1-Distill-Qwen family.

The text is split by ``dsc.corpus`` (every 20th chapter held out); the tokenizer and the models
see only the train split. Each model's ``training.json`` records held-out perplexity next to
the unigram baseline (train-split unigram with add-one smoothing, on the same held-out tokens),
per-expert load on held-out text, a greedy sample from "And God said", and how it was made.

Training runs a fixed number of steps from a fixed seed, so a re-run on the same torch version
and thread count gives bit-identical weights (the thread count changes float summation order,
so pass the ``--threads`` recorded in training.json to reproduce a checkpoint exactly);
``--minutes`` is only a safety cap per model (hitting it is recorded as ``stopped_early``).

    python scripts/train_tiny.py --model all --threads 1   # the committed models: ~11 min
    python scripts/train_tiny.py --model v3 --out /tmp/models

On a shared 2-core machine, ``--threads 2`` is much slower than 1 whenever another process
holds a core (OpenMP threads wait on each other): 2 threads measured 10 s/step against 0.5.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsc.corpus import DEFAULT_CORPUS, load_corpus, split_corpus  # noqa: E402

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
PROMPT = "And God said"
NAMES = {"v3": "tiny-deepseek-v3", "qwen2": "tiny-qwen2"}


@dataclass(frozen=True)
class TrainPlan:
    steps: int
    batch_size: int = 16
    seq_len: int = 128  # bos + 127 text tokens
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0


# Steps chosen so each model trains in about 4-6 minutes on one core (~0.35-0.5 s/step).
PLANS = {"v3": TrainPlan(steps=750), "qwen2": TrainPlan(steps=800)}


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(train: str, vocab_size: int):
    """Byte-level BPE on the train split; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = train.splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    # Like Llama 3: encoding a text prepends <|begin_of_text|>; nothing is appended.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=512
    )


def encode_lines(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``text`` (no special tokens) and the index where each line starts.

    Lines are encoded separately; with the byte-level pre-tokenizer this is the same
    segmentation as encoding the whole text (a newline is always its own pre-token).
    """
    lines = text.splitlines(keepends=True)
    encs = tokenizer.backend_tokenizer.encode_batch(lines, add_special_tokens=False)
    lens = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
    ids = np.fromiter((i for e in encs for i in e.ids), dtype=np.int64, count=int(lens.sum()))
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    return ids, starts


# ----------------------------------------------------------------------------- models


def make_config(kind: str, tokenizer) -> Any:
    from transformers import DeepseekV3Config, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    if kind == "v3":
        return DeepseekV3Config(
            **common,
            num_key_value_heads=4,
            intermediate_size=384,  # the dense first layer
            moe_intermediate_size=96,
            q_lora_rank=64,
            kv_lora_rank=32,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            num_nextn_predict_layers=0,  # no multi-token-prediction weights are trained
        )
    return Qwen2Config(**common, num_key_value_heads=2, intermediate_size=384)


def config_summary(config) -> dict[str, Any]:
    keys = [
        "model_type",
        "architectures",
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "moe_intermediate_size",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "n_routed_experts",
        "num_experts_per_tok",
        "n_group",
        "topk_group",
        "n_shared_experts",
        "first_k_dense_replace",
        "norm_topk_prob",
        "routed_scaling_factor",
        "max_position_embeddings",
        "tie_word_embeddings",
    ]
    d = config.to_dict()
    return {k: d[k] for k in keys if k in d}


class RouterLoad:
    """Counts, per MoE layer, how many routed token slots each expert received."""

    def __init__(self, model) -> None:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

        self.routers = {
            name: m for name, m in model.named_modules() if isinstance(m, DeepseekV3TopkRouter)
        }
        self.counts = {name: torch.zeros(m.num_experts) for name, m in self.routers.items()}
        self.handles = [
            m.register_forward_hook(self._hook(name)) for name, m in self.routers.items()
        ]

    def _hook(self, name: str):
        def hook(module, args, output) -> None:
            topk_indices = output[2]
            self.counts[name] += torch.bincount(
                topk_indices.reshape(-1), minlength=module.num_experts
            ).to(self.counts[name].dtype)

        return hook

    def reset(self) -> None:
        for c in self.counts.values():
            c.zero_()

    @torch.no_grad()
    def update_bias(self, speed: float) -> None:
        """DeepSeek-V3 aux-loss-free balancing: raise the bias of under-loaded experts."""
        for name, router in self.routers.items():
            load = self.counts[name]
            router.e_score_correction_bias += speed * torch.sign(load.mean() - load)

    def fractions(self) -> dict[str, list[float]]:
        return {
            name.removeprefix("model.").removesuffix(".mlp.gate"): [
                round(float(x), 4) for x in (c / c.sum())
            ]
            for name, c in self.counts.items()
        }

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------- training


def lr_at(step: int, plan: TrainPlan) -> float:
    if step < plan.warmup:
        return plan.lr * (step + 1) / plan.warmup
    t = (step - plan.warmup) / max(1, plan.steps - plan.warmup)
    return plan.lr * (
        plan.min_lr_ratio + (1 - plan.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    )


def make_optimizer(model, plan: TrainPlan) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": plan.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=plan.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def sample_batch(
    ids: np.ndarray, starts: np.ndarray, plan: TrainPlan, bos: int, gen: np.random.Generator
) -> torch.Tensor:
    """``batch_size`` windows of bos + (seq_len - 1) tokens, each starting at a line start."""
    n = plan.seq_len - 1
    valid = starts[starts + n <= len(ids)]
    picks = gen.choice(valid, size=plan.batch_size)
    rows = np.stack([ids[s : s + n] for s in picks])
    rows = np.concatenate([np.full((plan.batch_size, 1), bos, dtype=np.int64), rows], axis=1)
    return torch.from_numpy(rows)


@torch.no_grad()
def heldout_nll(model, ids: np.ndarray, bos: int, seq_len: int, batch_size: int = 32):
    """Summed NLL and token count over the held-out stream, in bos-prefixed chunks.

    The stream is cut into consecutive chunks of ``seq_len - 1`` tokens (the last may be
    shorter); each chunk is scored after a bos, so every held-out token is predicted exactly once.
    """
    model.eval()
    n = seq_len - 1
    full = len(ids) // n
    batches = [
        ids[i * n : (i + b) * n].reshape(-1, n)
        for i, b in ((i, min(batch_size, full - i)) for i in range(0, full, batch_size))
    ]
    if len(ids) % n:
        batches.append(ids[full * n :][None, :])
    total, count = 0.0, 0
    for rows in batches:
        x = torch.from_numpy(
            np.concatenate([np.full((len(rows), 1), bos, dtype=np.int64), rows], axis=1)
        )
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += rows.size
    return total, count


def unigram_ppl(train_ids: np.ndarray, heldout_ids: np.ndarray, vocab_size: int) -> float:
    """Add-one smoothed unigram model of the train split, perplexity on the held-out tokens."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64)
    logp = np.log((counts + 1.0) / (counts.sum() + vocab_size))
    return float(np.exp(-logp[heldout_ids].mean()))


def generate_sample(model, tokenizer, max_new_tokens: int = 48) -> str:
    model.eval()
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def train_one(
    kind: str,
    tokenizer,
    data: dict[str, Any],
    out_dir: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, GenerationConfig

    plan = PLANS[kind]
    if args.steps:
        plan = TrainPlan(steps=args.steps, warmup=min(PLANS[kind].warmup, max(1, args.steps // 10)))
    name = NAMES[kind]
    bos = tokenizer.bos_token_id
    print(f"== {name}: {plan}", flush=True)

    torch.manual_seed(args.seed)
    config = make_config(kind, tokenizer)
    model = AutoModelForCausalLM.from_config(config)
    if kind == "v3":
        model.set_experts_implementation(args.experts_implementation)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"   {n_params:,} parameters", flush=True)

    load = RouterLoad(model) if kind == "v3" else None
    opt = make_optimizer(model, plan)
    gen = np.random.default_rng(args.seed)
    ids, starts = data["train_ids"], data["train_starts"]

    t0 = time.perf_counter()
    losses: list[float] = []
    stopped_early = False
    step = 0
    model.train()
    for step in range(plan.steps):
        if time.perf_counter() - t0 > args.minutes * 60:
            stopped_early = True
            print(f"   --minutes {args.minutes} reached at step {step}; stopping", flush=True)
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, plan)
        x = sample_batch(ids, starts, plan, bos, gen)
        if load:
            load.reset()
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), plan.grad_clip)
        opt.step()
        if load:
            load.update_bias(args.bias_update_speed)
        losses.append(loss.item())
        if step % 50 == 0 or step == plan.steps - 1:
            el = time.perf_counter() - t0
            avg = sum(losses[-50:]) / len(losses[-50:])
            msg = f"   step {step:5d}  loss {avg:.3f}  lr {lr_at(step, plan):.2e}  {el:6.1f}s"
            if load:  # busiest expert's share of this step's routed tokens, over all layers
                top = max(max(f) for f in load.fractions().values())
                even = 1 / len(load.counts[next(iter(load.counts))])
                msg += f"  max expert load {top:.3f} (even: {even:.3f})"
            print(msg, flush=True)
    steps_done = len(losses)
    train_s = time.perf_counter() - t0

    if load:
        load.reset()
    nll, count = heldout_nll(model, data["heldout_ids"], bos, plan.seq_len)
    heldout_loss = nll / count
    expert_load = load.fractions() if load else None
    if load:
        load.remove()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    sample = generate_sample(model, tokenizer)
    print(
        f"   held-out loss {heldout_loss:.4f}  ppl {math.exp(heldout_loss):.2f}"
        f"  (unigram {data['unigram_ppl']:.1f})",
        flush=True,
    )
    print(f"   sample: {sample!r}", flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    # transformers 5 always writes safetensors (the old safe_serialization flag is gone).
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # transformers 5 writes its own class name; the generic fast-tokenizer name loads the same
    # tokenizer.json in transformers 4.x and 5.x alike.
    tok_cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")

    # The checkpoint must load back cleanly through the public API and score the same.
    reloaded, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise RuntimeError(f"{name}: reloading gave {bad}")
    nll2, count2 = heldout_nll(reloaded, data["heldout_ids"], bos, plan.seq_len)
    reload_loss = nll2 / count2
    if abs(reload_loss - heldout_loss) > 1e-3:
        raise RuntimeError(f"{name}: held-out loss {heldout_loss} vs {reload_loss} after reload")

    weights = out_dir / "model.safetensors"
    record: dict[str, Any] = {
        "model": name,
        "architecture": type(model).__name__,
        "config": config_summary(model.config),
        "parameters": n_params,
        "weights_bytes": weights.stat().st_size,
        "dtype": "float32",
        "tokenizer": {
            "type": "byte-level BPE (tokenizers)",
            "vocab_size": len(tokenizer),
            "bos": BOS,
            "eos": EOS,
            "pad": PAD,
        },
        "corpus": {
            "file": str(DEFAULT_CORPUS.relative_to(REPO)),
            "split": "dsc.corpus.split_corpus: chapter i held out when i % 20 == 19",
            "train_chars": data["train_chars"],
            "heldout_chars": data["heldout_chars"],
            "train_tokens": int(len(data["train_ids"])),
            "heldout_tokens": count,
        },
        "training": {
            "steps": steps_done,
            "planned_steps": plan.steps,
            "stopped_early": stopped_early,
            "batch_size": plan.batch_size,
            "seq_len": plan.seq_len,
            "tokens_seen": steps_done * plan.batch_size * plan.seq_len,
            "optimizer": f"AdamW(betas=(0.9, 0.95), weight_decay={plan.weight_decay})",
            "lr": plan.lr,
            "schedule": f"linear warmup {plan.warmup} steps, cosine to {plan.min_lr_ratio} x lr",
            "grad_clip": plan.grad_clip,
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "wall_time_s": round(train_s, 1),
            "final_train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        },
        "heldout": {
            "loss": round(heldout_loss, 4),
            "perplexity": round(math.exp(heldout_loss), 2),
            "unigram_perplexity": round(data["unigram_ppl"], 2),
            "ratio_to_unigram": round(math.exp(heldout_loss) / data["unigram_ppl"], 4),
            "loss_after_reload": round(reload_loss, 4),
        },
        "sample": sample,
        "sample_prompt": PROMPT,
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "tokenizers": __import__("tokenizers").__version__,
            "python": platform.python_version(),
        },
        "command": "python scripts/train_tiny.py " + " ".join(sys.argv[1:]),
    }
    if kind == "v3":
        record["moe_balancing"] = {
            "method": "aux-loss-free: e_score_correction_bias += u * sign(mean_load - load) "
            "per step",
            "bias_update_speed": args.bias_update_speed,
            "experts_implementation_in_training": args.experts_implementation,
            "heldout_expert_token_fractions": expert_load,
            "e_score_correction_bias": {
                n.removeprefix("model.").removesuffix(".mlp.gate.e_score_correction_bias"): [
                    round(float(x), 4) for x in b
                ]
                for n, b in model.named_buffers()
                if n.endswith("e_score_correction_bias")
            },
        }
    (out_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"   wrote {out_dir} ({weights.stat().st_size / 2**20:.1f} MiB weights, "
        f"{train_s:.0f}s training)",
        flush=True,
    )
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["v3", "qwen2", "all"], default="all")
    p.add_argument(
        "--out",
        type=Path,
        default=REPO / "examples" / "models",
        help="parent directory of tiny-deepseek-v3/ and tiny-qwen2/",
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=7.5,
        help="safety cap on training wall time per model (default 7.5)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="override the planned number of steps (for quick checks)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--bias-update-speed", type=float, default=1e-3)
    p.add_argument(
        "--experts-implementation", default="eager", choices=["eager", "grouped_mm", "batched_mm"]
    )
    p.add_argument("--corpus", type=Path, default=None, help="default: the shipped KJV")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    train, heldout = split_corpus(load_corpus(args.corpus))
    tokenizer = train_tokenizer(train, args.vocab_size)
    train_ids, train_starts = encode_lines(tokenizer, train)
    heldout_ids, _ = encode_lines(tokenizer, heldout)
    data = {
        "train_ids": train_ids,
        "train_starts": train_starts,
        "heldout_ids": heldout_ids,
        "train_chars": len(train),
        "heldout_chars": len(heldout),
        "unigram_ppl": unigram_ppl(train_ids, heldout_ids, len(tokenizer)),
    }
    print(
        f"tokenizer: vocab {len(tokenizer)}, train {len(train_ids):,} tokens, held-out "
        f"{len(heldout_ids):,} tokens, unigram ppl {data['unigram_ppl']:.1f} "
        f"({time.perf_counter() - t0:.1f}s)",
        flush=True,
    )

    kinds = ["v3", "qwen2"] if args.model == "all" else [args.model]
    for kind in kinds:
        train_one(kind, tokenizer, data, args.out / NAMES[kind], args)
    print(f"done in {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

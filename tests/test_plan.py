"""Parameter/KV accounting and `dsc plan`, checked against numbers worked out by hand here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from dsc.cli import cli, main
from dsc.errors import EXIT_DOES_NOT_FIT, EXIT_UNSUPPORTED, CheckpointError, DoesNotFit, Unsupported
from dsc.hardware import GiB, load_profile, profile_names
from dsc.models.params import (
    count_params,
    expected_active_experts,
    kv_bytes_per_token,
    load_config,
    weight_inventory,
)
from dsc.plan import Skipped, plan, plan_all

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"


def cfg(name: str) -> dict:
    return load_config(CONFIGS / name)[0]


# --- parameter counts ---------------------------------------------------------------------------

# Published sizes (Hugging Face model pages / DeepSeek model cards), in billions.
PUBLISHED = {
    "DeepSeek-R1-Distill-Qwen-1.5B": 1.78,
    "DeepSeek-R1-Distill-Qwen-7B": 7.62,
    "DeepSeek-R1-Distill-Qwen-14B": 14.8,
    "DeepSeek-R1-Distill-Qwen-32B": 32.8,
    "DeepSeek-R1-Distill-Llama-8B": 8.03,
    "deepseek-llm-7b-base": 6.91,
    "deepseek-coder-33b-base": 33.3,
    "DeepSeek-V2-Lite": 15.7,
    "DeepSeek-V3": 671.0,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_total_params_match_published_size(name):
    # Published sizes are rounded to 3 significant figures: hold dsc to 0.5%.
    assert count_params(cfg(name)).total / 1e9 == pytest.approx(PUBLISHED[name], rel=0.005)


def test_every_example_config_is_planned():
    assert {p.name for p in CONFIGS.iterdir() if p.is_dir()} == set(PUBLISHED)


def test_moe_active_params_match_published():
    # DeepSeek: V2-Lite "2.4B activated", V3 "37B activated" (model cards). Within 3%.
    assert count_params(cfg("DeepSeek-V2-Lite")).active / 1e9 == pytest.approx(2.4, rel=0.03)
    assert count_params(cfg("DeepSeek-V3")).active / 1e9 == pytest.approx(37, rel=0.03)


def test_v3_mtp_counted_separately():
    # README_WEIGHTS: 685B = 671B main model + 14B MTP module; the MTP module is not exported.
    p = count_params(cfg("DeepSeek-V3"))
    assert p.total_with_mtp / 1e9 == pytest.approx(685, rel=0.005)
    assert p.mtp / 1e9 == pytest.approx(14, rel=0.05)
    assert p.mtp - p.mtp_unique == 2 * 129280 * 7168  # its own embedding and output head


def test_qwen_1_5b_exact_count_by_hand():
    h, inter, layers, heads, kv, vocab = 1536, 8960, 28, 12, 2, 151936
    hd = h // heads
    q = h * h + h  # q_proj with bias
    k = v = h * kv * hd + kv * hd  # GQA: 2 KV heads, with bias
    o = h * h  # no bias on o_proj in Qwen2
    mlp = 3 * h * inter
    norms = 2 * h
    expected = vocab * h + layers * (q + k + v + o + mlp + norms) + h + vocab * h
    p = count_params(cfg("DeepSeek-R1-Distill-Qwen-1.5B"))
    assert p.total == expected == 1_777_088_000
    assert p.by_component["embeddings"] == p.by_component["lm_head"] == vocab * h
    assert p.active == expected - vocab * h  # all but the embedding table (a lookup)


def test_v2_lite_exact_count_by_hand():
    h, layers, vocab, heads = 2048, 27, 102400, 16
    nope, rope, vdim, kv_lora = 128, 64, 128, 512
    attn = (
        h * heads * (nope + rope)  # q_proj (q_lora_rank is null)
        + h * (kv_lora + rope)  # kv_a_proj_with_mqa
        + kv_lora  # kv_a_layernorm
        + kv_lora * heads * (nope + vdim)  # kv_b_proj
        + heads * vdim * h
    )  # o_proj
    dense_mlp = 3 * h * 10944  # layer 0 (first_k_dense_replace = 1)
    expert = 3 * h * 1408
    moe = 64 * expert + 2 * expert + 64 * h  # 64 routed, 2 shared, router gate
    total = 2 * vocab * h + layers * (attn + 2 * h) + dense_mlp + 26 * moe + h
    p = count_params(cfg("DeepSeek-V2-Lite"))
    assert p.total == total
    assert p.by_component["router"] == 26 * 64 * h
    assert p.by_component["experts"] == 26 * 64 * expert
    active = total - vocab * h - 26 * (64 - 6) * expert  # top-6 of 64 routed experts
    assert p.active == active


def test_v3_router_includes_correction_bias():
    p = count_params(cfg("DeepSeek-V3"))
    moe_layers = 61 - 3
    assert p.by_component["router"] == moe_layers * (256 * 7168 + 256)
    assert p.by_component["shared_experts"] == moe_layers * 3 * 7168 * 2048


def test_unsupported_architecture_names_supported_ones():
    with pytest.raises(
        Unsupported,
        match=r"'MistralForCausalLM' is not supported; supported: "
        r"LlamaForCausalLM, Qwen2ForCausalLM",
    ):
        count_params({"architectures": ["MistralForCausalLM"], "hidden_size": 8})


def test_load_config_accepts_dir_or_file(tmp_path):
    d = CONFIGS / "DeepSeek-V2-Lite"
    assert load_config(d)[0] == load_config(d / "config.json")[0]
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable JSON config"):
        load_config(tmp_path)


# --- KV cache -----------------------------------------------------------------------------------


def test_v3_latent_kv_bytes_per_token():
    # MLA caches the compressed latent: layers x (kv_lora_rank + qk_rope_head_dim) x bytes.
    assert kv_bytes_per_token(cfg("DeepSeek-V3"), 2) == 61 * (512 + 64) * 2 == 70_272
    assert kv_bytes_per_token(cfg("DeepSeek-V3"), 1) == 35_136
    # Expanded K and V would be 61 x 128 heads x (192 + 128) x 2 bytes = 5.0 MB: 71x more.
    assert kv_bytes_per_token(cfg("DeepSeek-V2-Lite"), 2) == 27 * 576 * 2


def test_gqa_kv_bytes_per_token():
    # 2 (K and V) x layers x kv_heads x head_dim x bytes.
    assert kv_bytes_per_token(cfg("DeepSeek-R1-Distill-Qwen-7B"), 2) == 2 * 28 * 4 * 128 * 2
    assert kv_bytes_per_token(cfg("deepseek-llm-7b-base"), 2) == 2 * 30 * 32 * 128 * 2
    assert kv_bytes_per_token(cfg("DeepSeek-R1-Distill-Llama-8B"), 2) == 2 * 32 * 8 * 128 * 2


def test_expected_active_experts():
    assert expected_active_experts(256, 8, 1) == 8
    assert expected_active_experts(256, 8, 2) == pytest.approx(256 * (1 - (1 - 8 / 256) ** 2))
    assert expected_active_experts(64, 6, 10_000) == pytest.approx(64)


# --- plan: memory -------------------------------------------------------------------------------


def _qwen15_shapes():
    """(quantizable params, output rows, g128 groups, 16-bit params) of R1-Distill-Qwen-1.5B."""
    h, inter, layers, kv_dim, vocab = 1536, 8960, 28, 256, 151936
    mats = [(h, h), (kv_dim, h), (kv_dim, h), (h, h), (inter, h), (inter, h), (h, inter)]
    q = layers * sum(o * i for o, i in mats)
    rows = layers * sum(o for o, _ in mats)
    groups = layers * sum(o * math.ceil(i / 128) for o, i in mats)
    sixteen = 2 * vocab * h + layers * (2 * h + h + 2 * kv_dim) + h  # tables, norms, q/k/v bias
    return q, rows, groups, sixteen


@pytest.mark.parametrize(
    ("precision", "profile"),
    [
        ("fp16", "l4"),
        ("int8", "l4"),
        ("fp8", "l4"),
        ("int4", "l4"),
    ],
)
def test_weight_bytes_by_hand(precision, profile):
    q, rows, groups, sixteen = _qwen15_shapes()
    expected = {
        "fp16": (q + sixteen) * 2,
        "int8": q * 1 + rows * 2 + sixteen * 2,  # + one fp16 scale per output channel
        "fp8": q * 1 + rows * 2 + sixteen * 2,
        "int4": q * 0.5 + groups * 2 + sixteen * 2,  # one fp16 scale per 128 (symmetric)
    }[precision]
    r = plan(CONFIGS / "DeepSeek-R1-Distill-Qwen-1.5B", load_profile(profile), precision, 1, 1024)
    assert r.memory["weights"] == math.ceil(expected)


def test_memory_breakdown_by_hand():
    prof = load_profile("jetson-orin-nano-8gb-super")
    b, ctx = 2, 3000
    r = plan(CONFIGS / "DeepSeek-R1-Distill-Qwen-1.5B", prof, "int8", b, ctx)
    h, inter, vocab = 1536, 8960, 151936
    kv_tok = 2 * 28 * 2 * 128 * 2
    t = min(ctx, prof.envelope.max_input_len)  # 2048
    attn_width = (12 + 2 * 2) * 128
    act = b * t * (2 * h + max(attn_width, 2 * inter)) * 2 + b * vocab * 4
    assert r.input_len == 2048
    assert r.memory["kv_cache"] == b * ctx * kv_tok
    assert r.memory["activations"] == act
    assert r.memory["workspace"] == 1 * GiB
    assert r.memory["runtime"] == 0.5 * GiB
    assert r.memory["os_reserved"] == 1.5 * GiB
    assert r.capacity == 8 * GiB
    assert r.total == sum(r.memory.values())
    assert r.margin == r.capacity - r.total and r.fits


def test_kv_cache_is_fp16_at_every_precision():
    # dsc's quantized graphs keep the KV cache in fp16 (the plan must not count an FP8 cache
    # that the built engine does not have).
    h100 = load_profile("h100")
    r16 = plan(CONFIGS / "DeepSeek-V2-Lite", h100, "fp16", 4, 8192)
    for precision in ("int8", "fp8", "int4"):
        r = plan(CONFIGS / "DeepSeek-V2-Lite", h100, precision, 4, 8192)
        assert r.kv_dtype == "fp16"
        assert r.memory["kv_cache"] == r16.memory["kv_cache"] == 4 * 8192 * 27 * 576 * 2


def test_verdicts_agree_with_hardware_facts_table():
    # hardware-facts §8: 33B FP16 does not fit an A100 40GB (weights alone 66 GB); INT8 does.
    a100 = load_profile("a100-40gb")
    coder = CONFIGS / "deepseek-coder-33b-base"
    assert not plan(coder, a100, "fp16", 1, 2048).fits
    assert plan(coder, a100, "int8", 1, 2048).fits
    # 7B FP16 on Orin Nano 8GB: weights exceed memory (x in §8).
    nano = load_profile("jetson-orin-nano-8gb")
    r = plan(CONFIGS / "DeepSeek-R1-Distill-Qwen-7B", nano, "fp16", 1, 1024)
    assert not r.fits and r.memory["weights"] > nano.memory.capacity_bytes
    assert r.max_batch == 0 and r.max_context == 0


def test_largest_batch_and_longest_context_are_tight():
    prof = load_profile("l4")
    model = CONFIGS / "DeepSeek-R1-Distill-Qwen-7B"
    r = plan(model, prof, "int8", 1, 8192)
    assert plan(model, prof, "int8", r.max_batch, 8192).fits
    assert not plan(model, prof, "int8", r.max_batch + 1, 8192).fits
    assert plan(model, prof, "int8", 1, r.max_context).fits
    assert not plan(model, prof, "int8", 1, r.max_context + 1).fits
    # Closed form: one prefill pass holds max_num_tokens // input_len = 8192 // 4096 = 2
    # sequences, so from batch 2 on the activations stay those of batch 2 and the largest batch
    # is (capacity - weights - fixed - activations(2)) // kv per sequence.
    act2 = plan(model, prof, "int8", 2, 8192).memory["activations"]
    per_seq = r.memory["kv_cache"]
    fixed = r.memory["weights"] + r.memory["workspace"] + r.memory["runtime"] + act2
    assert r.max_batch in ((r.capacity - fixed) // per_seq, (r.capacity - fixed) // per_seq - 1)
    assert plan(model, prof, "int8", r.max_batch, 8192).memory["activations"] == act2


def test_illegal_precision_names_the_legal_ones():
    with pytest.raises(
        Unsupported,
        match=r"precision fp8 is not supported on t4 \(SM75\); "
        r"legal: fp16, int8",
    ):
        plan(CONFIGS / "DeepSeek-V2-Lite", load_profile("t4"), "fp8")
    with pytest.raises(Unsupported, match="legal: fp16, bf16, int8, int4"):
        plan(CONFIGS / "DeepSeek-V2-Lite", load_profile("jetson-orin"), "fp8")


def test_default_context_is_the_envelope_capped_at_the_model():
    r = plan(CONFIGS / "deepseek-llm-7b-base", load_profile("h200"), "fp16")
    assert r.context == 4096  # envelope max_kv 65536, model max_position_embeddings 4096
    r = plan(
        CONFIGS / "DeepSeek-R1-Distill-Qwen-1.5B", load_profile("jetson-orin-nano-4gb"), "int4"
    )
    assert (r.context, r.input_len) == (2048, 1024)


# --- plan: speed --------------------------------------------------------------------------------


def test_decode_ceiling_by_hand():
    prof = load_profile("h100-sxm")
    ctx = 4096
    r = plan(CONFIGS / "DeepSeek-R1-Distill-Qwen-1.5B", prof, "fp16", 1, ctx)
    total, vocab, h = 1_777_088_000, 151936, 1536
    read = (total - vocab * h) * 2 + h * 2 + ctx * (2 * 28 * 2 * 128 * 2)
    assert r.decode_bytes_per_step == read
    assert r.decode_tokens_per_s == pytest.approx(3350e9 / read)


def test_decode_ceiling_above_published_orin_nano_super_measurements():
    # hardware-facts §8 / S66: INT4 (MLC) on Orin Nano Super, Qwen2.5-7B 21.75 tok/s and
    # Llama-3.1-8B 19.14 tok/s. A ceiling must sit above the measurement, and below the naive
    # §8 bound that reads every weight at 0.5 byte (dsc keeps embeddings/lm_head in fp16).
    nano = load_profile("jetson-orin-nano-8gb-super")
    qwen = plan(CONFIGS / "DeepSeek-R1-Distill-Qwen-7B", nano, "int4", 1, 512)
    llama = plan(CONFIGS / "DeepSeek-R1-Distill-Llama-8B", nano, "int4", 1, 512)
    assert 21.75 < qwen.decode_tokens_per_s < 102e9 / (7.62e9 * 0.5)
    assert 19.14 < llama.decode_tokens_per_s < 102e9 / (8.03e9 * 0.5)
    # Base (non-Super) mode: 68 GB/s, so the ceiling scales by 68 / 102.
    base = plan(
        CONFIGS / "DeepSeek-R1-Distill-Qwen-7B",
        load_profile("jetson-orin-nano-8gb"),
        "int4",
        1,
        512,
    )
    assert base.decode_tokens_per_s == pytest.approx(qwen.decode_tokens_per_s * 68 / 102)


def test_moe_decode_reads_only_active_experts():
    prof = load_profile("h200")
    r = plan(CONFIGS / "DeepSeek-V3", prof, "fp8", 1, 1024)
    p = count_params(cfg("DeepSeek-V3"))
    # fp8 bytes of the active weights are close to the active parameter count (1 byte each; the
    # 16-bit lm_head/router and the per-channel scales add ~3%), far below the 671B total.
    assert p.active < r.decode_bytes_per_step < 1.05 * p.active + 1024 * 35_136 + 2e9
    # At batch 8, more distinct experts are read per step, but less than 8x.
    r8 = plan(CONFIGS / "DeepSeek-V3", prof, "fp8", 8, 1024)
    assert r.decode_bytes_per_step < r8.decode_bytes_per_step < 8 * r.decode_bytes_per_step
    assert r8.decode_tokens_per_s > r.decode_tokens_per_s


def test_prefill_estimate_by_hand():
    prof = load_profile("h100-sxm")
    r = plan(CONFIGS / "DeepSeek-R1-Distill-Qwen-7B", prof, "fp16", 2, 4096, input_len=2048)
    active = count_params(cfg("DeepSeek-R1-Distill-Qwen-7B")).active
    assert r.prefill_tokens == 2 * 2048
    assert r.prefill_bound == "compute"
    assert r.prefill_seconds == pytest.approx(2 * active * 4096 / 989e12)
    # INT4 is weight-only: its matmuls run at the fp16 peak; INT8 uses the INT8 peak.
    r4 = plan(CONFIGS / "DeepSeek-R1-Distill-Qwen-7B", prof, "int4", 2, 4096, input_len=2048)
    r8 = plan(CONFIGS / "DeepSeek-R1-Distill-Qwen-7B", prof, "int8", 2, 4096, input_len=2048)
    assert (r4.peak_precision, r4.peak_tflops) == ("fp16", 989)
    assert r8.prefill_seconds == pytest.approx(2 * active * 4096 / 1979e12)


def test_short_prefill_is_memory_bound():
    r = plan(
        CONFIGS / "DeepSeek-R1-Distill-Qwen-7B",
        load_profile("jetson-orin-nano-8gb-super"),
        "int4",
        1,
        512,
        input_len=1,
    )
    assert r.prefill_bound == "memory"
    assert r.prefill_seconds == pytest.approx(r.decode_bytes_per_step / 102e9, rel=0.01)


def test_plan_all_skips_illegal_precisions():
    rows = plan_all(CONFIGS / "DeepSeek-R1-Distill-Qwen-1.5B", "fp8", context=2048)
    assert [r.profile for r in rows] == profile_names()
    skipped = {r.profile for r in rows if isinstance(r, Skipped)}
    assert skipped == {
        n for n in profile_names() if n.startswith(("jetson", "a100", "t4", "rtx-a6000"))
    }


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_plan_human_and_json():
    args = [
        "plan",
        str(CONFIGS / "DeepSeek-V2-Lite"),
        "--profile",
        "jetson-orin",
        "--precision",
        "int4",
        "--batch",
        "2",
        "--context",
        "8192",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "DeepSeek-V2-Lite (DeepseekV2ForCausalLM, 15.71B params, 2.45B active" in result.output
    assert "verdict: FITS" in result.output and "decode ceiling" in result.output
    data = json.loads(CliRunner().invoke(cli, args + ["--json"]).output)
    api = plan(CONFIGS / "DeepSeek-V2-Lite", load_profile("jetson-agx-orin-64gb"), "int4", 2, 8192)
    assert data["memory_bytes"]["total"] == api.total
    assert data["kv_cache"]["bytes_per_token"] == 27 * 576 * 2
    assert data["decode"]["tokens_per_s"] == pytest.approx(api.decode_tokens_per_s)
    assert data["fits"] is True and data["profile"] == "jetson-agx-orin-64gb"


def test_cli_plan_accepts_config_file_and_set():
    cfg_file = CONFIGS / "DeepSeek-V3" / "config.json"
    result = CliRunner().invoke(
        cli,
        [
            "plan",
            str(cfg_file),
            "--profile",
            "h200",
            "--precision",
            "fp8",
            "--context",
            "4096",
            "--json",
        ],
    )
    assert json.loads(result.output)["fits"] is False
    result = CliRunner().invoke(
        cli,
        [
            "plan",
            str(cfg_file),
            "--profile",
            "h200",
            "--precision",
            "fp8",
            "--context",
            "4096",
            "--set",
            "memory.gb=1000",
            "--json",
        ],
    )
    data = json.loads(result.output)
    assert data["fits"] is True and data["capacity_bytes"] == 1000 * GiB


def test_cli_plan_all_one_row_per_profile():
    result = CliRunner().invoke(
        cli,
        [
            "plan",
            str(CONFIGS / "DeepSeek-R1-Distill-Qwen-1.5B"),
            "--profile",
            "all",
            "--precision",
            "bf16",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2 + len(profile_names())
    t4 = next(ln for ln in lines if ln.startswith("t4 "))
    assert "n/a" in t4 and "bf16 not supported (legal: fp16, int8)" in t4


def test_cli_illegal_precision_exit_4(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", str(CONFIGS / "DeepSeek-V2-Lite"), "--profile", "t4", "--precision", "fp8"])
    assert e.value.code == EXIT_UNSUPPORTED
    assert "legal: fp16, int8" in capsys.readouterr().err


def test_cli_strict_exits_6_only_when_it_does_not_fit(capsys):
    args = [
        "plan",
        str(CONFIGS / "DeepSeek-R1-Distill-Qwen-32B"),
        "--precision",
        "fp16",
        "--context",
        "2048",
        "--strict",
        "--profile",
    ]
    result = CliRunner().invoke(cli, args + ["a100-40gb"])
    assert isinstance(result.exception, DoesNotFit)
    assert "DOES NOT FIT" in result.output  # the report is printed before the exit
    with pytest.raises(SystemExit) as e:
        main(args + ["a100-40gb"])
    assert e.value.code == EXIT_DOES_NOT_FIT
    with pytest.raises(SystemExit) as e:
        main(args + ["h100"])
    assert e.value.code == 0
    # Without --strict, plan reports and exits 0.
    assert CliRunner().invoke(cli, args[:-2] + ["--profile", "a100-40gb"]).exit_code == 0


def test_cli_bad_precision_is_a_usage_error():
    result = CliRunner().invoke(
        cli, ["plan", str(CONFIGS / "DeepSeek-V3"), "--profile", "h100", "--precision", "fp4"]
    )
    assert result.exit_code == 2 and "fp4" in result.output


def test_inventory_marks_only_linear_weights_quantizable():
    for w in weight_inventory(cfg("DeepSeek-V3")):
        assert w.quantizable == (
            w.component in ("attention", "mlp", "experts", "shared_experts") and w.in_features > 1
        )


def test_engine_plan_records_the_decode_ceiling():
    """The plan a build records per profile carries the decode ceiling at the engine's envelope
    (the report's profile table shows it); fp32 weights are read twice over."""
    from dsc.pipeline.targets import resolve_targets

    c = cfg("DeepSeek-R1-Distill-Qwen-1.5B")
    (t,) = resolve_targets(
        ["a100"], model_config=c, model_name="q", dtype="fp16", max_batch=4, max_kv=2048
    )
    p = plan(
        c, load_profile("a100"), "fp16", batch=4, context=2048, input_len=t.envelope.max_input_len
    )
    d = t.plan["decode"]
    assert d["tokens_per_s"] == pytest.approx(p.decode_tokens_per_s)
    assert d["tokens_per_s_per_sequence"] == pytest.approx(p.decode_tokens_per_s / 4)
    (t32,) = resolve_targets(
        ["a100"], model_config=c, model_name="q", dtype="fp32", max_batch=4, max_kv=2048
    )
    assert t32.plan["decode"]["tokens_per_s"] < d["tokens_per_s"] * 0.6

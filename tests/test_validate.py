"""The validation gate against real failures, on the trained tiny DeepSeek-V3 (fp16).

- the untouched fp16 artifact passes (exit 0);
- int8 weight-only Q/DQ on every linear layer passes the int8 gate, and the same graph with the
  scales of one layer multiplied by 10 fails (exit 1) and the report names that layer;
- a "fusion made wrong" (one layer's RMSNorm loses its gamma, the classic fused-norm bug) fails
  and the report names that norm;
- dsc bench and dsc report write what they say.
"""

from __future__ import annotations

import json
import shutil

import jsonschema
import numpy as np
import onnx_ir as ir
import pytest

from dsc import api
from dsc.validate.locate import module_path

from .conftest import REPO, run_cli

BROKEN_LAYER = 2


def _quiet(msg):
    pass


@pytest.fixture(scope="module")
def fp16_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "v3-fp16"
    return api.export(
        REPO / "examples/models/tiny-deepseek-v3", out, dtype="fp16", progress=_quiet
    ).path


def _candidate(src, dst, mutate) -> None:
    """Copy the artifact, keep its graph as reference/, and write `mutate(model)` as model.onnx."""
    shutil.copytree(src, dst)
    ref = dst / "reference"
    ref.mkdir()
    for name in ("model.onnx", "model_io.json"):
        shutil.copy2(src / name, ref / name)
    model = ir.load(str(src / "model.onnx"))
    mutate(model)
    ir.save(model, dst / "model.onnx")


def _int8_weights(model, *, scale_layer: int | None = None, factor: float = 1.0) -> int:
    """Per-output-channel symmetric int8 Q/DQ on every 2-D weight feeding a MatMul."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "MatMul" or node.inputs[1] is None:
            continue
        w = node.inputs[1]
        if w.const_value is None or len(w.shape) != 2 or w.name not in model.graph.initializers:
            continue
        arr = w.const_value.numpy().astype(np.float32)
        scale = np.abs(arr).max(axis=0) / 127.0 + 1e-12
        q = np.clip(np.round(arr / scale), -127, 127).astype(np.int8)
        path = module_path(node) or ""
        if scale_layer is not None and f"layers.{scale_layer}." in path:
            scale = scale * factor
        qv = ir.Value(name=f"{w.name}_q", const_value=ir.tensor(q, name=f"{w.name}_q"))
        sv = ir.Value(
            name=f"{w.name}_scale",
            const_value=ir.tensor(
                scale.astype(arr.dtype if arr.dtype != np.float32 else w.const_value.numpy().dtype),
                name=f"{w.name}_scale",
            ),
        )
        model.graph.register_initializer(qv)
        model.graph.register_initializer(sv)
        dq = ir.node(
            "DequantizeLinear",
            [qv, sv],
            attributes={"axis": 1},
            metadata_props=dict(node.metadata_props),
        )
        model.graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        count += 1
    return count


def _drop_gamma(model, layer: int) -> str:
    """Break one RMSNorm the way a bad fusion does: ignore its learned gamma."""
    for node in model.graph:
        path = module_path(node) or ""
        if path == f"model.model.layers.{layer}.post_attention_layernorm" and node.op_type == "Mul":
            for i, inp in enumerate(node.inputs):
                if (
                    inp is not None
                    and inp.const_value is not None
                    and inp.name in model.graph.initializers
                ):
                    ones = np.ones_like(inp.const_value.numpy())
                    v = ir.Value(
                        name=f"{inp.name}_ones",
                        const_value=ir.tensor(ones, name=f"{inp.name}_ones"),
                    )
                    model.graph.register_initializer(v)
                    node.replace_input_with(i, v)
                    return path
    raise AssertionError("no RMSNorm gamma found")


def test_untouched_fp16_artifact_passes(fp16_artifact, tmp_path, capsys):
    art = tmp_path / "a"
    shutil.copytree(fp16_artifact, art)
    code, out, err = run_cli(["validate", str(art)], capsys)
    assert code == 0, err
    assert "PASS" in out
    v = json.loads((art / "validation.json").read_text())
    assert v["passed"] and v["perplexity"]["delta"] == 0.0
    assert v["prefill"]["top1"] == 1.0 and v["greedy"]["greedy_match"] == 1.0
    m = json.loads((art / "manifest.json").read_text())
    assert m["validation"]["passed"] is True


def test_int8_weights_pass_and_one_layer_scaled_by_10_fails(fp16_artifact, tmp_path, capsys):
    good = tmp_path / "int8"
    counts = {}
    _candidate(fp16_artifact, good, lambda m: counts.setdefault("n", _int8_weights(m)))
    assert counts["n"] >= 8
    code, out, err = run_cli(["validate", str(good), "--precision", "int8"], capsys)
    assert code == 0, out + err
    v = json.loads((good / "validation.json").read_text())
    assert 0 < abs(v["perplexity"]["delta"]) < 0.02
    assert v["reference"].startswith("reference/")

    bad = tmp_path / "int8-bad"
    _candidate(
        fp16_artifact, bad, lambda m: _int8_weights(m, scale_layer=BROKEN_LAYER, factor=10.0)
    )
    code, out, err = run_cli(["validate", str(bad), "--precision", "int8"], capsys)
    assert code == 1, out + err
    assert err.startswith("dsc: error: validation failed")
    v = json.loads((bad / "validation.json").read_text())
    assert not v["passed"] and v["failures"]
    fd = v["first_divergence"]
    assert fd["layer"] == BROKEN_LAYER, fd
    assert fd["rel_error"] > 1.0
    # before the broken layer: int8 noise (< 5%) except where a routed expert flipped
    before = [e for e in v["layers"] if e["layer"] is not None and e["layer"] < BROKEN_LAYER]
    assert before and max(e["rel_error"] for e in before) < fd["rel_error"] / 10
    assert (
        max(
            e["rel_error"]
            for e in before
            if ".experts" not in e["module"] and not e["module"].endswith(".mlp")
        )
        < 0.05
    )
    report = (bad / "report.md").read_text()
    assert f"first divergence: layer {BROKEN_LAYER}" in report
    assert f"layers.{BROKEN_LAYER}" in (bad / "report.html").read_text()


def test_wrong_fusion_fails_and_names_the_norm(fp16_artifact, tmp_path, capsys):
    bad = tmp_path / "fused-bad"
    where = {}
    _candidate(fp16_artifact, bad, lambda m: where.setdefault("path", _drop_gamma(m, BROKEN_LAYER)))
    code, out, err = run_cli(["validate", str(bad)], capsys)
    assert code == 1, out
    v = json.loads((bad / "validation.json").read_text())
    fd = v["first_divergence"]
    assert fd["layer"] == BROKEN_LAYER
    assert fd["module"].startswith(where["path"]) or where["path"].startswith(fd["module"]), fd
    assert "first divergence" in out


def test_threshold_override_and_bad_threshold(fp16_artifact, tmp_path, capsys):
    bad = tmp_path / "fused-bad"
    _candidate(fp16_artifact, bad, lambda m: _drop_gamma(m, BROKEN_LAYER))
    loose = "min_cosine=0,min_top1=0,min_top5=0,max_kl=100,max_ppl_delta=100,min_greedy_match=0"
    code, out, err = run_cli(["validate", str(bad), "--thresholds", loose], capsys)
    assert code == 0, err
    code, out, err = run_cli(["validate", str(bad), "--thresholds", "min_wisdom=1"], capsys)
    assert code == 3 and "unknown threshold" in err


def test_bench_and_report(fp16_artifact, tmp_path, capsys):
    art = tmp_path / "b"
    shutil.copytree(fp16_artifact, art)
    code, out, err = run_cli(
        [
            "bench",
            str(art),
            "--batch",
            "1,2",
            "--prompt-len",
            "16,32",
            "--gen-len",
            "6",
            "--repeats",
            "2",
            "--profile",
            "jetson-orin",
        ],
        capsys,
    )
    assert code == 0, err
    b = json.loads((art / "bench.json").read_text())
    assert len(b["rows"]) == 4
    for row in b["rows"]:
        assert 0 < row["tpot"]["p50_ms"] <= row["tpot"]["p90_ms"] <= row["tpot"]["p99_ms"]
        assert row["decode_tokens_per_s"] == pytest.approx(
            row["batch"] / row["tpot"]["p50_ms"] * 1e3
        )
        assert 0 < row["fraction_of_host_bandwidth"] < 1.5
    assert b["target"]["profile"] == "jetson-agx-orin-64gb"
    run_cli(["validate", str(art)], capsys)
    (art / "report.html").unlink()
    code, out, err = run_cli(["report", str(art)], capsys)
    assert code == 0
    rep = json.loads((art / "report.json").read_text())
    schema = json.loads((REPO / "dsc/schemas/report.schema.json").read_text())
    jsonschema.validate(rep, schema)
    page = (art / "report.html").read_text()
    for plot in ("gate-metrics", "module-error", "latency"):  # matplotlib SVG, inline
        assert f'<svg class="plot" id="plot-{plot}"' in page
    assert "<script" not in page and "<link" not in page and " src=" not in page


def test_logits_accumulator_equals_whole_batch_metrics():
    from dsc.validate import metrics

    rng = np.random.default_rng(0)
    r = rng.normal(size=(3, 40, 97)).astype(np.float16)
    c = (r + rng.normal(scale=0.3, size=r.shape)).astype(np.float16)
    acc = metrics.LogitsAccumulator()
    for w in range(3):
        acc.add(c[w], r[w])
    assert acc.result() == metrics.logits_metrics(c, r)
    with pytest.raises(ValueError):
        acc.add(c[0], r[0, :5])


def test_gate_never_holds_both_graphs_and_matches_resident_runners(fp16_artifact, tmp_path):
    """Given makers, the gate loads the reference, runs it, frees it, then the candidate: at
    most one runner is alive at a time. Its numbers equal those of two resident runners."""
    import gc
    import weakref

    from dsc.backends.onnxruntime.runner import OrtCausalLM
    from dsc.validate.gate import GateOptions, run_gate
    from dsc.validate.run import default_text

    dst = tmp_path / "int8"
    _candidate(fp16_artifact, dst, _int8_weights)
    io = json.loads((dst / "model_io.json").read_text())
    alive, peak, order = set(), [0], []

    def maker(path, name):
        def make():
            gc.collect()
            runner = OrtCausalLM(path, io)
            alive.add(name)
            peak[0] = max(peak[0], len(alive))
            order.append(name)
            weakref.finalize(runner, alive.discard, name)
            return runner

        return make

    opts = GateOptions(window=32, windows=3, decode_steps=3, prompts=2, gen_len=6, locate=False)
    tok = api.load_tokenizer(dst)
    text = default_text()
    streamed = run_gate(
        maker(dst / "model.onnx", "candidate"),
        maker(dst / "reference" / "model.onnx", "reference"),
        tok,
        text,
        precision="int8",
        options=opts,
        quiet=True,
    ).to_json()
    assert order == ["reference", "candidate"] and peak[0] == 1
    resident = run_gate(
        OrtCausalLM(dst / "model.onnx", io),
        OrtCausalLM(dst / "reference" / "model.onnx", io),
        tok,
        text,
        precision="int8",
        options=opts,
        quiet=True,
    ).to_json()
    for key in ("prefill", "decode", "perplexity", "greedy", "passed"):
        assert streamed[key] == resident[key], key
    assert 0 < streamed["prefill"]["kl_mean"] < 0.08 and streamed["passed"] is True


def test_gate_result_json_keys_in_validation_order():
    """`GateResult.to_json()` writes validation.json's keys in the order they always had: the
    gate's own, the locator's only when it ran, then `seconds`, then what the caller adds."""
    from dsc.validate.gate import GateResult

    r = GateResult(
        "int8",
        {"max_kl": 0.08},
        {"windows": 1},
        {"top1": 1.0},
        {"top1": 1.0},
        {"delta": 0.0},
        {"greedy_match": 1.0},
        [],
        True,
        seconds=1.5,
    )
    assert list(r.to_json()) == [
        "kind",
        "precision",
        "thresholds",
        "data",
        "prefill",
        "decode",
        "perplexity",
        "greedy",
        "failures",
        "passed",
        "seconds",
    ]
    r.layers, r.first_divergence = [{"tensor": "t"}], None
    r.extra.update(candidate="model.onnx", reference="reference/")
    doc = r.to_json()
    assert list(doc)[-5:] == ["layers", "first_divergence", "seconds", "candidate", "reference"]
    assert doc["kind"] == "gate" and doc["first_divergence"] is None


def test_gate_batches_its_runs_and_batched_greedy_equals_one_prompt_at_a_time(
    fp16_artifact, monkeypatch
):
    """The gate's forward passes per graph are `runs_per_graph`: the prefill windows share runs
    (up to `PREFILL_LOGITS_BYTES` of logits), and all greedy prompts decode as one left-padded
    batch, so the count does not grow with the number of prompts (at 1.5B on the CPU each run
    costs seconds). Batched greedy tokens equal those of one prompt at a time, and the prefill
    logits and NLL equal one window per run."""
    from dsc.backends.onnxruntime.runner import OrtCausalLM
    from dsc.validate import gate
    from dsc.validate.run import default_text

    runner = OrtCausalLM.from_artifact(fp16_artifact)
    calls = [0]
    step = runner.step

    def counting(*a):
        calls[0] += 1
        return step(*a)

    monkeypatch.setattr(runner, "step", counting)
    tok = api.load_tokenizer(fp16_artifact)
    text = default_text()
    opts = gate.GateOptions(window=32, windows=5, decode_steps=3, prompts=4, gen_len=6)
    ids = gate._windows(tok, text, opts.window, opts.windows)
    starts = gate._greedy_prompts(tok, text, opts.prompts)
    assert len(starts) == 4 and len({len(p) for p in starts}) > 1  # left padding is exercised
    ticks = []

    def advance(n=1, total=None):
        ticks.append((n, total))

    def run(spill):
        calls[0] = 0
        out = gate._run_graph(runner, ids, starts, opts, spill, advance)
        return out, calls[0]

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        batched, n_batched = run(Path(d) / "a.npy")
        vocab = batched.prefill.shape[-1]
        assert n_batched == gate.runs_per_graph(5, 32, vocab, opts) == 1 + 1 + 3 + 6
        assert sum(n for n, _ in ticks) == n_batched
        assert (0, 2 * n_batched) in ticks  # the bar's total, from the graph's vocabulary
        monkeypatch.setattr(gate, "PREFILL_LOGITS_BYTES", 1)  # one window a run
        single, n_single = run(Path(d) / "b.npy")
        assert n_single == 5 + 1 + 3 + 6
        np.testing.assert_allclose(
            np.asarray(batched.prefill, dtype=np.float32),
            np.asarray(single.prefill, dtype=np.float32),
            rtol=0,
            atol=2e-2,
        )
        np.testing.assert_allclose(batched.nll, single.nll, rtol=1e-3)
        one_by_one = [runner.generate([p], opts.gen_len)[0] for p in starts]
        assert batched.greedy == one_by_one
        del batched, single

"""Weights in `model.onnx.data`, as every real DeepSeek model has them, through every stage.

`--external-data` makes the tiny models take the paths of a model over 1.5 GiB: export writes the
weights beside the graph, and optimize, quantize (with its reference), calibration, compile,
the gate, `run`, `validate`, `bench`, `verify`, `inspect`, `report` and stage reuse all work on
such artifacts. Each family is built once; the trained models carry the accuracy gate.
Numerically, external data changes nothing: the same stages with weights inside the graph give
bit-identical logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from dsc.backends.tensorrt import Flavour, available_backends
from dsc.manifest import hash_tree, schema_errors, verify_artifact

from .conftest import run_cli

needs_rtx = pytest.mark.skipif(
    Flavour.RTX not in available_backends(),
    reason="tensorrt_rtx is not installed (pip install 'dsc[rtx]')",
)

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"
CALIB = ["--samples", "8", "--seq-len", "64"]
# (name, checkpoint: trained model dir or fixture family, precision flags, profile)
CASES = {
    "qwen2-int8": ("tiny-qwen2", ["--int8", *CALIB], "rtx-4090"),
    "v3-fp8": ("tiny-deepseek-v3", ["--fp8", *CALIB], "rtx-4090"),
    "llama-int4": ("llama", ["--int4-awq", *CALIB, "--validate", "smoke"], "a100-80gb"),
    "v2-fp16": ("deepseek_v2", [], "a100-80gb"),
}


def _checkpoint(name: str, checkpoints) -> Path:
    return MODELS / name if (MODELS / name).is_dir() else checkpoints[name]


def _external_only(onnx_path: Path) -> None:
    """Every initializer of more than 1 KiB lives in the data file beside the graph."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    inline = [
        t.name
        for t in proto.graph.initializer
        if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) > 1024
    ]
    assert not inline, inline[:5]
    locations = {
        e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"
    }
    assert locations == {f"{onnx_path.name}.data"}
    data = onnx_path.with_name(f"{onnx_path.name}.data")
    assert data.stat().st_size > 0 and data.stat().st_nlink == 1


@pytest.fixture(scope="module")
def builds(tmp_path_factory, checkpoints) -> dict[str, Path]:
    from dsc.cli import main

    root = tmp_path_factory.mktemp("ext")
    out = {}
    for name, (ckpt, flags, profile) in CASES.items():
        art = root / name
        try:
            main(
                [
                    "build",
                    str(_checkpoint(ckpt, checkpoints)),
                    "--external-data",
                    "--profile",
                    profile,
                    *flags,
                    "-o",
                    str(art),
                    "-q",
                ]
            )
        except SystemExit as e:
            assert e.code in (0, None), (name, e)
        out[name] = art
    return out


@needs_rtx
@pytest.mark.parametrize("name", list(CASES))
def test_every_family_builds_with_external_data(builds, name):
    art = builds[name]
    _, flags, profile = CASES[name]
    m = json.loads((art / "manifest.json").read_text())
    assert not schema_errors(m) and verify_artifact(art).ok
    assert m["stages"]["export"]["inputs"]["external_data"] is True
    _external_only(art / "model.onnx")
    quantized = bool(flags) and flags[0] != "--validate"
    if quantized:
        _external_only(art / "reference" / "model.onnx")
        assert m["stages"]["quantize"]["status"] == "ran"
    assert {"model.onnx", "model.onnx.data"} <= set(m["graph"]["files"])
    assert (art / "engines" / profile / "model.engine").stat().st_size > 0
    v = m["validation"]
    if "--validate" in flags or not quantized:
        assert v["kind"] == "smoke" and v["passed"] is True
    else:
        assert v["kind"] == "gate" and v["passed"] is True
        assert abs(v["perplexity_delta"]) < 0.02 and v["top1_prefill"] > 0.9
    for stage in ("export", "optimize", "validate"):
        assert m["stages"][stage]["peak_rss_bytes"] > 0, stage


@needs_rtx
@pytest.mark.parametrize("name", ["qwen2-int8", "v2-fp16"])
def test_commands_on_an_external_data_artifact(builds, name, tmp_path, capsys):
    art = tmp_path / name
    shutil.copytree(builds[name], art)
    code, out, err = run_cli(
        ["run", str(art), "--prompt", "In the beginning", "--max-new-tokens", "4"], capsys
    )
    assert code == 0 and out.startswith("In the beginning"), err
    code, out, err = run_cli(["verify", str(art)], capsys)
    assert code == 0 and out.startswith("OK:"), err
    code, out, err = run_cli(["inspect", str(art), "--json"], capsys)
    summary = json.loads(out) if code == 0 else {}
    assert summary.get("files", 0) >= 5, err
    assert summary["bytes"] >= (art / "model.onnx.data").stat().st_size
    code, out, err = run_cli(
        ["bench", str(art), "--batch", "1", "--prompt-len", "8", "--gen-len", "2"], capsys
    )
    assert code == 0, err
    if name == "qwen2-int8":
        code, out, err = run_cli(["validate", str(art)], capsys)
        assert code == 0 and "PASS" in out, (out, err)
    code, out, err = run_cli(["report", str(art)], capsys)
    assert code == 0, err
    assert verify_artifact(art).ok
    _external_only(art / "model.onnx")


@needs_rtx
def test_rebuild_reuses_external_data_without_hard_links(builds, tmp_path, checkpoints, capsys):
    ckpt, flags, profile = CASES["qwen2-int8"]
    art = tmp_path / "art"
    shutil.copytree(builds["qwen2-int8"], art)
    argv = [
        "build",
        str(_checkpoint(ckpt, checkpoints)),
        "--external-data",
        *flags,
        "-o",
        str(art),
        "-q",
        "--json",
    ]
    before = hash_tree(art)
    code, out, err = run_cli([*argv, "--profile", profile], capsys)
    assert code == 0 and json.loads(out)["up_to_date"] is True, err
    assert hash_tree(art) == before
    # Another profile: the graph stages are reused (their files carried over), one compile runs.
    keep = tmp_path / "before"
    shutil.copytree(art, keep)
    code, out, err = run_cli([*argv, "--profile", f"{profile},a100-80gb"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert {k: v["status"] for k, v in d["stages"].items() if k != "compile"} == {
        "export": "reused",
        "optimize": "reused",
        "quantize": "reused",
        "validate": "reused",
    }
    assert d["stages"]["compile"]["profiles"] == {profile: "reused", "a100-80gb": "ran"}
    for rel in ("model.onnx.data", "reference/model.onnx.data"):
        assert (art / rel).stat().st_nlink == 1 and (keep / rel).stat().st_nlink == 1
        assert (art / rel).read_bytes() == (keep / rel).read_bytes()
    assert verify_artifact(art).ok
    _external_only(art / "model.onnx")


def _logits(art: Path, ids: np.ndarray) -> np.ndarray:
    from dsc.backends.onnxruntime.runner import OrtCausalLM

    runner = OrtCausalLM.from_artifact(art)
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    return runner.step(ids, mask, pos, runner.empty_past(ids.shape[0])).logits


def test_external_data_changes_no_number(checkpoints, tmp_path, capsys):
    """export -> optimize -> quantize, with and without --external-data, on the MLA + MoE
    family: bit-identical logits, identical calibration ranges."""
    ids = np.array([[5, 17, 99, 3, 42, 7], [8, 8, 1, 250, 31, 64]], dtype=np.int64)
    arts = {}
    for ext in (False, True):
        flag = ["--external-data"] if ext else []
        base = tmp_path / ("ext" if ext else "inline")
        steps = [
            [
                "export",
                str(checkpoints["deepseek_v3"]),
                "--dtype",
                "fp16",
                *flag,
                "-o",
                str(base / "e"),
            ],
            ["optimize", str(base / "e"), "-o", str(base / "o"), "--profile", "rtx-4090"],
            ["quantize", str(base / "o"), "-o", str(base / "q"), "--int8", *CALIB],
        ]
        for argv in steps:
            code, _, err = run_cli(argv, capsys)
            assert code == 0, (argv, err)
        arts[ext] = base
    for stage in ("e", "o", "q"):
        inline, ext = arts[False] / stage, arts[True] / stage
        assert not (inline / "model.onnx.data").exists()
        _external_only(ext / "model.onnx")
        assert verify_artifact(ext).ok
        a, b = _logits(inline, ids), _logits(ext, ids)
        assert np.isfinite(a).all() and np.array_equal(a, b), stage
    r_inline = json.loads((arts[False] / "q" / "calibration" / "ranges.json").read_text())
    r_ext = json.loads((arts[True] / "q" / "calibration" / "ranges.json").read_text())
    assert r_inline["ranges"] == r_ext["ranges"] and r_inline["ranges"]
    assert r_inline["model_sha256"] == r_ext["model_sha256"]


def test_calibration_spills_large_in_memory_weights_to_a_file(checkpoints, tmp_path, monkeypatch):
    """A model holding more in-memory weights than protobuf can pass (here: any) reaches ONNX
    Runtime through a temporary file, with the same statistics."""
    import onnx_ir as ir

    from dsc import api
    from dsc.backends.onnxruntime import runner
    from dsc.passes.quant import calibrate

    art = tmp_path / "e"
    api.export(checkpoints["qwen2"], art, dtype="fp16", progress=lambda m: None)
    io = json.loads((art / "model_io.json").read_text())
    windows = np.arange(2 * 16, dtype=np.int64).reshape(2, 16) % 200
    model = ir.load(art / "model.onnx")
    plain = calibrate.collect(model, io, windows, use_cache=False)
    saved = []
    real_save = ir.save
    monkeypatch.setattr(runner, "_IN_MEMORY_LIMIT", 0)
    monkeypatch.setattr(
        ir, "save", lambda m, p, **kw: (saved.append(Path(p)), real_save(m, p, **kw))[1]
    )
    spilled = calibrate.collect(model, io, windows, use_cache=False)
    assert saved and saved[0].name == "graph.onnx" and not saved[0].parent.exists()
    assert plain.acts.keys() == spilled.acts.keys() and plain.acts
    for k, s in plain.acts.items():
        assert np.array_equal(s.absmax, spilled.acts[k].absmax), k
        assert np.array_equal(s.hist, spilled.acts[k].hist), k


def test_verify_each_and_calibration_key_with_external_weights(
    checkpoints, tmp_path, capsys, monkeypatch
):
    """`--verify-each` runs every pass's graph in ONNX Runtime with the weights external; two
    graphs that differ only in one external weight's bytes get different calibration keys, and
    the key reads external weights in chunks, never mapping or copying a tensor whole (the
    inline graph's key equals the external one's: `test_external_data_changes_no_number`)."""
    import onnx_ir as ir

    from dsc import api
    from dsc.passes.quant.calibrate import model_sha256

    art = tmp_path / "e"
    api.export(checkpoints["llama"], art, dtype="fp32", external_data=True, progress=lambda m: None)
    code, _, err = run_cli(
        [
            "optimize",
            str(art),
            "-o",
            str(tmp_path / "o"),
            "--verify-each",
            "--dump-after",
            "fuse-rmsnorm",
        ],
        capsys,
    )
    assert code == 0, err
    _external_only(tmp_path / "o" / "model.onnx")
    dumps = list((tmp_path / "o" / "dumps").glob("*.onnx"))
    assert len(dumps) == 1 and dumps[0].with_name(dumps[0].name + ".data").is_file()
    _ = ir.load(dumps[0]).graph.initializers  # the dump's weights resolve from dumps/
    assert verify_artifact(tmp_path / "o").ok
    with monkeypatch.context() as m:
        m.setattr(ir.ExternalTensor, "_load", lambda self: pytest.fail(f"{self.name} loaded"))
        first = model_sha256(ir.load(art / "model.onnx"))
    data = art / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    assert model_sha256(ir.load(art / "model.onnx")) != first


def _held_deleted(directory: Path) -> list[str]:
    """Files under `directory` this process still holds open or mapped after their deletion."""
    import os

    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)) and target.endswith("(deleted)"):
            held.append(target)
    with open("/proc/self/maps") as maps:
        held += [ln.split()[-2] for ln in maps if str(directory) in ln and "(deleted)" in ln]
    return held


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc")
def test_rewriting_the_graph_lets_go_of_the_old_data_file(checkpoints, tmp_path):
    """`write_graph` replaces model.onnx.data; the old file's memory maps are closed even while
    the old model is still referenced (onnxscript's pattern matchers keep the last graph they
    matched: at 7B the replaced 15 GB file stayed on disk through the build). Fails without
    the release: the maps of the weights read before the write point at a deleted file."""
    import onnx_ir as ir

    from dsc import api
    from dsc.artifacts import write_graph

    art = tmp_path / "art"
    api.export(checkpoints["qwen2"], art, dtype="fp16", external_data=True, progress=lambda m: 0)
    model = ir.load(art / "model.onnx")
    before = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    mapped = [
        v for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)
    ]
    assert len(mapped) > 10 and _held_deleted(art) == []
    write_graph(model, art, "model.onnx", external=True)
    assert _held_deleted(art) == []  # `model` is still alive here
    reloaded = ir.load(art / "model.onnx")
    for name, value in reloaded.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), before[name])
    del model


def test_quantize_move_input_renames_the_weights_instead_of_copying(
    checkpoints, tmp_path, capsys, monkeypatch
):
    """`dsc quantize --move-input`: the new artifact equals a copying quantize's file for file,
    its `reference/` data file is the input's own inode (renamed, never copied: no second copy
    on disk, 31 GB at DeepSeek-V2-Lite), and the input artifact is gone. A failure as late as
    the final swap moves the file back and leaves the input whole."""
    import os

    from dsc import api

    e = tmp_path / "e"
    api.export(checkpoints["deepseek_v3"], e, dtype="fp16", external_data=True)
    keep = tmp_path / "keep"
    shutil.copytree(e, keep)
    code, _, err = run_cli(
        ["quantize", str(keep), "-o", str(tmp_path / "qc"), "--int8", *CALIB], capsys
    )
    assert code == 0, err
    before = hash_tree(e)
    inode = (e / "model.onnx.data").stat().st_ino
    qm = tmp_path / "qm"
    argv = ["quantize", str(e), "-o", str(qm), "--int8", *CALIB, "--move-input"]

    # The swap of the finished artifact into place fails: the weights go back.
    real_replace = os.replace

    def failing_swap(src, dst):
        if Path(dst) == qm.absolute():
            raise OSError(5, "injected failure of the final swap")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_swap)
    code, _, err = run_cli(argv, capsys)
    monkeypatch.setattr(os, "replace", real_replace)
    assert code != 0 and "injected failure" in err
    assert hash_tree(e) == before and (e / "model.onnx.data").stat().st_ino == inode
    assert not qm.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["e", "keep", "qc"]

    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "removed" in out and not e.exists()
    data = qm / "reference" / "model.onnx.data"
    assert data.stat().st_ino == inode and data.stat().st_nlink == 1
    assert verify_artifact(qm).ok
    # The report's timings, the manifest's and ranges.json's cache_hit (the second run reads
    # the first's statistics) are the only differences.
    skip = ("quant_report.json", "manifest.json", "calibration/ranges.json")
    copied, moved = hash_tree(tmp_path / "qc"), hash_tree(qm)
    assert {k: v for k, v in moved.items() if k not in skip} == {
        k: v for k, v in copied.items() if k not in skip
    }
    ranges = [
        json.loads((a / "calibration" / "ranges.json").read_text()) for a in (qm, tmp_path / "qc")
    ]
    assert all(ranges[0].pop("cache_hit")) and not any(ranges[1].pop("cache_hit"))
    assert ranges[0] == ranges[1]
    assert "reference/model.onnx.data" in moved
    _external_only(qm / "model.onnx")
    _external_only(data.parent / "model.onnx")


def test_quantize_refuses_an_output_it_cannot_move_into(checkpoints, tmp_path, capsys, monkeypatch):
    """An output inside the input artifact is refused (exit 3) before any work, and so, with
    --move-input, is one on another filesystem (a rename cannot cross it)."""
    import os
    from types import SimpleNamespace

    from dsc import api
    from dsc.stages import quantize as stage

    e = tmp_path / "e"
    api.export(checkpoints["qwen2"], e, dtype="fp16", external_data=True)
    capsys.readouterr()
    before = hash_tree(e)
    code, _, err = run_cli(
        ["quantize", str(e), "-o", str(e / "q"), "--int8", "--move-input"], capsys
    )
    assert code == 3 and "inside the input artifact" in err and err.count("\n") == 1
    assert hash_tree(e) == before
    real_stat = os.stat
    monkeypatch.setattr(
        stage.os,
        "stat",
        lambda p, **kw: SimpleNamespace(st_dev=real_stat(p, **kw).st_dev + (Path(p) != e)),
    )
    with pytest.raises(api.BadInput, match="another filesystem"):
        stage.check_same_filesystem(e, tmp_path / "new" / "q")
    monkeypatch.setattr(stage.os, "stat", real_stat)
    stage.check_same_filesystem(e, tmp_path / "new" / "q")


def test_optimize_reads_the_input_weights_where_they_are(
    checkpoints, tmp_path, capsys, monkeypatch
):
    """`dsc optimize` copies the input's small files, never its data file: the passes read the
    weights from the input artifact and write the new data file (a copy first held the input's
    bytes on disk a third time; DeepSeek-V2-Lite's optimize ran out of 80 GB). The input is
    unchanged and the output's logits equal an optimize of the same graph with inline
    weights (`test_external_data_changes_no_number` covers the numbers at every stage)."""
    from dsc import api

    e = tmp_path / "e"
    api.export(checkpoints["deepseek_v3"], e, dtype="fp16", external_data=True)
    before = hash_tree(e)
    copied = []
    real_copy2 = shutil.copy2
    monkeypatch.setattr(
        shutil, "copy2", lambda a, b, **kw: (copied.append(Path(a).name), real_copy2(a, b, **kw))[1]
    )
    code, _, err = run_cli(
        ["optimize", str(e), "-o", str(tmp_path / "o"), "--profile", "rtx-4090"], capsys
    )
    assert code == 0, err
    assert copied and "model.onnx.data" not in copied and "model.onnx" in copied
    assert hash_tree(e) == before
    o = tmp_path / "o"
    _external_only(o / "model.onnx")
    assert verify_artifact(o).ok
    m = json.loads((o / "manifest.json").read_text())
    assert m["stages"]["optimize"]["nodes_after"] < m["stages"]["optimize"]["nodes_before"]
    ids = np.array([[5, 17, 99, 3, 42, 7]], dtype=np.int64)
    a, b = _logits(e, ids), _logits(o, ids)
    assert np.isfinite(b).all() and np.abs(a - b).max() < 5e-2 * np.abs(a).max()

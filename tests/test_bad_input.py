"""Bad input: one line on stderr, the documented exit code, nothing left in the output path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsc.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OUTPUT_CONFLICT,
    EXIT_UNSUPPORTED,
)
from dsc.models.families import supported_architectures

from .conftest import run_cli

LATE = {"after_progress": True}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_clean(parent: Path, out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, f"temporary directories left behind: {leftovers}"


def _export_fails(
    argv_ckpt: Path, tmp_path: Path, capsys, *extra: str, after_progress: bool = False
) -> tuple[int, str]:
    """Run `dsc export`; expect one `dsc: error:` line and a clean output path.

    `after_progress`: the error is found while the weights are read, so `[dsc] ...` progress lines
    may come first; nothing else may (no warnings, no transformers load report).
    """
    out = tmp_path / "out"
    code, stdout, err = run_cli(["export", str(argv_ckpt), "-o", str(out), *extra], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if after_progress:
        assert all(ln.startswith("[dsc] ") for ln in lines[:-1]), f"unexpected output: {err!r}"
        lines = lines[-1:]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert lines[0].startswith("dsc: error: ")
    assert "Traceback" not in err
    _assert_clean(tmp_path, out)
    return code, lines[0]


def test_missing_directory(tmp_path, capsys):
    code, msg = _export_fails(tmp_path / "nope", tmp_path, capsys)
    assert code == EXIT_BAD_INPUT
    assert "not found" in msg


def test_missing_config(tmp_path, checkpoints, capsys):
    ckpt = _copy(checkpoints["llama"], tmp_path / "ckpt")
    (ckpt / "config.json").unlink()
    code, msg = _export_fails(ckpt, tmp_path, capsys)
    assert code == EXIT_BAD_INPUT
    assert "missing config.json" in msg


def test_invalid_config(tmp_path, checkpoints, capsys):
    ckpt = _copy(checkpoints["llama"], tmp_path / "ckpt")
    (ckpt / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    code, msg = _export_fails(ckpt, tmp_path, capsys)
    assert code == EXIT_BAD_INPUT
    assert "invalid config.json" in msg


def test_unsupported_architecture_lists_supported(tmp_path, checkpoints, capsys):
    ckpt = _copy(checkpoints["llama"], tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    code, msg = _export_fails(ckpt, tmp_path, capsys)
    assert code == EXIT_UNSUPPORTED
    assert "GPT2LMHeadModel" in msg
    for arch in supported_architectures():
        assert arch in msg


def test_pickle_only_checkpoint_is_refused_unless_allowed(tmp_path, checkpoints, capsys):
    import torch
    from safetensors.torch import load_file

    ckpt = _copy(checkpoints["llama"], tmp_path / "ckpt")
    weights = load_file(ckpt / "model.safetensors")
    torch.save(weights, ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    code, msg = _export_fails(ckpt, tmp_path, capsys)
    assert code == EXIT_BAD_INPUT
    assert "pickle" in msg and "--allow-pickle" in msg

    out = tmp_path / "allowed"
    code, stdout, err = run_cli(
        ["export", str(ckpt), "-o", str(out), "--allow-pickle", "--dtype", "fp32"], capsys
    )
    assert code == 0, err
    assert (out / "model.onnx").is_file()


def test_truncated_safetensors(tmp_path, checkpoints, capsys):
    ckpt = _copy(checkpoints["deepseek_v3"], tmp_path / "ckpt")
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    code, msg = _export_fails(ckpt, tmp_path, capsys)
    assert code == EXIT_BAD_INPUT
    assert "truncated" in msg and "model.safetensors" in msg


def test_garbage_safetensors_header(tmp_path, checkpoints, capsys):
    ckpt = _copy(checkpoints["qwen2"], tmp_path / "ckpt")
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    code, msg = _export_fails(ckpt, tmp_path, capsys)
    assert code == EXIT_BAD_INPUT
    assert "corrupt safetensors" in msg


def test_output_path_with_foreign_content_is_left_alone(tmp_path, checkpoints, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, stdout, err = run_cli(["export", str(checkpoints["llama"]), "-o", str(out)], capsys)
    assert code == EXIT_OUTPUT_CONFLICT
    assert err.strip().startswith("dsc: error: ") and len(err.strip().splitlines()) == 1
    assert "not a dsc artifact" in err
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"


def test_output_path_that_is_a_file(tmp_path, checkpoints, capsys):
    out = tmp_path / "out"
    out.write_text("x")
    code, _, err = run_cli(["export", str(checkpoints["llama"]), "-o", str(out)], capsys)
    assert code == EXIT_OUTPUT_CONFLICT
    assert out.read_text() == "x"


def test_existing_artifact_needs_force(tmp_path, checkpoints, exported, capsys):
    out = tmp_path / "art"
    shutil.copytree(exported["qwen2"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run_cli(["export", str(checkpoints["llama"]), "-o", str(out)], capsys)
    assert code == EXIT_OUTPUT_CONFLICT
    assert "--force" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    code, _, err = run_cli(
        ["export", str(checkpoints["llama"]), "-o", str(out), "--force", "--dtype", "fp32"], capsys
    )
    assert code == 0, err
    assert json.loads((out / "model_io.json").read_text())["family"] == "llama"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art.")]


def test_failure_midway_leaves_nothing(tmp_path, checkpoints, monkeypatch, capsys):
    """A crash (or Ctrl-C) after files were written inside the temp dir leaves no trace."""
    import dsc.export.onnx_export as ex

    def boom(info, out_dir, **kw):
        (out_dir / "model.onnx").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "export_graph", boom)
    out = tmp_path / "out"
    code, _, err = run_cli(["export", str(checkpoints["llama"]), "-o", str(out)], capsys)
    assert code == EXIT_INTERRUPTED
    _assert_clean(tmp_path, out)


def test_run_on_a_non_artifact(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    code, _, err = run_cli(["run", str(tmp_path / "d"), "--prompt", "hi"], capsys)
    assert code == EXIT_BAD_INPUT
    assert "not a dsc artifact" in err


def test_usage_error_exit_code(capsys):
    code, _, err = run_cli(["export"], capsys)
    assert code == 2
    assert "Missing argument" in err


@pytest.mark.parametrize("argv", [["--help"], ["export", "--help"]])
def test_help_needs_no_heavy_imports(argv):
    """`dsc --help` must not import torch, onnxruntime or TensorRT."""
    code = (
        "import sys; from dsc.cli import main\n"
        f"try: main({argv!r})\n"
        "except SystemExit: pass\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'tensorrt', 'tensorrt_rtx', 'transformers')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# --- published checkpoints: quantization, shards, tensors, numbers -----------------------------


def _edit_config(ckpt: Path, **fields) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(fields)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(ckpt: Path, edit) -> None:
    """Apply `edit(dict of tensors)` to each safetensors file of `ckpt`."""
    from safetensors.torch import load_file, save_file

    for f in sorted(ckpt.glob("*.safetensors")):
        tensors = load_file(f)
        edit(tensors)
        save_file(tensors, f, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "quant",
    [
        {"quant_method": "gptq", "bits": 4, "group_size": 128},
        {"quant_method": "awq", "bits": 4, "version": "gemm"},
        {"quant_method": "compressed-tensors", "format": "pack-quantized"},
        {"quant_method": "bitsandbytes", "load_in_4bit": True},
        {"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]},
        {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": None},
        {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "static",
            "weight_block_size": [128, 128],
        },
    ],
    ids=lambda q: "-".join(str(v) for v in q.values())[:40],
)
def test_other_quantization_is_refused_before_loading(tmp_path, checkpoints, capsys, quant):
    ckpt = _copy(checkpoints["llama"], tmp_path / "ckpt")
    _edit_config(ckpt, quantization_config=quant)
    code, msg = _export_fails(ckpt, tmp_path, capsys)  # no progress line: refused at inspection
    assert code == EXIT_UNSUPPORTED
    assert repr(quant["quant_method"]) in msg or "fp8" in msg.lower()
    if quant["quant_method"] != "fp8":
        assert quant["quant_method"] in msg


@pytest.mark.parametrize(
    "shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../outside.safetensors"]
)
def test_index_naming_a_shard_outside_the_checkpoint(tmp_path, checkpoints, capsys, shard):
    from dsc.fixtures import write_sharded

    ckpt = write_sharded(checkpoints["llama"], tmp_path / "ckpt")
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    index_path.write_text(json.dumps(index))
    (tmp_path / "outside.safetensors").write_bytes(
        (ckpt / "model-00001-of-00002.safetensors").read_bytes()
    )
    code, msg = _export_fails(ckpt, tmp_path, capsys)
    assert code == EXIT_BAD_INPUT
    assert "outside the checkpoint directory" in msg and shard in msg


@pytest.mark.parametrize(
    "family,name",
    [
        ("deepseek_v3", "model.layers.1.post_attention_layernorm.weight"),
        ("fp8", "model.layers.2.mlp.experts.4.down_proj.weight"),
    ],
)
def test_nan_in_a_weight_is_named(tmp_path, checkpoints, fp8_checkpoint, capsys, family, name):
    import torch

    src = fp8_checkpoint if family == "fp8" else checkpoints[family]
    ckpt = _copy(src, tmp_path / "ckpt")

    def poison(tensors):
        if name in tensors:
            t = tensors[name].clone()
            if t.dtype == torch.float8_e4m3fn:
                t.view(torch.uint8).view(-1)[3] = 0x7F  # E4M3's NaN code
            else:
                t[0] = float("nan")
            tensors[name] = t

    _edit_tensors(ckpt, poison)
    code, msg = _export_fails(ckpt, tmp_path, capsys, **LATE)
    assert code == EXIT_BAD_INPUT
    assert name in msg and "NaN" in msg


@pytest.mark.parametrize(
    "family,name",
    [
        ("llama", "model.layers.1.post_attention_layernorm.weight"),
        ("deepseek_v3", "model.layers.1.mlp.experts.3.up_proj.weight"),  # one of 16 fused experts
        ("fp8", "model.layers.0.self_attn.kv_b_proj.weight"),
    ],
)
def test_missing_tensor_is_named(tmp_path, checkpoints, fp8_checkpoint, capsys, family, name):
    src = fp8_checkpoint if family == "fp8" else checkpoints[family]
    ckpt = _copy(src, tmp_path / "ckpt")

    def drop(tensors):
        tensors.pop(name, None)
        tensors.pop(name + "_scale_inv", None)

    _edit_tensors(ckpt, drop)
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {
            k: v for k, v in data["weight_map"].items() if k not in (name, name + "_scale_inv")
        }
        index.write_text(json.dumps(data))
    code, msg = _export_fails(ckpt, tmp_path, capsys, **LATE)
    assert code == EXIT_BAD_INPUT
    assert "lacks 1 tensor" in msg and name in msg


def test_unexpected_tensor_is_named(tmp_path, checkpoints, capsys):
    import torch

    ckpt = _copy(checkpoints["llama"], tmp_path / "ckpt")
    name = "model.layers.0.self_attn.extra_proj.weight"
    _edit_tensors(ckpt, lambda t: t.update({name: torch.zeros(4, 4)}))
    code, msg = _export_fails(ckpt, tmp_path, capsys, **LATE)
    assert code == EXIT_BAD_INPUT
    assert name in msg and "no place for" in msg


def test_fp8_tensor_without_its_scale(tmp_path, fp8_checkpoint, capsys):
    ckpt = _copy(fp8_checkpoint, tmp_path / "ckpt")
    name = "model.layers.0.self_attn.o_proj.weight"
    _edit_tensors(ckpt, lambda t: t.pop(name + "_scale_inv", None))
    code, msg = _export_fails(ckpt, tmp_path, capsys)
    assert code == EXIT_BAD_INPUT
    assert f"{name} " in msg and "_scale_inv" in msg


def test_fp16_overflow_of_a_weight_suggests_bf16(tmp_path, checkpoints, capsys):
    ckpt = _copy(checkpoints["llama"], tmp_path / "ckpt")
    name = "model.layers.0.input_layernorm.weight"
    _edit_tensors(ckpt, lambda t: t.update({name: t[name] * 0 + 1e5}))
    code, msg = _export_fails(ckpt, tmp_path, capsys, "--dtype", "fp16", **LATE)
    assert code == EXIT_BAD_INPUT
    assert name in msg and "--dtype bf16" in msg


def test_fp16_overflow_of_activations_suggests_bf16(tmp_path, checkpoints, capsys):
    """Every weight fits fp16, but DeepSeek-V2's routed_scaling_factor pushes the residual
    stream past 65504 (here 1e6; the real V2 uses 16 on much larger activations)."""
    ckpt = _copy(checkpoints["deepseek_v2"], tmp_path / "ckpt")
    _edit_config(ckpt, routed_scaling_factor=1e6)
    code, msg = _export_fails(ckpt, tmp_path, capsys, "--dtype", "fp16", **LATE)
    assert code == EXIT_BAD_INPUT
    assert "overflows" in msg and "--dtype bf16" in msg


def test_the_executable_exits_fast_after_running_exit_functions(tmp_path):
    """`dsc.cli.fast_exit` (what the `dsc` executable ends with): the exit code, what was
    printed, the `atexit` functions and a live `TemporaryDirectory`'s cleanup all happen, with
    no interpreter teardown; with another thread alive it exits normally, after that thread."""
    code = f"""
import atexit, sys, tempfile, threading, time
from pathlib import Path
from dsc.cli import fast_exit
out = Path({str(tmp_path)!r})
atexit.register(lambda: (out / "atexit").write_text("ran"))
keep = tempfile.TemporaryDirectory(dir=out, prefix="live-")
if sys.argv[1] == "thread":
    threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("done"))).start()
print("last words", end="")
fast_exit(7)
"""
    for mode in ("alone", "thread"):
        r = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True)
        assert r.returncode == 7, r.stderr
        assert r.stdout == "last words"
        assert (tmp_path / "atexit").read_text() == "ran"
        assert not list(tmp_path.glob("live-*"))
        (tmp_path / "atexit").unlink()
    assert (tmp_path / "thread").read_text() == "done"
    # the executable's way in: `python -m dsc` (the `dsc` script calls the same `entry`)
    r = subprocess.run([sys.executable, "-m", "dsc", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "version" in r.stdout, r
    r = subprocess.run(
        [sys.executable, "-m", "dsc", "export", str(tmp_path / "none"), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 3 and r.stderr.startswith("dsc: error: "), r
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [["passes", "list"], ["profiles", "list", "--json"]])
def test_a_closed_stdout_exits_141_quietly(command):
    """`dsc ... | head -1`: the reader closes stdout before dsc has written; dsc prints nothing
    more (no "internal error", no traceback) and exits 141, as a process killed by SIGPIPE."""
    p = subprocess.Popen(
        [sys.executable, "-m", "dsc", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    p.stdout.close()
    stderr = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, stderr
    assert stderr == ""
    # with a reader that reads everything, the same command succeeds
    r = subprocess.run([sys.executable, "-m", "dsc", *command], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout and r.stderr == "", r


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["passes", "list", "-v"], "-v goes before the command: dsc -v passes list ..."),
        (
            ["export", "x", "-o", "y", "--verbose"],
            "--verbose goes before the command: dsc -v export",
        ),
        (["export", "x", "-o", "y", "-vv"], "-v goes before the command: dsc -v export"),
    ],
)
def test_verbose_after_the_command_says_where_it_goes(argv, want, capsys):
    """`-v` is the group's option; given after a command it is a usage error (exit 2) whose
    one line says where it goes, where click would suggest an unrelated option."""
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == "", (code, out)
    assert err.strip() == f"dsc: error: {want}" or err.startswith(f"dsc: error: {want}"), err
    assert len(err.strip().splitlines()) == 1, err


def test_verbose_leaves_the_onnx_libraries_info_lines_to_vv(tmp_path, checkpoints, capsys):
    """`dsc -v export` shows dsc's own INFO lines, not onnx_ir's (one per merged
    initializer); `-vv` shows those too."""
    import logging

    from dsc.cli import QUIET_AT_V

    src = checkpoints["qwen2"]
    for flags, quiet in (["-v"], True), (["-vv"], False):
        code, _, _ = run_cli([*flags, "export", str(src), "-o", str(tmp_path / flags[0])], capsys)
        assert code == 0
        for name in QUIET_AT_V:  # their own level; at -vv the root's (-vv: DEBUG) applies
            level = logging.getLogger(name).level
            assert level == (logging.WARNING if quiet else logging.NOTSET), (flags, name, level)

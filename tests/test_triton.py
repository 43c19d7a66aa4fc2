"""The Triton model repository: config.pbtxt parsed with Triton's own protobuf (tritonclient),
and the Python-backend model's request → streamed text path.

`triton_python_backend_utils` exists only inside tritonserver: `_FakePbUtils` below is a STUB
with the few names model.py uses (Tensor, InferenceResponse, TritonError,
get_input_tensor_by_name, TRITONSERVER_RESPONSE_COMPLETE_FINAL); the engine runs on the
STAND-IN runtime (ONNX Runtime behind the TensorRT API, not TensorRT).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from dsc import api
from dsc.backends.onnxruntime.runner import OrtCausalLM
from dsc.backends.tensorrt import Flavour, ShapeEnvelope, available_backends
from dsc.runtime import standin
from dsc.runtime.triton import parse_config, write_repository
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
ENVELOPE = ShapeEnvelope(max_batch=2, max_input_len=24, max_kv=40, max_num_tokens=48)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "v3-fp16"
    api.export(
        REPO / "examples/models/tiny-deepseek-v3", out, dtype="fp16", progress=lambda m: None
    )
    standin.install_engine(out, "l4", ENVELOPE, sm=89)
    return out


def test_config_parses_with_tritons_protobuf(artifact, tmp_path):
    r = write_repository(artifact, tmp_path / "repo", runtime="standin")
    assert r.models == ["dsc_l4"] and r.command == f"tritonserver --model-repository={r.path}"
    c = parse_config(r.path / "dsc_l4" / "config.pbtxt")
    assert c.name == "dsc_l4" and c.backend == "python"
    assert c.max_batch_size == 2
    assert c.model_transaction_policy.decoupled is True
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in c.input] == [
        ("text_input", 13, [1], False),
        ("max_tokens", 8, [1], True),
    ]  # TYPE_STRING, TYPE_INT32
    assert [(o.name, o.data_type) for o in c.output] == [("text_output", 13)]
    p = {k: v.string_value for k, v in c.parameters.items()}
    assert (p["max_input_len"], p["max_kv"], p["profile"]) == ("24", "40", "l4")
    assert c.instance_group[0].kind == 1  # KIND_GPU
    v = r.path / "dsc_l4" / "1"
    assert {"model.py", "model.engine", "model_io.json", "tokenizer.json", "dsc_model.json"} <= {
        f.name for f in v.iterdir()
    }


class _Sender:
    def __init__(self):
        self.responses, self.final = [], 0

    def send(self, response=None, flags=0):
        if response is not None:
            self.responses.append(response)
        if flags:
            self.final += 1


class _Request:
    def __init__(self, text, max_tokens=None):
        self.inputs = {"text_input": np.array([text.encode()], dtype=object)}
        if max_tokens is not None:
            self.inputs["max_tokens"] = np.array([max_tokens], dtype=np.int32)
        self.sender = _Sender()

    def get_response_sender(self):
        return self.sender


def _fake_pb_utils():
    """STUB of triton_python_backend_utils: only what model.py calls."""
    m = types.ModuleType("triton_python_backend_utils")
    m.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    class Tensor:
        def __init__(self, name, array):
            self.name, self._a = name, array

        def as_numpy(self):
            return self._a

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.output_tensors, self.error = output_tensors or [], error

    class TritonError:
        def __init__(self, msg):
            self.msg = msg

    def get_input_tensor_by_name(request, name):
        a = request.inputs.get(name)
        return None if a is None else Tensor(name, a)

    m.Tensor, m.InferenceResponse, m.TritonError = Tensor, InferenceResponse, TritonError
    m.get_input_tensor_by_name = get_input_tensor_by_name
    return m


def _load_model_py(path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    spec = importlib.util.spec_from_file_location("dsc_triton_model_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_model_streams_the_engines_greedy_tokens(artifact, tmp_path, monkeypatch):
    """Two requests in one execute: each gets its own text, piece by piece, then one final
    flag; the text is the tokenizer's decoding of OrtCausalLM's greedy tokens."""
    r = write_repository(artifact, tmp_path / "repo", runtime="standin")
    model_dir = r.path / "dsc_l4"
    mod = _load_model_py(model_dir / "1" / "model.py", monkeypatch)
    m = mod.TritonPythonModel()
    config = json.dumps(
        {
            "parameters": {
                k: {"string_value": v.string_value}
                for k, v in parse_config(model_dir / "config.pbtxt").parameters.items()
            }
        }
    )
    m.initialize({"model_repository": str(model_dir), "model_version": "1", "model_config": config})
    reqs = [
        _Request("In the beginning God", 8),
        _Request("And the earth", 5),
        _Request("x " * 30, 4),
        _Request("Let there be light", 39),
    ]
    assert m.execute(reqs) is None
    tok = api.load_tokenizer(artifact)
    ort = OrtCausalLM.from_artifact(artifact)
    for req, n in zip(reqs[:2], (8, 5), strict=False):
        pieces = [resp.output_tensors[0].as_numpy()[0].decode() for resp in req.sender.responses]
        ids = tok(req.inputs["text_input"][0].decode())["input_ids"]
        expected = ort.generate([ids], n, eos_token_id=None)[0]
        assert "".join(pieces) == tok.decode(expected, skip_special_tokens=True)
        assert len(pieces) >= 2 and req.sender.final == 1
    # too long a prompt / beyond the KV capacity: one error response, final
    for req, what in ((reqs[2], "at most 24"), (reqs[3], "KV capacity of 40")):
        assert req.sender.final == 1 and len(req.sender.responses) == 1
        assert what in req.sender.responses[0].error.msg
    assert m.model.runner.graph_stats.profile_steps[0] == 1  # the two ran as one batch


def test_triton_cli_and_refusals(artifact, tmp_path, capsys):
    out = tmp_path / "repo"
    code, o, e = run_cli(["triton", str(artifact), "-o", str(out)], capsys)
    assert code == 0 and "tritonserver --model-repository=" in o, e
    code, o, e = run_cli(["triton", str(artifact), "-o", str(out)], capsys)
    assert code == 5 and "--force" in e
    code, o, e = run_cli(["triton", str(artifact), "-o", str(out), "--force"], capsys)
    assert code == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    code, o, e = run_cli(["triton", str(artifact), "-o", str(other)], capsys)
    assert code == 5 and (other / "keep.txt").read_text() == "x"
    code, o, e = run_cli(
        ["triton", str(artifact), "-o", str(tmp_path / "r2"), "--profile", "h100"], capsys
    )
    assert code == 3 and not (tmp_path / "r2").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
@pytest.mark.skipif(
    Flavour.RTX not in available_backends(), reason="needs tensorrt_rtx (pip install 'dsc[rtx]')"
)
def test_build_triton_writes_the_repository_of_the_real_engine(tmp_path, capsys):
    """`dsc build --triton` with a real TensorRT-RTX engine (SM80, built here without a GPU):
    the repository's engine is that engine and config.pbtxt carries the profile's envelope."""
    art = tmp_path / "art"
    code, out, err = run_cli(
        [
            "build",
            str(REPO / "examples/models/tiny-deepseek-v3"),
            "--profile",
            "a100",
            "--max-batch",
            "3",
            "--max-input-len",
            "64",
            "--max-kv",
            "128",
            "-o",
            str(art),
            "-q",
            "--triton",
        ],
        capsys,
    )
    assert code == 0, err
    repo = tmp_path / "art.triton"
    assert f"tritonserver --model-repository={repo}" in out
    m = json.loads((art / "manifest.json").read_text())
    ((name, rec),) = m["profiles"].items()
    c = parse_config(repo / f"dsc_{name}" / "config.pbtxt")
    assert c.max_batch_size == rec["envelope"]["max_batch"] == 3
    p = {k: v.string_value for k, v in c.parameters.items()}
    assert (p["max_input_len"], p["max_kv"]) == ("64", "128")
    from dsc.models.checkpoint import sha256_file

    engine = repo / f"dsc_{name}" / "1" / "model.engine"
    assert sha256_file(engine) == rec["engine"]["sha256"]
    record = json.loads((engine.parent / "dsc_model.json").read_text())
    assert record["engine"]["backend"] == "tensorrt_rtx" and record["sm"] == 80

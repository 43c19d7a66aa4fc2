"""A Triton model repository serving a dsc artifact's engines (`dsc triton`, `dsc build --triton`).

    REPO/dsc_<profile>/config.pbtxt       backend "python", decoupled, max_batch_size = the
                                          profile's max batch, dynamic batching, parameters:
                                          max_input_len, max_kv, default_max_tokens, profile
    REPO/dsc_<profile>/1/model.py         `dsc.runtime.triton_model` (Python backend)
                        1/model.engine    the engine (hard link when possible, else a copy)
                        1/model_io.json   the graph's interface (names, cache layout)
                        1/dsc_model.json  the engine's manifest record, envelope, source artifact
                        1/tokenizer*.json ... the artifact's tokenizer files

Start it with `tritonserver --model-repository=REPO` (`RepositoryResult.command`), in an
environment where the Python backend can import dsc, polygraphy and the engine's runtime.

A stand-in engine (`dsc.runtime.standin`) is written with its ONNX graph beside it, so the
repository works with the stand-in runtime too (tests; not a serving configuration).

The repository is written into a temporary directory beside REPO and renamed into place; an
existing REPO is replaced only with `force` and only if it is a dsc repository (every model
directory holds `1/dsc_model.json`), else `OutputConflict` (exit 5).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dsc.errors import BadInput, OutputConflict, Unsupported

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
)
MODEL_RECORD = "dsc_model.json"


@dataclass
class RepositoryResult:
    path: Path
    models: list[str]
    command: str


def model_name(profile: str) -> str:
    return "dsc_" + "".join(c if c.isalnum() or c in "_-" else "_" for c in profile)


def config_pbtxt(
    name: str,
    envelope: dict,
    profile: str,
    *,
    default_max_tokens: int = 64,
    runtime: str | None = None,
) -> str:
    """The model's config.pbtxt (protobuf text format of Triton's `inference.ModelConfig`)."""
    params = {
        "profile": profile,
        "max_input_len": str(envelope["max_input_len"]),
        "max_kv": str(envelope["max_kv"]),
        "default_max_tokens": str(default_max_tokens),
        "cuda_graphs": "1",
    }
    if runtime:
        params["runtime"] = runtime
    lines = [
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {int(envelope['max_batch'])}",
        "model_transaction_policy { decoupled: true }",
        "dynamic_batching { max_queue_delay_microseconds: 1000 }",
        "input [",
        '  { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] },',
        '  { name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }',
        "]",
        'output [ { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] } ]',
        # one engine context per GPU instance: the runner is not thread-safe
        "instance_group [ { count: 1 kind: KIND_GPU } ]",
    ]
    for k, v in params.items():
        lines.append(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}')
    return "\n".join(lines) + "\n"


def model_config_pb2():
    """Triton's `model_config_pb2` from the tritonclient package, loaded from its file (the
    `tritonclient.grpc` package itself imports grpcio, which dsc does not need). Raises
    `Unsupported` when tritonclient is not installed (pip install 'dsc[triton]')."""
    import importlib.util
    import sys

    key = "_dsc_triton_model_config_pb2"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise Unsupported("reading a Triton config needs tritonclient (pip install 'dsc[triton]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    mspec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    sys.modules[key] = module
    return module


def parse_config(path: Path):
    """config.pbtxt parsed into Triton's `inference.ModelConfig` message."""
    from google.protobuf import text_format

    return text_format.Parse(Path(path).read_text(), model_config_pb2().ModelConfig())


def _is_dsc_repo(path: Path) -> bool:
    models = [p for p in path.iterdir() if p.is_dir()]
    return (
        bool(models)
        and all((m / "1" / MODEL_RECORD).is_file() for m in models)
        and all(p.is_dir() for p in path.iterdir())
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_model(
    artifact: Path, manifest: dict, io: dict, profile: str, dest: Path, runtime: str | None
) -> str:
    from dsc.runtime import standin

    entry = manifest["profiles"][profile]
    name = model_name(profile)
    version = dest / name / "1"
    version.mkdir(parents=True)
    envelope = entry.get("envelope") or {}
    if not {"max_batch", "max_input_len", "max_kv"} <= set(envelope):
        raise BadInput(f"profile {profile} of {artifact} has no envelope in manifest.json")
    (dest / name / "config.pbtxt").write_text(
        config_pbtxt(name, envelope, profile, runtime=runtime)
    )
    shutil.copyfile(Path(__file__).with_name("triton_model.py"), version / "model.py")
    engine = artifact / entry["engine"]["path"]
    if engine.read_bytes()[: len(standin.MAGIC)] == standin.MAGIC:
        # the stand-in names its ONNX graph by path: ship the graph beside it
        header = json.loads(engine.read_bytes()[len(standin.MAGIC) :])
        graph = (engine.parent / header["onnx"]).resolve()
        _link_or_copy(graph, version / "model.onnx")
        if graph.with_name(graph.name + ".data").is_file():
            _link_or_copy(graph.with_name(graph.name + ".data"), version / "model.onnx.data")
        header["onnx"] = "model.onnx"
        (version / "model.engine").write_bytes(standin.MAGIC + json.dumps(header).encode())
    else:
        _link_or_copy(engine, version / "model.engine")
    (version / "model_io.json").write_text(json.dumps(io, indent=2) + "\n")
    for f in TOKENIZER_FILES:
        if (artifact / f).is_file():
            shutil.copyfile(artifact / f, version / f)
    record = {
        "profile": profile,
        "sm": entry.get("sm"),
        "engine": entry["engine"],
        "envelope": envelope,
        "artifact": str(artifact.resolve()),
    }
    (version / MODEL_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return name


def write_repository(
    artifact: str | Path,
    output: str | Path,
    *,
    profiles: list[str] | tuple[str, ...] | None = None,
    force: bool = False,
    runtime: str | None = None,
) -> RepositoryResult:
    """Write the repository for `profiles` (default: every profile with a built engine).

    Raises `BadInput` (exit 3) for an unreadable artifact or an unknown profile, `Unsupported`
    (exit 4) when a requested profile (or, by default, every profile) has no engine yet,
    `OutputConflict` (exit 5) for an OUTPUT that is not a dsc repository (or is one, without
    `force`)."""
    from dsc.artifacts import load_io_spec, load_manifest

    artifact, output = Path(artifact), Path(output).absolute()
    manifest = load_manifest(artifact)
    io = load_io_spec(artifact)
    known = manifest.get("profiles") or {}
    if profiles:
        for p in profiles:
            if p not in known:
                raise BadInput(
                    f"{artifact} has no profile {p!r} (profiles: "
                    f"{', '.join(sorted(known)) or 'none'})"
                )
            if not isinstance(known[p].get("engine"), dict):
                raise Unsupported(
                    f"profile {p} of {artifact} holds no engine yet (status "
                    f"{known[p].get('status')}); run dsc device-check "
                    f"{artifact} --profile {p} on the device first"
                )
        chosen = list(profiles)
    else:
        chosen = [p for p, e in known.items() if isinstance(e.get("engine"), dict)]
        if not chosen:
            raise Unsupported(
                f"{artifact} holds no built engine to serve (dsc compile or dsc "
                f"device-check on the device first)"
            )
    if output.exists():
        if output.is_file() or output.is_symlink():
            raise OutputConflict(f"output path {output} is a file, not a directory")
        if any(output.iterdir()):
            if not _is_dsc_repo(output):
                raise OutputConflict(
                    f"output path {output} is not empty and is not a dsc Triton "
                    f"repository; choose another path"
                )
            if not force:
                raise OutputConflict(
                    f"output path {output} already holds a dsc Triton "
                    f"repository; pass --force to replace it"
                )
    output.parent.mkdir(parents=True, exist_ok=True)
    from dsc import signals

    with signals.deferred():
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-{os.getpid()}-", dir=output.parent))
    try:
        models = [_write_model(artifact, manifest, io, p, tmp, runtime) for p in chosen]
        with signals.deferred():
            if output.exists():
                old = output.with_name(f".{output.name}.old-{os.getpid()}")
                os.replace(output, old)
                os.replace(tmp, output)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RepositoryResult(output, models, f"tritonserver --model-repository={output}")


# -- the served model (used by model.py) ---------------------------------------------------------


class ServedModel:
    """The engine runner, the tokenizer and the envelope's admission rules of one model."""

    def __init__(self, runner, tokenizer, envelope: dict, eos_token_id: int | None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.envelope = envelope
        self.eos = eos_token_id

    def admit(self, text: str, max_tokens: int) -> list[int]:
        """The prompt's token ids; `BadInput` when it or its continuation exceeds the engine."""
        ids = self.tokenizer(text)["input_ids"]
        if not ids:
            raise BadInput("the prompt encodes to no tokens")
        if max_tokens < 1:
            raise BadInput(f"max_tokens must be at least 1, got {max_tokens}")
        if len(ids) > self.envelope["max_input_len"]:
            raise BadInput(
                f"the prompt is {len(ids)} tokens; this engine takes at most "
                f"{self.envelope['max_input_len']}"
            )
        if len(ids) + max_tokens > self.envelope["max_kv"]:
            raise BadInput(
                f"prompt ({len(ids)}) + max_tokens ({max_tokens}) exceeds the "
                f"engine's KV capacity of {self.envelope['max_kv']} tokens"
            )
        return ids

    def chunks(self, work: list) -> list[list]:
        n = max(1, int(self.envelope["max_batch"]))
        return [work[i : i + n] for i in range(0, len(work), n)]

    def run(self, chunk: list):
        """Yields (sender, text piece, final) as tokens are made, for a chunk of
        (sender, ids, max_tokens)."""
        from dsc.runtime.serving import TextStream, stream_tokens

        streams = [TextStream(self.tokenizer) for _ in chunk]
        # left padding widens short prompts to the longest: keep it within the KV capacity
        width = max(len(ids) for _, ids, _ in chunk)
        limits = [min(mt, self.envelope["max_kv"] - width) for _, _, mt in chunk]
        for step in stream_tokens(
            self.runner, [ids for _, ids, _ in chunk], limits, eos_token_id=self.eos
        ):
            for row, tok, final in step:
                yield chunk[row][0], streams[row].push(tok), final


def load_model(
    version_dir: Path, *, runtime: str | None = None, cuda_graphs: bool = True
) -> ServedModel:
    """The model of a repository version directory (what model.py's `initialize` calls)."""
    from dsc.models.loading import load_tokenizer
    from dsc.runtime.engine import (
        EngineCausalLM,
        check_compatible,
        load_runtime,
        runtime_flavour,
    )

    version_dir = Path(version_dir)
    record = json.loads((version_dir / MODEL_RECORD).read_text())
    io = json.loads((version_dir / "model_io.json").read_text())
    rt = load_runtime(runtime_flavour(runtime, record["engine"].get("backend")))
    check_compatible(record["engine"], record.get("sm"), rt)
    runner = EngineCausalLM(version_dir / "model.engine", io, runtime=rt, cuda_graphs=cuda_graphs)
    eos = io.get("eos_token_id")
    return ServedModel(
        runner,
        load_tokenizer(version_dir),
        record["envelope"],
        eos if isinstance(eos, int) else None,
    )

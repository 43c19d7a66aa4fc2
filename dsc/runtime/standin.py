"""STAND-IN for the TensorRT runtime: the API subset `EngineCausalLM` uses, run by ONNX Runtime.

THIS IS NOT TENSORRT. There is no GPU on dsc's build machines, so the engine runner's own logic
(optimization-profile choice, binding shapes, device addresses, the KV-cache loop, CUDA-graph
bookkeeping) is tested against this module. It mirrors the names and return conventions of
TensorRT 10's Python runtime (`Runtime.deserialize_cuda_engine`, `ICudaEngine.num_io_tensors` /
`get_tensor_name` / `get_tensor_mode` / `get_tensor_dtype` / `num_optimization_profiles` /
`get_tensor_profile_shape` / `create_runtime_config` (TensorRT-RTX's, with `cuda_graph_strategy`)
/ `create_execution_context`, `IExecutionContext.set_optimization_profile_async` /
`set_input_shape` (False outside the active profile) / `get_tensor_shape` / `set_tensor_address`
/ `execute_async_v3`), and executes the artifact's ONNX graph in ONNX Runtime on the CPU,
reading inputs from and writing outputs to the "device" addresses the runner bound.

"Device" memory is host memory (`HostDevice`, same interface as `dsc.runtime.device.CudaDevice`)
addressed by integers; a "CUDA graph" records the executions issued between `begin_capture` and
`end_capture` and `launch` re-runs them against the same addresses, which is what a captured
graph does. Timings taken through it are ONNX Runtime's on this CPU, and every record written
with it says `runtime: standin` (`RUNTIME_LABEL`).

A stand-in engine file (`write_engine`) is a JSON header naming the ONNX graph (relative to the
engine file) and the two optimization profiles computed exactly as the builder computes them
(`dsc.backends.tensorrt.profile_shapes`); it is not a TensorRT engine, and a TensorRT runtime
refuses it (and this module refuses a real engine). The stand-in's version is `__version__`, its
device's compute capability `DSC_STANDIN_SM` (default 89).
"""

from __future__ import annotations

import enum
import itertools
import json
import os
import weakref
from pathlib import Path

import numpy as np

from dsc.runtime.device import Buffer

__version__ = "0.0-standin"
MAGIC = b"DSC-TRT-STANDIN\n"
RUNTIME_LABEL = "standin (ONNX Runtime on the CPU executing the engine's ONNX graph; not TensorRT)"


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class CudaGraphStrategy(enum.Enum):
    """TensorRT-RTX's native CUDA-graph switch (recorded by the stand-in, which has no GPU)."""

    DISABLED = 0
    WHOLE_GRAPH_CAPTURE = 1


class IRuntimeConfig:
    def __init__(self):
        self.cuda_graph_strategy = CudaGraphStrategy.DISABLED


class Logger:
    WARNING = 2

    def __init__(self, severity=None):
        self.severity = severity


def nptype(dtype: str) -> np.dtype:
    """The numpy dtype of a stand-in tensor dtype (the stand-in's DataType is a numpy name)."""
    return np.dtype(np.float32) if dtype == "bfloat16" else np.dtype(dtype)


# -- host "device" -------------------------------------------------------------------------------


class _Memory:
    """Integer addresses → host arrays; what device pointers are to TensorRT."""

    def __init__(self):
        self.blocks: dict[int, np.ndarray] = {}
        self._next = itertools.count(1)
        self.capturing: list | None = None

    def alloc(self, nbytes: int) -> int:
        ptr = next(self._next) << 32  # far apart: an offset never reaches the next block
        self.blocks[ptr] = np.zeros(max(1, nbytes), dtype=np.uint8)
        return ptr

    def view(self, ptr: int, shape, dtype) -> np.ndarray:
        base, off = ptr & ~0xFFFFFFFF, ptr & 0xFFFFFFFF
        block = self.blocks.get(base)
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if block is None or off + n > block.nbytes:
            raise RuntimeError(f"stand-in: {n} bytes at {ptr:#x} are not allocated")
        return block[off : off + n].view(dtype).reshape(shape)


MEMORY = _Memory()


class HostDevice:
    """`CudaDevice`'s interface on host memory (see `dsc.runtime.device`)."""

    name = "standin"
    stream_ptr = 0

    def __init__(self, sm: int | None = None):
        self.sm = int(sm if sm is not None else os.environ.get("DSC_STANDIN_SM", "89"))
        self._graphs: dict[int, list] = {}
        self._ids = itertools.count(1)

    def alloc(self, nbytes: int) -> Buffer:
        ptr = MEMORY.alloc(nbytes)
        token = _Owner()
        weakref.finalize(token, MEMORY.blocks.pop, ptr, None)
        return Buffer(ptr, int(nbytes), token)

    def upload(self, buf: Buffer, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        MEMORY.view(buf.ptr, a.shape, a.dtype)[...] = a

    def download(self, buf: Buffer, shape, dtype) -> np.ndarray:
        return MEMORY.view(buf.ptr, shape, dtype).copy()

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        MEMORY.view(dst, (nbytes,), np.uint8)[...] = MEMORY.view(src, (nbytes,), np.uint8)

    def synchronize(self) -> None:
        pass

    def compute_capability(self) -> int:
        return self.sm

    def begin_capture(self) -> None:
        if MEMORY.capturing is not None:
            raise RuntimeError("stand-in: capture already in progress")
        MEMORY.capturing = []

    def end_capture(self) -> int:
        ops, MEMORY.capturing = MEMORY.capturing, None
        gid = next(self._ids)
        self._graphs[gid] = ops or []
        return gid

    def launch(self, graph: int) -> None:
        for op in self._graphs[graph]:
            op()

    def destroy(self, graph: int) -> None:
        self._graphs.pop(graph, None)


class _Owner:
    """Lifetime token of one allocation (as `dsc.runtime.device`'s)."""


# -- engine file ---------------------------------------------------------------------------------


def write_engine(
    path: Path, onnx_path: Path, io: dict, envelope, *, trt_version: str = __version__, sm: int = 89
) -> Path:
    """Write a stand-in engine for `onnx_path` with the builder's two profiles for `envelope`
    (a `ShapeEnvelope`). Returns `path`. Not a TensorRT engine (see the module docstring)."""
    from dsc.backends.tensorrt import io_roles_from_spec, profile_shapes

    profiles = profile_shapes(io_roles_from_spec(io), envelope)
    path = Path(path)
    header = {
        "format": "dsc-trt-standin",
        "onnx": os.path.relpath(Path(onnx_path).resolve(), path.resolve().parent),
        "trt_version": trt_version,
        "sm": sm,
        "inputs": [{"name": i["name"], "dtype": i["dtype"]} for i in io["inputs"]],
        "outputs": [{"name": o["name"], "dtype": o["dtype"]} for o in io["outputs"]],
        "profiles": [
            {"name": p.name, "shapes": {k: [list(x) for x in v] for k, v in p.shapes.items()}}
            for p in profiles
        ],
        "cache": {"entries": io["cache"]["entries"], "outputs": io["cache"]["outputs"]},
        "vocab_size": io["vocab_size"],
    }
    path.write_bytes(MAGIC + json.dumps(header).encode())
    return path


# -- runtime API subset --------------------------------------------------------------------------


class Runtime:
    def __init__(self, logger=None):
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes, base_dir: Path | None = None):
        """An `ICudaEngine`, or None for bytes that are not a stand-in engine (as TensorRT
        returns None for an engine it cannot read)."""
        if bytes(data[: len(MAGIC)]) != MAGIC:
            return None
        header = json.loads(bytes(data[len(MAGIC) :]))
        return ICudaEngine(header, Path(base_dir or "."))


class ICudaEngine:
    def __init__(self, header: dict, base_dir: Path):
        self.header = header
        self.onnx_path = (base_dir / header["onnx"]).resolve()
        self._io = [(t["name"], TensorIOMode.INPUT, t["dtype"]) for t in header["inputs"]] + [
            (t["name"], TensorIOMode.OUTPUT, t["dtype"]) for t in header["outputs"]
        ]
        self._mode = {n: m for n, m, _ in self._io}
        self._dtype = {n: d for n, _, d in self._io}
        self._session = None

    @property
    def num_io_tensors(self) -> int:
        return len(self._io)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.header["profiles"])

    def get_tensor_name(self, index: int) -> str:
        return self._io[index][0]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._mode.get(name, TensorIOMode.NONE)

    def get_tensor_dtype(self, name: str) -> str:
        return self._dtype[name]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple]:
        return [tuple(x) for x in self.header["profiles"][profile_index]["shapes"][name]]

    def create_runtime_config(self) -> IRuntimeConfig:
        return IRuntimeConfig()

    def create_execution_context(
        self, runtime_config: IRuntimeConfig | None = None
    ) -> IExecutionContext:
        ctx = IExecutionContext(self)
        ctx.runtime_config = runtime_config
        return ctx

    def session(self):
        if self._session is None:
            from dsc.backends.onnxruntime.runner import inference_session

            self._session = inference_session(self.onnx_path)
        return self._session


class IExecutionContext:
    def __init__(self, engine: ICudaEngine):
        self.engine = engine
        self.active_optimization_profile = 0
        self._shapes: dict[str, tuple] = {}
        self._addr: dict[str, int] = {}
        self.executions = 0  # how many times the "kernels" ran (captured launches included)

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        self.active_optimization_profile = index
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.active_optimization_profile)
        shape = tuple(int(x) for x in shape)
        if len(shape) != len(lo) or any(
            s < a or s > b for s, a, b in zip(shape, lo, hi, strict=False)
        ):
            return False
        self._shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        if self.engine.get_tensor_mode(name) == TensorIOMode.INPUT:
            return self._shapes.get(name, ())
        b, s = self._shapes["input_ids"]
        total = self._shapes["attention_mask"][1]
        if name == "logits":
            return (b, s, int(self.engine.header["vocab_size"]))
        entries = self.engine.header["cache"]["entries"]
        k = self.engine.header["cache"]["outputs"].index(name) % len(entries)
        return (b, entries[k]["heads"], total, entries[k]["dim"])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if self.engine.get_tensor_mode(name) == TensorIOMode.NONE:
            return False
        self._addr[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        # The bindings as they are now: a captured graph replays them, not later ones.
        shapes = dict(self._shapes)
        addrs = dict(self._addr)

        def op():
            return self._execute(shapes, addrs)

        if MEMORY.capturing is not None:
            MEMORY.capturing.append(op)
            return True
        return op()

    def _execute(self, shapes: dict, addrs: dict) -> bool:
        eng = self.engine
        names = [t["name"] for t in eng.header["inputs"]]
        outs = [t["name"] for t in eng.header["outputs"]]
        if any(n not in shapes or n not in addrs for n in names) or any(
            n not in addrs for n in outs
        ):
            return False
        feeds = {
            n: MEMORY.view(addrs[n], shapes[n], nptype(eng.get_tensor_dtype(n))).copy()
            for n in names
        }
        results = eng.session().run(outs, feeds)
        saved, self._shapes = self._shapes, shapes
        try:
            for n, r in zip(outs, results, strict=False):
                if tuple(r.shape) != self.get_tensor_shape(n):
                    return False
                MEMORY.view(addrs[n], r.shape, r.dtype)[...] = r
        finally:
            self._shapes = saved
        self.executions += 1
        return True


def install_engine(
    artifact: Path,
    profile: str,
    envelope,
    *,
    sm: int = 89,
    trt_version: str = __version__,
    backend: str = "tensorrt_rtx",
    profile_name: str | None = None,
) -> dict:
    """Put a stand-in engine for `profile` into `artifact` (engines/<profile>/model.engine) and
    record it in manifest.json as the builder records an engine, with `runtime` saying it is
    the stand-in. For tests and for trying the commands without a GPU; returns the record."""
    from dsc.artifacts import load_io_spec
    from dsc.runtime.records import record_engine

    artifact = Path(artifact)
    io = load_io_spec(artifact)
    rel = f"engines/{profile}/model.engine"
    path = artifact / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    write_engine(path, artifact / io["onnx"], io, envelope, trt_version=trt_version, sm=sm)
    return record_engine(
        artifact,
        profile,
        rel,
        envelope,
        backend=backend,
        trt_version=trt_version,
        sm=sm,
        runtime=RUNTIME_LABEL,
        profile_name=profile_name,
        note="stand-in engine (dsc.runtime.standin): no builder ran, no plan was made",
    )

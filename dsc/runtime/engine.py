"""EngineCausalLM: a dsc engine (TensorRT or TensorRT-RTX) driven like `OrtCausalLM`.

Same interface as `dsc.backends.onnxruntime.runner.OrtCausalLM`: `io`, `empty_past(batch)`,
`step(input_ids, attention_mask, position_ids, past) -> StepOutput(logits, present)` and
`generate(prompts, max_new_tokens, ...)` (the very same method), so the accuracy gate, the
benchmark and the Triton model take either.

    input_ids, position_ids  int64 [batch, seq]         attention_mask int64 [batch, past + seq]
    past_key_values.*        [batch, heads, past, dim]  numpy arrays or the `DeviceTensor`s a
                                                        previous step returned (no host copy)
    logits                   numpy [batch, seq, vocab]  (copied to the host every step)
    present.*                `DeviceTensor` [batch, heads, past + seq, dim], on the device

Optimization profile: the engine has two (dsc's builder: 0 prefill, 1 decode; see
`dsc.backends.tensorrt._shapes`). A step takes the profile whose min..max holds every input
shape and whose opt shapes are nearest (sum over axes of |log((n + 1) / (opt + 1))|), so a
one-token step with a past takes the decode profile and a prompt the prefill one. A prefill
whose batch exceeds the prefill profile's (the builder caps it at max_num_tokens // max_input_len)
runs as several passes of at most that many sequences, its `present` gathered on the host. A
shape no profile holds raises `Unsupported` (exit 4) naming the input and the engine's limits.

CUDA graphs (`cuda_graphs=True`, the default). TensorRT-RTX: the context is created with
`IRuntimeConfig.cuda_graph_strategy = WHOLE_GRAPH_CAPTURE` (DISABLED when off), and the runtime
captures and replays graphs itself, dynamic shapes included (its documented way; manual stream
capture there needs engines built for user allocation); `native_graph_steps` counts the steps.
Standard TensorRT: decode steps run under a graph dsc captures when their shape signature
recurs. The exported graph concatenates past and new tokens, so every decode step of a
sequence has a new `past` length and a graph serves one (batch, past) signature: the first time
a signature is seen the step runs eagerly; the second time it is captured (after one eager
enqueue, which TensorRT needs after a shape change); after that it is replayed. Signatures
recur across requests of equal lengths (the benchmark's repeats, a server's traffic). A graph
owns its small inputs and all its outputs; the cache tensors it was captured with are kept
alive and a replay with other cache tensors copies them in (`past_copies`). Outputs of a
replayed step are the graph's own buffers: valid until that graph is replayed again. At most
`max_graphs` graphs are kept (least recently used evicted). `graph_stats` counts all of this.

The runtime (`load_runtime`) is Polygraphy's: `EngineFromBytes` deserializes the engine with
`tensorrt`, or with `tensorrt_rtx` when `POLYGRAPHY_USE_TENSORRT_RTX=1` (set here for RTX
engines), and device memory, copies and the stream are `polygraphy.cuda`'s. `runtime="standin"`
(or `DSC_ENGINE_RUNTIME=standin`) uses `dsc.runtime.standin` instead: ONNX Runtime on the CPU,
NOT TensorRT, for tests on machines without a GPU.

Errors: `Unsupported` (exit 4): no GPU or runtime, an engine built for another SM or TensorRT
version than this device's (both named), a shape beyond every profile. `BadInput` (exit 3): an
engine file the runtime cannot deserialize, or whose tensors do not match `model_io.json`.
`BackendError` (exit 7): the runtime refused a shape or failed to execute.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

from dsc.backends.onnxruntime.runner import OrtCausalLM, StepOutput
from dsc.errors import BackendError, BadInput, Unsupported

STANDIN_ENV = "DSC_ENGINE_RUNTIME"
FLAVOURS = ("tensorrt", "tensorrt_rtx", "standin")


# -- runtime -------------------------------------------------------------------------------------


@dataclass
class RuntimeApi:
    """A TensorRT runtime module, how to deserialize with it, and the device it runs on."""

    trt: ModuleType
    flavour: str  # "tensorrt" | "tensorrt_rtx" | "standin"
    version: str
    device: object  # CudaDevice | standin.HostDevice
    label: str
    # TensorRT-RTX captures CUDA graphs itself (IRuntimeConfig.cuda_graph_strategy), dynamic
    # shapes included; its docs require user-allocated engines for manual stream capture.
    native_graphs: bool = False

    def deserialize(self, data: bytes, base_dir: Path):
        if self.flavour == "standin":
            return self.trt.Runtime().deserialize_cuda_engine(data, base_dir)
        from polygraphy.backend.trt import EngineFromBytes

        return EngineFromBytes(data)()

    def nptype(self, dtype) -> np.dtype:
        """numpy dtype of a runtime tensor dtype; bfloat16 is ml_dtypes' (numpy has none)."""
        if self.flavour != "standin" and "BF16" in str(dtype).upper():
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(self.trt.nptype(dtype))


def runtime_flavour(requested: str | None, engine_backend: str | None) -> str:
    """The runtime to use: `requested`, else $DSC_ENGINE_RUNTIME, else the engine's backend."""
    flavour = requested or os.environ.get(STANDIN_ENV) or engine_backend or "tensorrt"
    if flavour not in FLAVOURS:
        raise Unsupported(
            f"unknown engine runtime {flavour!r} (expected one of {', '.join(FLAVOURS)})"
        )
    return flavour


def load_runtime(flavour: str) -> RuntimeApi:
    """Import the runtime and open the device. Raises `Unsupported` (exit 4) where there is
    no such runtime or no GPU, in one line."""
    if flavour == "standin":
        from dsc.runtime import standin

        return RuntimeApi(
            standin, "standin", standin.__version__, standin.HostDevice(), standin.RUNTIME_LABEL
        )
    label = "TensorRT-RTX" if flavour == "tensorrt_rtx" else "TensorRT"
    if flavour == "tensorrt_rtx":
        os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1"
    try:
        import polygraphy.config as pconfig
        from polygraphy.backend.trt import EngineFromBytes  # noqa: F401
    except ImportError as e:
        raise Unsupported(f"--engine needs Polygraphy (pip install polygraphy): {e}") from None
    pconfig.USE_TENSORRT_RTX = flavour == "tensorrt_rtx"
    from dsc.backends.tensorrt import load_trt

    try:
        trt, _ = load_trt(flavour)
    except Unsupported as e:
        raise Unsupported(f"--engine needs the {label} runtime: {e}") from None
    from dsc.runtime.device import CudaDevice

    try:
        device = CudaDevice()
    except Unsupported as e:
        raise Unsupported(f"--engine needs a GPU: {e}") from None
    version = str(getattr(trt, "__version__", "unknown"))
    return RuntimeApi(
        trt,
        flavour,
        version,
        device,
        f"{label} {version} (Polygraphy)",
        native_graphs=flavour == "tensorrt_rtx",
    )


def check_compatible(engine: dict, profile_sm: int | None, runtime: RuntimeApi) -> None:
    """Refuse an engine this runtime and device cannot run (`Unsupported`, exit 4, naming both).

    `engine` is the manifest's `profiles.<name>.engine` record (`backend`, `trt_version`,
    `target_sm`). A standard TensorRT engine runs only with the TensorRT version and the SM it
    was built with; dsc holds TensorRT-RTX engines to the same rule (it has not measured what
    else they tolerate). The stand-in runtime is held to its own version and SM.
    """
    backend = engine.get("backend")
    if runtime.flavour != "standin" and backend and backend != runtime.flavour:
        raise Unsupported(
            f"the engine was built with {backend} and runs only with that "
            f"runtime; this is {runtime.label}"
        )
    built = str(engine.get("trt_version"))
    if built != runtime.version:
        raise Unsupported(
            f"the engine was built with TensorRT version {built}; this device's "
            f"runtime is {runtime.version} (rebuild it here: dsc device-check)"
        )
    engine_sm = engine.get("target_sm") or profile_sm
    device_sm = runtime.device.compute_capability()
    if engine_sm is not None and int(engine_sm) != int(device_sm):
        raise Unsupported(
            f"the engine was built for SM{engine_sm}; this device is "
            f"SM{device_sm} (rebuild it here: dsc device-check)"
        )


# -- tensors on the device -----------------------------------------------------------------------


class DeviceTensor:
    """A tensor in device memory: `shape`, `dtype`; `numpy()` (or `np.asarray`) copies it out."""

    def __init__(self, buffer, shape: tuple[int, ...], dtype, device):
        self.buffer = buffer
        self.shape = tuple(int(x) for x in shape)
        self.dtype = np.dtype(dtype)
        self.device = device

    @property
    def ptr(self) -> int:
        return self.buffer.ptr

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        return self.device.download(self.buffer, self.shape, self.dtype)

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)


@dataclass
class GraphStats:
    """What the runner did: eager steps, CUDA-graph captures/replays, and the rest."""

    eager_steps: int = 0
    graph_captures: int = 0
    graph_replays: int = 0
    past_copies: int = 0
    graph_evictions: int = 0
    profile_switches: int = 0
    split_prefills: int = 0
    native_graph_steps: int = 0  # steps run with the runtime's own CUDA graphs (TensorRT-RTX)
    profile_steps: dict = field(default_factory=dict)  # profile index -> steps

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class _Graph:
    handle: object
    inputs: dict  # small input name -> Buffer (owned)
    past: list  # the cache tensors it was captured with (kept alive)
    outputs: dict  # output name -> (Buffer, shape)


# -- the runner ----------------------------------------------------------------------------------


class EngineCausalLM:
    """A dsc engine on a TensorRT runtime, driven like `OrtCausalLM` (see the module docstring).

    Same step interface and shapes as `OrtCausalLM`: `input_ids`, `attention_mask`,
    `position_ids` [batch, seq] / [batch, past + seq] (int64, cast to the engine's integer
    type), the KV cache per layer and entry [batch, heads, past, dim] in the engine's cache
    dtype; `step` returns a `StepOutput` (logits numpy [batch, seq, vocab], present as
    `DeviceTensor`s on the device). A prefill whose batch exceeds the prefill profile's runs as
    several passes (module docstring). `cuda_graphs`: capture recurring decode
    shapes (at most `max_graphs` kept, least recently used dropped); `graph_stats` counts them.
    Raises `BadInput` (exit 3) for an unreadable engine, one the runtime cannot deserialize or
    one whose tensors do not match `io_spec` (model_io.json).
    """

    generate = OrtCausalLM.generate  # the same KV-cache loop, over this class's `step`

    def __init__(
        self,
        engine_path: Path,
        io_spec: dict,
        *,
        runtime: RuntimeApi,
        cuda_graphs: bool = True,
        max_graphs: int = 64,
    ):
        self.io = io_spec
        self.runtime = runtime
        self.device = runtime.device
        self.cuda_graphs = bool(cuda_graphs)
        self.max_graphs = int(max_graphs)
        cache = io_spec["cache"]
        self.num_layers = int(cache["num_layers"])
        self.entries = [(e["heads"], e["dim"]) for e in cache["entries"]]
        self.past_names = list(cache["inputs"])
        self.present_names = list(cache["outputs"])
        self.input_names = ["input_ids", "attention_mask", "position_ids", *self.past_names]
        self.output_names = ["logits", *self.present_names]
        engine_path = Path(engine_path)
        try:
            data = engine_path.read_bytes()
        except OSError as e:
            raise BadInput(f"cannot read engine {engine_path}: {e.strerror or e}") from None
        try:
            self.engine = runtime.deserialize(data, engine_path.parent)
        except Exception as e:  # noqa: BLE001  Polygraphy raises its own type for a bad engine
            raise BadInput(
                f"{runtime.label} cannot deserialize {engine_path}: "
                f"{' '.join(str(e).split())[:200]}"
            ) from None
        if self.engine is None:
            raise BadInput(
                f"{runtime.label} cannot deserialize {engine_path} (not an engine for this runtime)"
            )
        eng = self.engine
        names = {eng.get_tensor_name(i) for i in range(eng.num_io_tensors)}
        missing = [n for n in (*self.input_names, *self.output_names) if n not in names]
        if missing:
            raise BadInput(
                f"engine {engine_path} does not match model_io.json: no tensor "
                f"{', '.join(missing[:3])}"
            )
        self.dtypes = {
            n: runtime.nptype(eng.get_tensor_dtype(n))
            for n in (*self.input_names, *self.output_names)
        }
        self.cache_dtype = self.dtypes[self.past_names[0]]
        self.profiles = [
            {
                n: tuple(tuple(int(x) for x in s) for s in eng.get_tensor_profile_shape(n, i))
                for n in self.input_names
            }
            for i in range(eng.num_optimization_profiles)
        ]
        if runtime.native_graphs:
            config = eng.create_runtime_config()
            strategy = runtime.trt.CudaGraphStrategy
            config.cuda_graph_strategy = (
                strategy.WHOLE_GRAPH_CAPTURE if self.cuda_graphs else strategy.DISABLED
            )
            self.context = eng.create_execution_context(config)
        else:
            self.context = eng.create_execution_context()
        self._profile = 0
        self.graph_stats = GraphStats()
        self._seen: set = set()
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()

    @classmethod
    def from_artifact(
        cls, artifact: Path, profile: str, *, runtime: str | None = None, **kw
    ) -> EngineCausalLM:
        """The engine of `profile` in `artifact`, checked against this device first."""
        return engine_factory(artifact, profile, runtime=runtime, **kw)()

    # -- shapes and profiles ---------------------------------------------------------------------

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """The KV cache before the first token: per layer and entry [batch, heads, 0, dim]."""
        return [
            np.zeros((batch, h, 0, d), dtype=self.cache_dtype)
            for _ in range(self.num_layers)
            for h, d in self.entries
        ]

    def select_profile(self, shapes: dict[str, tuple]) -> int | None:
        """The profile holding every shape with opt shapes nearest; None when none holds them."""
        best, best_d = None, math.inf
        for i, prof in enumerate(self.profiles):
            d = 0.0
            for n, shape in shapes.items():
                lo, opt, hi = prof[n]
                if len(shape) != len(lo) or any(
                    s < a or s > b for s, a, b in zip(shape, lo, hi, strict=False)
                ):
                    d = math.inf
                    break
                d += sum(abs(math.log((s + 1) / (o + 1))) for s, o in zip(shape, opt, strict=False))
            if d < best_d:
                best, best_d = i, d
        return best

    def _limits(self, shapes: dict[str, tuple]) -> str:
        def outside(n, p) -> bool:
            lo, _, hi = p[n]
            s = shapes[n]
            return len(s) != len(lo) or any(
                x < a or x > b for x, a, b in zip(s, lo, hi, strict=False)
            )

        n = next((n for n in shapes if all(outside(n, p) for p in self.profiles)), "input_ids")
        ranges = "; ".join(
            f"profile {i}: {p[n][0]}..{p[n][2]}" for i, p in enumerate(self.profiles)
        )
        return f"{n} {shapes[n]} is outside every optimization profile of the engine ({ranges})"

    def _set_profile(self, index: int) -> None:
        if index != self._profile:
            if not self.context.set_optimization_profile_async(index, self.device.stream_ptr):
                raise BackendError(f"the runtime refused optimization profile {index}")
            self._profile = index
            self.graph_stats.profile_switches += 1
        steps = self.graph_stats.profile_steps
        steps[index] = steps.get(index, 0) + 1

    # -- one step --------------------------------------------------------------------------------

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list,
    ) -> StepOutput:
        """One forward pass on the device (shapes in the class docstring); `past` as from
        `empty_past` or a previous step's `present`. Raises `Unsupported` (exit 4) for shapes
        no optimization profile holds even one row at a time."""
        # in the engine's own integer type (int64 as exported; int32 if a builder narrowed it)
        small = {
            n: np.ascontiguousarray(a, dtype=self.dtypes[n])
            for n, a in (
                ("input_ids", input_ids),
                ("attention_mask", attention_mask),
                ("position_ids", position_ids),
            )
        }
        if len(past) != len(self.past_names):
            raise BadInput(f"expected {len(self.past_names)} cache tensors, got {len(past)}")
        shapes = {n: tuple(a.shape) for n, a in small.items()}
        shapes.update({n: tuple(p.shape) for n, p in zip(self.past_names, past, strict=False)})
        index = self.select_profile(shapes)
        if index is None:
            return self._split_prefill(small, past, shapes)
        seq = shapes["input_ids"][1]
        past_len = shapes[self.past_names[0]][2]
        if self.cuda_graphs and self.runtime.native_graphs:
            self.graph_stats.native_graph_steps += 1  # the runtime captures and replays
        elif self.cuda_graphs and seq == 1 and past_len >= 1:
            return self._graph_step(index, small, past, shapes)
        self.graph_stats.eager_steps += 1
        return self._eager(index, small, past, shapes)

    def _bind_past(self, past: list) -> tuple[list, list]:
        """(device tensors, the ones uploaded here) for a mix of numpy and device tensors."""
        out = []
        for n, p in zip(self.past_names, past, strict=False):
            if isinstance(p, DeviceTensor):
                if p.dtype != self.dtypes[n]:
                    raise BadInput(f"{n}: dtype {p.dtype}, the engine takes {self.dtypes[n]}")
                out.append(p)
            else:
                a = np.ascontiguousarray(p, dtype=self.dtypes[n])
                buf = self.device.alloc(a.nbytes)
                self.device.upload(buf, a)
                out.append(DeviceTensor(buf, a.shape, a.dtype, self.device))
        return out

    def _prepare(
        self, index: int, small: dict, past_dev: list, shapes: dict, small_bufs: dict | None = None
    ) -> tuple[dict, dict]:
        """Set the profile, every input shape and address; allocate the outputs."""
        self._set_profile(index)
        ctx = self.context
        for n in self.input_names:
            if not ctx.set_input_shape(n, shapes[n]):
                raise BackendError(
                    f"the runtime refused shape {shapes[n]} for {n} in optimization profile {index}"
                )
        bufs = small_bufs or {}
        for n, a in small.items():
            if n not in bufs:
                bufs[n] = self.device.alloc(a.nbytes)
            self.device.upload(bufs[n], a)
            ctx.set_tensor_address(n, bufs[n].ptr)
        for n, t in zip(self.past_names, past_dev, strict=False):
            ctx.set_tensor_address(n, t.ptr)
        outs = {}
        for n in self.output_names:
            shape = tuple(int(x) for x in ctx.get_tensor_shape(n))
            nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtypes[n].itemsize
            buf = self.device.alloc(nbytes)
            ctx.set_tensor_address(n, buf.ptr)
            outs[n] = (buf, shape)
        return bufs, outs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.device.stream_ptr):
            raise BackendError("the engine failed to execute (execute_async_v3 returned False)")

    def _result(self, outs: dict) -> StepOutput:
        buf, shape = outs["logits"]
        logits = self.device.download(buf, shape, self.dtypes["logits"])
        present = [
            DeviceTensor(outs[n][0], outs[n][1], self.dtypes[n], self.device)
            for n in self.present_names
        ]
        return StepOutput(logits, present)

    def _eager(self, index: int, small: dict, past: list, shapes: dict) -> StepOutput:
        past_dev = self._bind_past(past)
        _, outs = self._prepare(index, small, past_dev, shapes)
        self._execute()
        return self._result(outs)

    def _graph_step(self, index: int, small: dict, past: list, shapes: dict) -> StepOutput:
        key = (index, tuple(shapes[n] for n in self.input_names))
        stats = self.graph_stats
        g = self._graphs.get(key)
        if g is None and key not in self._seen:
            self._seen.add(key)
            stats.eager_steps += 1
            return self._eager(index, small, past, shapes)
        past_dev = self._bind_past(past)
        if g is None:
            bufs, outs = self._prepare(index, small, past_dev, shapes)
            self._execute()  # TensorRT needs one enqueue after a shape change before capture
            self.device.begin_capture()
            try:
                self._execute()
            finally:
                handle = self.device.end_capture()
            self._graphs[key] = _Graph(handle, bufs, past_dev, outs)
            stats.graph_captures += 1
            if len(self._graphs) > self.max_graphs:
                _, old = self._graphs.popitem(last=False)
                self.device.destroy(old.handle)
                stats.graph_evictions += 1
            return self._result(outs)
        self._graphs.move_to_end(key)
        for n, a in small.items():
            self.device.upload(g.inputs[n], a)
        for mine, given in zip(g.past, past_dev, strict=False):
            if mine.ptr != given.ptr:
                self.device.copy(mine.ptr, given.ptr, given.nbytes)
                stats.past_copies += 1
        self.device.launch(g.handle)
        stats.graph_replays += 1
        steps = stats.profile_steps
        steps[index] = steps.get(index, 0) + 1
        return self._result(g.outputs)

    def _split_prefill(self, small: dict, past: list, shapes: dict) -> StepOutput:
        """A prefill whose batch only the prefill profile's batch limit refuses: several passes."""
        batch, seq = shapes["input_ids"]
        per = max(
            (
                p["input_ids"][2][0]
                for p in self.profiles
                if p["input_ids"][0][1] <= seq <= p["input_ids"][2][1]
            ),
            default=0,
        )
        one = {n: (min(s[0], per), *s[1:]) for n, s in shapes.items()}
        if batch <= per or per < 1 or self.select_profile(one) is None:
            raise Unsupported(self._limits(shapes))
        self.graph_stats.split_prefills += 1
        logits, present = [], [[] for _ in self.present_names]
        for start in range(0, batch, per):
            sl = slice(start, start + per)
            part = self.step(
                small["input_ids"][sl],
                small["attention_mask"][sl],
                small["position_ids"][sl],
                [np.asarray(p)[sl] for p in past],
            )
            logits.append(part.logits)
            for k, t in enumerate(part.present):
                present[k].append(np.asarray(t))
        return StepOutput(np.concatenate(logits), [np.concatenate(p) for p in present])


def engine_entry(manifest: dict, profile: str, artifact: Path) -> dict:
    """The manifest's record of `profile`, which must hold a built engine (else exit 3/4)."""
    profiles = manifest.get("profiles") or {}
    if profile not in profiles:
        known = ", ".join(sorted(profiles)) or "none"
        raise BadInput(f"{artifact} has no profile {profile!r} (profiles: {known})")
    entry = profiles[profile]
    if not isinstance(entry, dict) or not isinstance(entry.get("engine"), dict):
        status = entry.get("status") if isinstance(entry, dict) else None
        raise Unsupported(
            f"profile {profile} of {artifact} holds no engine (status {status}); "
            f"build it on the device: dsc device-check {artifact} --profile "
            f"{profile}"
        )
    return entry


class EngineFactory:
    """Makes the runner of a profile's engine on call, after checking now (at construction)
    that this runtime and device can run it; `runtime` (the `RuntimeApi`) and `last` (the
    runner made last) stay readable. The gate makes each runner when its turn comes."""

    def __init__(self, path: Path, io: dict, runtime: RuntimeApi, **kw):
        self.path, self.io, self.runtime, self.kw = path, io, runtime, kw
        self.last: EngineCausalLM | None = None

    def __call__(self) -> EngineCausalLM:
        self.last = EngineCausalLM(self.path, self.io, runtime=self.runtime, **self.kw)
        return self.last


def engine_factory(
    artifact: Path, profile: str, *, runtime: str | None = None, **kw
) -> EngineFactory:
    """`EngineFactory` for `profile` of `artifact`: raises now what `from_artifact` raises
    (`BadInput` no such profile, `Unsupported` no engine, GPU or runtime, other SM/version)."""
    from dsc.artifacts import load_io_spec, load_manifest

    artifact = Path(artifact)
    entry = engine_entry(load_manifest(artifact), profile, artifact)
    rt = load_runtime(runtime_flavour(runtime, entry["engine"].get("backend")))
    check_compatible(entry["engine"], entry.get("sm"), rt)
    return EngineFactory(artifact / entry["engine"]["path"], load_io_spec(artifact), rt, **kw)

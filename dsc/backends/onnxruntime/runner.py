"""Run an exported graph with ONNX Runtime: one forward step, and KV-cache generation.

The runner only needs `model_io.json` (names, dtypes, cache layout); it is the reference
implementation of how a dsc graph is driven: prefill with an empty past, then one token per
step feeding each `present.*` back as `past_key_values.*`. Batches of unequal prompts are
left-padded; padding is masked out by `attention_mask` and skipped by `position_ids`.

bf16 graphs: ONNX Runtime's CPU provider has no bf16 MatMul (nor most other bf16 kernels), so
everything in dsc that runs a graph in ONNX Runtime on the CPU (calibration, `dsc run`, the
smoke check, the accuracy gate and its layer locator, `--verify-each`) opens it with
`inference_session`, which runs a bf16 graph as its `float32_view`: the same graph with every bf16
type, initializer and constant widened to float32 (exactly: bf16 values are float32 values).
Its inputs and outputs are then float32 (`ort_dtype`). What the view computes is the bf16
graph's arithmetic without the rounding of intermediate values to bf16 (as ONNX Runtime also
computes fp16 graphs on the CPU): fine for calibration statistics and for comparing two graphs
run the same way, not a bit-exact model of a bf16 engine.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsc.errors import BadInput

LEVELS = ("none", "basic", "extended", "all")


def check_level(optimization: str) -> None:
    """Raise ValueError unless `optimization` is one of `LEVELS` (a caller's bug, not input)."""
    if optimization not in LEVELS:
        raise ValueError(f"optimization must be one of {', '.join(LEVELS)}, got {optimization!r}")


# OrtCausalLM's arena default: on up to this much weight data (the fp32 copies of an fp16 graph
# then stay within 2 GiB), off above (see OrtCausalLM.__init__).
ARENA_MAX_WEIGHT_BYTES = 1 << 30


def graph_weight_bytes(graph) -> int:
    """Bytes of a graph's weights: its files' sizes (model.onnx and its external data), or the
    initializers' sizes of an in-memory onnx_ir model."""
    if hasattr(graph, "graph"):
        return sum(v.const_value.nbytes for v in graph.graph.initializers.values() if v.const_value)
    path = Path(graph)
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def session_options(
    optimization: str = "basic", threads: int | None = None, *, arena: bool = False
):
    """ONNX Runtime session options that run a dsc graph as written.

    `optimization` is ONNX Runtime's graph optimization level. "basic" (the default) applies
    only rewrites that keep the graph's arithmetic (constant folding, redundant nodes): what
    ONNX Runtime computes is then the graph TensorRT is handed. Its extended level replaces
    `DequantizeLinear -> MatMul` with its own `MatMulNBits` kernels, which changes the numbers:
    with onnxruntime 1.32 an INT8 weight-only tiny-qwen2 graph's mean KL against fp16 triples
    at "all" (0.00009 against 0.000028 as written) and at "extended" its perplexity goes from
    30.4 to 1,662. "all" is for speed measurements of unquantized graphs.

    The CPU memory arena is off unless `arena`: with it, ONNX Runtime keeps the peak of every
    run, and a calibration session that exposes every activation grew by ~7 GB per batch on the
    R1-Distill-Qwen-1.5B config (22.5 GB peak over 2 batches of 4 x 128 tokens, 14.7 GB without
    the arena; same run time). Runners that step a graph many times (`OrtCausalLM`: the gate,
    the smoke check, `dsc run`, `dsc bench`) turn it on: ONNX Runtime's CPU provider has no fp16
    MatMul on x86, so it casts each fp16 weight to fp32 inside every run (it does not fold the
    cast), and without the arena every run maps and unmaps those fp32 copies afresh. Measured
    with `python benchmarks/ort_fp16_cast.py` (one MatMul, 4096 x 4096 fp16 weight, batch 1):
    arena off 16,400 minor page faults per run (64 MiB: the weight's fp32 copy, every run),
    arena on 1,742; see docs/BENCHMARKS.md for the times.
    """
    import onnxruntime as ort

    check_level(optimization)
    level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = level
    opts.enable_cpu_mem_arena = arena
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def ort_dtype(dtype: str) -> np.dtype:
    """The numpy dtype ONNX Runtime takes and returns for a graph value of `dtype` (a
    `model_io.json` name such as "float16"): float32 for "bfloat16", run as `float32_view`."""
    return np.dtype(np.float32) if dtype == "bfloat16" else np.dtype(dtype)


def is_bf16(model) -> bool:
    """Whether an `onnx_ir` model has a bfloat16 graph input, output or initializer."""
    import onnx_ir as ir

    bf16 = ir.DataType.BFLOAT16
    g = model.graph
    return any(v.dtype == bf16 for v in (*g.inputs, *g.outputs, *g.initializers.values()))


def float32_view(model):
    """A copy of an `onnx_ir` model with every bfloat16 type made float32; the input is unchanged.

    Graph inputs/outputs, node outputs, initializers (converted lazily, on serialization: the
    copy shares the other tensors), tensor attributes (`Constant`, `ConstantOfShape`) and dtype
    attributes (`Cast(to=)`, `dtype=`) of the main graph and every subgraph. bf16 → float32 is
    exact, so the view computes the bf16 graph without its intermediate rounding to bf16.
    Q/DQ scales stored in bf16 become float32 scales of the same value.
    """
    import onnx_ir as ir

    bf16, f32 = ir.DataType.BFLOAT16, ir.DataType.FLOAT

    def widen(tensor, name=None):
        return ir.LazyTensor(
            lambda t=tensor: ir.tensor(t.numpy().astype(np.float32)),
            dtype=f32,
            shape=tensor.shape,
            name=name or tensor.name,
        )

    view = model.clone()
    for g in (view.graph, *view.graph.subgraphs()):
        values = [*g.inputs, *g.outputs, *g.initializers.values()]
        for node in g:
            values.extend(node.outputs)
            for name, attr in list(node.attributes.items()):
                if (
                    attr.type == ir.AttributeType.INT
                    and name in ("to", "dtype")
                    and attr.value == bf16.value
                ):
                    node.attributes[name] = ir.Attr(name, ir.AttributeType.INT, f32.value)
                elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype == bf16:
                    node.attributes[name] = ir.Attr(
                        name,
                        ir.AttributeType.TENSOR,
                        ir.tensor(attr.value.numpy().astype(np.float32)),
                    )
        for v in values:
            if v.dtype == bf16:
                # A new type object: a clone shares its types with the original, and
                # `Value.dtype = ...` would change the shared one in place.
                v.type = ir.TensorType(f32)
                if v.const_value is not None and v.const_value.dtype == bf16:
                    v.const_value = widen(v.const_value, v.name)
    return view


def _file_is_bf16(path: Path) -> bool:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    bf16 = onnx.TensorProto.BFLOAT16
    g = proto.graph
    return any(v.type.tensor_type.elem_type == bf16 for v in (*g.input, *g.output)) or any(
        t.data_type == bf16 for t in g.initializer
    )


# ONNX Runtime reads a graph handed over as bytes through protobuf (2 GiB at most); above this
# many bytes of tensors held in memory, `inference_session` writes them to a file instead.
_IN_MEMORY_LIMIT = 3 * 2**29


def external_base_dir(model) -> Path | None:
    """The one directory the external tensors of an onnx_ir model are read from (None: none).

    Raises ValueError if they come from several directories (no ONNX Runtime session can
    resolve that from bytes)."""
    import onnx_ir as ir

    dirs = {
        Path(v.const_value.base_dir).resolve()
        for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    if len(dirs) > 1:
        raise ValueError(f"external tensors come from several directories: {sorted(dirs)}")
    return dirs.pop() if dirs else None


@contextlib.contextmanager
def spilled(model) -> Iterator[tuple[object, Path | None]]:
    """`model` ready to be handed to ONNX Runtime as a proto: yields (model, base_dir).

    A bf16 model becomes its `float32_view` (same value names; float32 types). A model holding
    more than 1.5 GiB of tensors in memory (e.g. SmoothQuant's rescaled weights) is written to
    a private temporary directory with external data and reloaded lazily, since the bytes
    handed to ONNX Runtime cannot exceed protobuf's 2 GiB; the
    directory lives until the block ends. Otherwise `model` itself and the directory its
    external tensors are read from (None: it has none).
    """
    import onnx_ir as ir

    if is_bf16(model):  # ONNX Runtime's CPU provider has no bf16 MatMul
        model = float32_view(model)
    in_memory = sum(
        v.const_value.nbytes
        for v in model.graph.initializers.values()
        if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor)
    )
    if in_memory <= _IN_MEMORY_LIMIT:
        yield model, external_base_dir(model)
        return
    with tempfile.TemporaryDirectory(prefix="dsc-ort-") as tmp:
        path = Path(tmp) / "graph.onnx"
        ir.save(model, path, external_data="graph.onnx.data")
        yield ir.load(path), Path(tmp)


def inference_session(
    graph,
    *,
    base_dir: Path | None = None,
    optimization: str = "basic",
    threads: int | None = None,
    providers: list[str] | None = None,
    arena: bool = False,
):
    """An ONNX Runtime session over `graph`: a path, an onnx_ir model or an `onnx.ModelProto`.

    A bf16 graph runs as its `float32_view` (feed and read float32: `ort_dtype`). Any other
    path is opened as a file, so ONNX Runtime finds its external data beside it. A graph in
    memory is never resolved against the current directory: its external tensors are read from
    their own directory (`base_dir` for a ModelProto, which does not carry one; an onnx_ir
    model knows it, see `spilled`) through ONNX Runtime's
    `session.model_external_initializers_file_folder_path`. `arena`: see `session_options`.
    Errors are ONNX Runtime's.
    """
    import onnxruntime as ort

    opts = session_options(optimization, threads, arena=arena)
    providers = providers or ["CPUExecutionProvider"]
    if isinstance(graph, (str, Path)):
        if not _file_is_bf16(Path(graph)):
            return ort.InferenceSession(str(graph), sess_options=opts, providers=providers)
        import onnx_ir as ir

        graph = ir.load(str(graph))  # run as its float32 view, below
    if not hasattr(graph, "SerializeToString"):  # an onnx_ir model
        import onnx_ir as ir

        with spilled(graph) as (model, base):
            # ONNX Runtime has read (or mapped) the weights once the session exists.
            return inference_session(
                ir.to_proto(model),
                base_dir=base,
                optimization=optimization,
                threads=threads,
                providers=providers,
                arena=arena,
            )
    if base_dir is not None:
        opts.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(base_dir)
        )
    return ort.InferenceSession(graph.SerializeToString(), sess_options=opts, providers=providers)


@dataclass
class StepOutput:
    """One forward pass: `logits` [batch, seq, vocab] (float32, or the graph's float dtype)
    and `present`, the KV cache after it: one array per cache entry per layer, in the I/O
    spec's order, each [batch, heads, past + seq, dim]."""

    logits: np.ndarray
    present: list[np.ndarray]


class OrtCausalLM:
    """A dsc ONNX graph in an ONNX Runtime session: prefill/decode steps and generation.

    Inputs of a step (int64): `input_ids` [batch, seq], `attention_mask` [batch, past + seq]
    (1 for real tokens, 0 for left padding), `position_ids` [batch, seq]; the past KV cache as
    `cache.entries` arrays per layer, each [batch, heads, past, dim] (MLA caches the latent:
    heads 1). Outputs: `StepOutput`. `io_spec` is the artifact's model_io.json.
    Raises `BadInput` (exit 3) when ONNX Runtime cannot load the graph; a bad `optimization`
    level ("disable", "basic", "extended", "all") is a `ValueError` (a bug, not input).
    """

    def __init__(
        self,
        onnx_path,
        io_spec: dict,
        *,
        providers: list[str] | None = None,
        threads: int | None = None,
        optimization: str = "basic",
        arena: bool | None = None,
    ):
        """`onnx_path`: the graph's file, or an onnx_ir model (see `inference_session`);
        `providers`: ONNX Runtime execution providers (default: CPU); `threads`: intra-op
        threads (None: ONNX Runtime's default); `arena`: ONNX Runtime's CPU memory arena
        (see `session_options`); None: on for graphs whose weights are at most
        `ARENA_MAX_WEIGHT_BYTES`, off above. The arena keeps the peak of a run, which for an
        fp16 graph includes the fp32 copy of every weight: the R1-Distill-Qwen-1.5B INT8 build's
        gate was OOM-killed at 24.2 GB RSS on a 24 GB host with it on."""
        if arena is None:
            arena = graph_weight_bytes(onnx_path) <= ARENA_MAX_WEIGHT_BYTES
        self._take_io(io_spec)
        check_level(optimization)  # outside the try: a bad level is a bug, not a bad graph
        try:
            graph = onnx_path if hasattr(onnx_path, "graph") else Path(onnx_path)
            self.session = inference_session(
                graph,
                optimization=optimization,
                threads=threads,
                providers=providers,
                arena=arena,
            )
        except Exception as e:  # ORT raises its own exception types for malformed graphs
            where = "the graph" if hasattr(onnx_path, "graph") else onnx_path
            raise BadInput(f"ONNX Runtime cannot load {where}: {str(e).splitlines()[0]}") from None
        self._outputs = ["logits", *self.present_names]

    def _take_io(self, io_spec: dict) -> None:
        """The step interface's names and cache layout, from model_io.json."""
        self.io = io_spec
        cache = io_spec["cache"]
        # A bf16 graph runs as its float32 view (see the module docstring).
        self.float32_view = cache["dtype"] == "bfloat16"
        self.cache_dtype = ort_dtype(cache["dtype"])
        self.num_layers = int(cache["num_layers"])
        self.entries = [(e["heads"], e["dim"]) for e in cache["entries"]]
        self.past_names = cache["inputs"]
        self.present_names = cache["outputs"]

    @classmethod
    def from_artifact(cls, artifact: Path, **kw) -> OrtCausalLM:
        """The artifact's graph (`model_io.json` → `onnx`); `BadInput` (exit 3) when the
        directory is not a dsc artifact or the graph does not load."""
        from dsc.artifacts import load_io_spec

        io = load_io_spec(artifact)
        return cls(Path(artifact) / io["onnx"], io, **kw)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """The KV cache before the first token: per layer and entry [batch, heads, 0, dim]."""
        past = []
        for _ in range(self.num_layers):
            for heads, dim in self.entries:
                past.append(np.zeros((batch, heads, 0, dim), dtype=self.cache_dtype))
        return past

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list[np.ndarray],
    ) -> StepOutput:
        """One forward pass (shapes in the class docstring); `past` as from `empty_past` or a
        previous step's `present`. ONNX Runtime's errors (wrong shapes) propagate."""
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
            "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
        }
        feeds.update(zip(self.past_names, past, strict=False))
        logits, *present = self.session.run(self._outputs, feeds)
        return StepOutput(logits, present)

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        greedy: bool = True,
        temperature: float = 1.0,
        seed: int = 0,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        on_step=None,
    ) -> list[list[int]]:
        """Continue each prompt (token ids; left-padded with `pad_token_id` into one batch) by up
        to `max_new_tokens` tokens: argmax when `greedy`, else sampled at `temperature` with
        `seed`. Returns only the new tokens per prompt (a row stops at `eos_token_id`).
        `on_step`: called with no argument after each forward pass (the prompt's, then one per
        token after the first), for progress. Raises `BadInput` (exit 3) for no prompts or an
        empty one."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise BadInput("generation needs at least one token per prompt")
        rng = np.random.default_rng(seed)
        batch = len(prompts)
        width = max(len(p) for p in prompts)
        ids = np.full((batch, width), pad_token_id, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = p
            mask[row, width - len(p) :] = 1
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        tick = on_step or (lambda: None)
        out = self.step(ids, mask, pos, self.empty_past(batch))
        tick()
        next_pos = pos[:, -1:] + 1
        generated: list[list[int]] = [[] for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        for i in range(max_new_tokens):
            last = out.logits[:, -1, :].astype(np.float32)
            if greedy:
                tok = last.argmax(axis=-1)
            else:
                z = last / max(temperature, 1e-5)
                z = np.exp(z - z.max(axis=-1, keepdims=True))
                z /= z.sum(axis=-1, keepdims=True)
                tok = np.array([rng.choice(z.shape[-1], p=row) for row in z])
            for row in range(batch):
                if not done[row]:
                    generated[row].append(int(tok[row]))
                    if eos_token_id is not None and tok[row] == eos_token_id:
                        done[row] = True
            if done.all() or i == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            out = self.step(tok[:, None], mask, next_pos, out.present)
            tick()
            next_pos = next_pos + 1
        return generated

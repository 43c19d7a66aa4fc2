"""Optimization profiles for a KV-cache graph: input axis roles → min/opt/max shapes.

Each axis of each graph input has a role: `batch`, `seq` (new tokens), `past` (cached tokens),
`total` (past + seq, the attention mask), or a fixed size. Roles come from the exporter's
`model_io.json` when there is one (`io_roles_from_spec`) and otherwise from the ONNX graph
(`infer_io_roles`): dimension symbols first (`batch`, `seq`, `past`, `total_seq`, ...), then the
input name (`input_ids`, `position_ids` → [batch, seq]; `attention_mask` → [batch, total];
`past_key_values.N.*` → [batch, fixed, past, fixed]).

A `ShapeEnvelope` (max batch B, max input length L, max KV capacity K, and the prefill token
budget N) gives two profiles:

    prefill  batch 1..Bp  seq 1..L (opt L/2)   past 0..K-L (opt 0)    Bp = min(B, max(1, N // L))
    decode   batch 1..B   seq 1                past 1..K-1 (opt K/2)

so that past + seq never exceeds K, and `total` follows as past + seq. Batch opt is half the max.

N is TensorRT-LLM's `max_num_tokens` (the most tokens one forward pass takes; its default is 8192,
https://nvidia.github.io/TensorRT-LLM/performance/performance-tuning-guide/tuning-max-batch-size-and-max-num-tokens.html).
Without it the prefill profile's largest shape is B x L tokens, and the attention scores of an
unfused prefill are B x heads x L x L: at R1-Distill-Qwen-1.5B on jetson-orin (B 8, L 4,096) the
TensorRT-RTX builder asked for a 7.85 GB buffer and failed (docs/BENCHMARKS.md). A runtime runs a
larger prefill batch as several passes of at most Bp sequences; decode keeps batch B.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dsc.errors import BadInput

ROLES = ("batch", "seq", "past", "total")

# Axis role per input, e.g. {"input_ids": ("batch", "seq"), "past_key_values.0.key":
# ("batch", 8, "past", 128)}; an int is a fixed size, None an unknown one.
IoRoles = dict[str, tuple]

_SYMBOLS = {
    "batch": "batch",
    "batch_size": "batch",
    "b": "batch",
    "seq": "seq",
    "seq_len": "seq",
    "sequence": "seq",
    "sequence_length": "seq",
    "seq_length": "seq",
    "q_len": "seq",
    "num_tokens": "seq",
    "new_tokens": "seq",
    "past": "past",
    "past_len": "past",
    "past_seq": "past",
    "past_length": "past",
    "past_sequence_length": "past",
    "past_seq_len": "past",
    "cache_len": "past",
    "total": "total",
    "total_seq": "total",
    "total_len": "total",
    "total_length": "total",
    "total_sequence_length": "total",
    "kv_len": "total",
    "past+seq": "total",
    "seq+past": "total",
    "past_seq+seq": "total",
}

_CACHE_INPUT = re.compile(r"^(past_key_values|past|cache)[._]\d+[._]")


@dataclass(frozen=True)
class ShapeEnvelope:
    """The largest request the engine must serve."""

    max_batch: int
    max_input_len: int
    max_kv: int
    # Prefill token budget (batch x seq of one prefill pass); None: max_batch x max_input_len.
    max_num_tokens: int | None = None

    def __post_init__(self):
        for name in ("max_batch", "max_input_len", "max_kv", "max_num_tokens"):
            value = getattr(self, name)
            if value is None and name == "max_num_tokens":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BadInput(f"shape envelope {name} must be a positive integer, got {value!r}")
        if self.max_input_len > self.max_kv:
            raise BadInput(
                f"shape envelope max_input_len ({self.max_input_len}) exceeds "
                f"max_kv ({self.max_kv}): the prompt must fit the KV cache"
            )

    @property
    def max_prefill_batch(self) -> int:
        """Largest batch of one prefill pass:
        min(max_batch, max(1, max_num_tokens // max_input_len))."""
        if self.max_num_tokens is None:
            return self.max_batch
        return min(self.max_batch, max(1, self.max_num_tokens // self.max_input_len))

    def profiles(self) -> list[ProfileRanges]:
        """The (min, opt, max) of every role, per profile: prefill first, then decode."""
        b = (1, max(1, self.max_batch // 2), self.max_batch)
        bp = self.max_prefill_batch
        prefill = ProfileRanges(
            "prefill",
            batch=(1, max(1, bp // 2), bp),
            seq=(1, max(1, self.max_input_len // 2), self.max_input_len),
            past=(0, 0, self.max_kv - self.max_input_len),
        )
        decode_past_max = max(1, self.max_kv - 1)
        decode = ProfileRanges(
            "decode",
            batch=b,
            seq=(1, 1, 1),
            past=(1, max(1, min(self.max_kv // 2, decode_past_max)), decode_past_max),
        )
        return [prefill, decode]


@dataclass(frozen=True)
class ProfileRanges:
    name: str
    batch: tuple[int, int, int]
    seq: tuple[int, int, int]
    past: tuple[int, int, int]

    def of(self, role: str) -> tuple[int, int, int]:
        if role == "total":
            return tuple(p + s for p, s in zip(self.past, self.seq, strict=True))  # type: ignore[return-value]
        return getattr(self, role)


@dataclass(frozen=True)
class ProfileShapes:
    """One optimization profile as built: input name → (min, opt, max) shapes."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "shapes": {
                k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])}
                for k, v in self.shapes.items()
            },
        }


def _symbol_role(symbol: str) -> str | None:
    key = re.sub(r"\s+", "", symbol.strip().lower())
    return _SYMBOLS.get(key)


def _name_roles(name: str, rank: int) -> tuple | None:
    """Roles implied by the input name alone (positions only; sizes unknown)."""
    base = name.lower()
    if base in ("input_ids", "position_ids", "token_type_ids", "inputs_embeds_ids") and rank == 2:
        return ("batch", "seq")
    if base == "position_ids" and rank == 3:  # mrope-style [3, batch, seq]
        return (None, "batch", "seq")
    if base == "attention_mask" and rank == 2:
        return ("batch", "total")
    if base == "cache_position" and rank == 1:
        return ("seq",)
    if _CACHE_INPUT.match(base) and rank == 4:
        return ("batch", None, "past", None)
    return None


def roles_for_input(name: str, dims: Iterable) -> tuple:
    """The role tuple of one input from its dims (ints, symbol strings or None)."""
    dims = list(dims)
    by_name = _name_roles(name, len(dims))
    roles = []
    for axis, dim in enumerate(dims):
        if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0:
            roles.append(dim)
            continue
        role = _symbol_role(dim) if isinstance(dim, str) and dim else None
        if role is None and by_name is not None:
            role = by_name[axis]
        if role is None:
            raise BadInput(
                f"cannot tell what axis {axis} ({dim or '?'}) of graph input {name!r} "
                f"is: name it batch, seq, past or total_seq, or describe the input in "
                f"the io spec"
            )
        roles.append(role)
    return tuple(roles)


def io_roles_from_spec(io_spec: Mapping) -> IoRoles:
    """Roles from the exporter's `model_io.json` (`{"inputs": [{"name", "shape"}, ...]}`).

    Also accepts `{"inputs": {name: shape}}` or a plain `{name: shape}`; a shape entry is an int
    (fixed), a symbol (`batch`, `seq`, `past`, `total_seq`, ...) or a role name.
    """
    inputs = io_spec.get("inputs", io_spec) if isinstance(io_spec, Mapping) else io_spec
    if isinstance(inputs, Mapping):
        items = list(inputs.items())
    else:
        try:
            items = [(entry["name"], entry["shape"]) for entry in inputs]
        except (TypeError, KeyError) as e:
            raise BadInput(f"io spec inputs must list {{name, shape}} entries ({e})") from None
    if not items:
        raise BadInput("io spec lists no inputs")
    return {str(name): roles_for_input(str(name), shape) for name, shape in items}


def infer_io_roles(onnx_path: str | Path) -> IoRoles:
    """Roles of every graph input of an ONNX file, from dim symbols and input names.

    Reads only the graph structure: external weight data is not loaded.
    """
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise BadInput(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise BadInput(f"cannot read ONNX file {path}: {type(e).__name__}: {e}") from None
    initializers = {t.name for t in model.graph.initializer}
    roles: IoRoles = {}
    for value in model.graph.input:
        if value.name in initializers:  # IR < 4 lists weights as inputs too
            continue
        dims = [
            d.dim_param
            if d.HasField("dim_param")
            else (d.dim_value if d.HasField("dim_value") else None)
            for d in value.type.tensor_type.shape.dim
        ]
        roles[value.name] = roles_for_input(value.name, dims)
    return roles


def profile_shapes(
    roles: Mapping[str, tuple],
    envelope: ShapeEnvelope,
    network_shapes: Mapping[str, tuple] | None = None,
) -> list[ProfileShapes]:
    """min/opt/max per input for each profile of the envelope.

    `network_shapes` (the parsed network's input shapes, -1 = dynamic) wins over the roles: an
    axis the graph fixed stays fixed, whatever its role.
    """
    out = []
    for ranges in envelope.profiles():
        shapes = {}
        for name, axes in roles.items():
            fixed = None
            if network_shapes and name in network_shapes:
                fixed = tuple(network_shapes[name])
            if fixed is not None and len(fixed) != len(axes):
                raise BadInput(
                    f"graph input {name!r} has rank {len(fixed)} but the io spec "
                    f"describes {len(axes)} axes"
                )
            lo, opt, hi = [], [], []
            for axis, role in enumerate(axes):
                if fixed is not None and fixed[axis] >= 0:
                    triple = (fixed[axis],) * 3
                elif isinstance(role, int):
                    triple = (role,) * 3
                elif role in ROLES:
                    triple = ranges.of(role)
                else:
                    raise BadInput(f"graph input {name!r} axis {axis} has unknown role {role!r}")
                lo.append(triple[0])
                opt.append(triple[1])
                hi.append(triple[2])
            shapes[name] = (tuple(lo), tuple(opt), tuple(hi))
        out.append(ProfileShapes(ranges.name, shapes))
    return out

"""Small helpers on onnx_ir graphs shared by the passes: constants, producers, shape tensors.

`shape_expr(value)` reads a 1-D int64 shape tensor built by the exporter (Shape → Slice →
Concat ... chains, constants, Squeeze/Unsqueeze/Reshape of scalars) as a list of entries, each
an `int` or a `Dim(value, axis)` meaning "axis `axis` of tensor `value`". Fusions use it to
prove that a Reshape/Expand computes what the rewrite assumes, without shape inference.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from dsc.errors import BadInput

_counter = itertools.count()


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant content (initializer or Constant node output), else None."""
    tensor = _const_tensor(value)
    if tensor is None:
        return None
    try:
        return tensor.numpy()
    except Exception:  # external data that cannot be read
        return None


def _const_tensor(value: ir.Value | None):
    """The value's constant tensor (initializer or Constant node's), not read; else None."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        node = value.producer()
        if node is not None and node.op_type == "Constant" and "value" in node.attributes:
            tensor = node.attributes["value"].as_tensor()
    return tensor


@dataclass(frozen=True)
class ConstInfo:
    """Shape and element type of a constant, read from its tensor's header, not its data."""

    shape: tuple[int, ...]
    dtype: ir.DataType

    @property
    def ndim(self) -> int:
        return len(self.shape)


def const_info(value: ir.Value | None) -> ConstInfo | None:
    """The shape and dtype of the value's constant content (initializer or Constant node
    output) without reading the data (an external weight stays on disk), else None."""
    tensor = _const_tensor(value)
    if tensor is None or tensor.shape is None:
        return None
    dims = tuple(tensor.shape)
    if not all(isinstance(d, int) for d in dims):
        return None
    return ConstInfo(dims, tensor.dtype)


class DerivedTensor(ir.LazyTensor):
    """A weight computed from other weights when read (`lazy_const`, `derive_in_place`):
    when the graph is written, or by a pass that reads it, never held between reads.
    `sources` names the initializers it is computed from, in the order it reads them;
    `source_tensors` are their tensors (or the values holding them), which `set_base_dir`
    follows when the files they read move."""

    def __init__(
        self, func, dtype, shape, *, name: str, sources: tuple[str, ...], source_tensors=()
    ):
        super().__init__(func, dtype=dtype, shape=shape, name=name)
        self.sources = sources
        self.source_tensors = tuple(source_tensors)


def set_base_dir(model: ir.Model, base_dir) -> int:
    """Point every external tensor the model reads at `base_dir`: its initializers', and those
    the `DerivedTensor`s among them are computed from (weights a pass replaced, no longer in the
    graph). Returns how many were set. For when the graph's data file moves before the graph is
    written (the quantize stage moves its input to `reference/`)."""
    from dsc.artifacts import external_tensors

    tensors = external_tensors(model)
    for t in tensors:
        t.base_dir = base_dir
    return len(tensors)


def read_tensor(tensor) -> np.ndarray:
    """A tensor's content as an array of its own (a copy), an external tensor's memory map
    released after the copy."""
    out = np.array(tensor.numpy(), copy=True)
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()
    return out


def iter_rows(tensor, rows: int):
    """Yield (first row, array) for consecutive chunks of at most `rows` rows (first axis) of a
    tensor, each an array of its own. An external tensor is read with plain file reads, one
    chunk at a time, so neither the whole tensor nor a memory map of it is ever resident; any
    other tensor is sliced from its array. Raises ValueError for a sub-byte dtype (rows need
    not end on a byte) or a 0-d tensor, `BadInput` (exit 3) when the data file is too short."""
    shape = tuple(int(d) for d in tensor.shape)
    if not shape:
        raise ValueError(f"{tensor.name}: a 0-d tensor has no rows")
    dtype = tensor.dtype.numpy()
    if tensor.dtype.bitwidth < 8:
        raise ValueError(f"{tensor.name}: sub-byte dtype {tensor.dtype} is not read by rows")
    per_row = int(np.prod(shape[1:], dtype=np.int64))
    rows = max(1, int(rows))
    if isinstance(tensor, ir.ExternalTensor):
        row_bytes = per_row * dtype.itemsize
        with open(tensor.path, "rb") as f:
            for r0 in range(0, shape[0], rows):
                n = min(rows, shape[0] - r0)
                f.seek((tensor.offset or 0) + r0 * row_bytes)
                out = np.empty((n, *shape[1:]), dtype=dtype)
                if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != n * row_bytes:
                    raise BadInput(f"{tensor.name}: external data ends early ({tensor.path})")
                yield r0, out
        return
    arr = tensor.numpy()
    for r0 in range(0, shape[0], rows):
        yield r0, np.array(arr[r0 : r0 + rows], copy=True)


def derive_in_place(value: ir.Value, fn) -> None:
    """Replace the constant of `value` (an initializer) by `fn(its current content)`, computed
    when read (a `DerivedTensor` over the tensor it had: the rescaled weights of SmoothQuant and
    AWQ). `fn` returns an array of the same shape and dtype."""
    src = value.const_value
    dtype, shape, name = src.dtype, ir.Shape(list(src.shape)), value.name

    def compute():
        out = np.ascontiguousarray(fn(read_tensor(src)))
        if tuple(out.shape) != tuple(shape):
            raise RuntimeError(f"{name}: derived {out.shape}, declared {tuple(shape)} (a dsc bug)")
        return ir.tensor(out, dtype=dtype, name=name)

    value.const_value = DerivedTensor(
        compute, dtype, shape, name=name, sources=(name,), source_tensors=(src,)
    )


def read_consts(*values: ir.Value) -> list[np.ndarray]:
    """The constants' contents as arrays of their own (copies), each external tensor's memory
    map released after the copy, so a pass that derives a weight from others holds only the
    arrays it asked for, not their pages. Raises ValueError for a value with no constant."""
    out = []
    for value in values:
        tensor = _const_tensor(value)
        if tensor is None:
            raise ValueError(f"{value.name} has no constant value")
        out.append(read_tensor(tensor))
    return out


def const_scalar(value: ir.Value | None) -> float | int | None:
    arr = const_array(value)
    if arr is None or arr.size != 1:
        return None
    item = arr.reshape(-1)[0]
    return item.item() if hasattr(item, "item") else item


def const_ints(value: ir.Value | None) -> list[int] | None:
    arr = const_array(value)
    if arr is None or arr.dtype.kind not in "iu":
        return None
    return [int(x) for x in arr.reshape(-1)]


def producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The node producing `value` if its op type is one of `op_types` (any, if none given)."""
    if value is None:
        return None
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if op_types and node.op_type not in op_types:
        return None
    return node


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def dim(value: ir.Value, axis: int):
    """A static int, a symbol string, or None."""
    if value.shape is None:
        return None
    d = value.shape[axis]
    if isinstance(d, int):
        return d
    return getattr(d, "value", None)


def dtype_name(value: ir.Value | None) -> str | None:
    if value is None or value.dtype is None:
        return None
    return value.dtype.numpy().name if value.dtype != ir.DataType.BFLOAT16 else "bfloat16"


_taken: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reset_unique_names() -> None:
    """Restart `unique_name`'s counter. Called when a pass pipeline or a quantization starts,
    so the same graph gets the same new names whatever ran earlier in this process (two builds
    in one process, e.g. a test session or a matrix worker, wrote different ONNX bytes)."""
    global _counter
    _counter = itertools.count()
    _taken.clear()


def unique_name(graph: ir.Graph, stem: str) -> str:
    """`stem__dscN`, a name no value of `graph` (or of its subgraphs) has.

    Deterministic (a counter restarted by `reset_unique_names`), so the same input gives the
    same output; names left by an earlier optimization run are collected once per graph and
    skipped.
    """
    taken = _taken.get(graph)
    if taken is None:
        taken = {v.name for v in graph.initializers.values() if "__dsc" in (v.name or "")}
        for node in ir.traversal.RecursiveGraphIterator(graph):
            taken.update(v.name for v in node.outputs if "__dsc" in (v.name or ""))
        _taken[graph] = taken
    base = stem.split("__dsc")[0]
    while True:
        name = f"{base}__dsc{next(_counter)}"
        if name not in taken and name not in graph.initializers:
            taken.add(name)
            return name


def add_initializer(graph: ir.Graph, stem: str, array: np.ndarray) -> ir.Value:
    """Register a new initializer holding `array` in the main graph; return its value."""
    name = unique_name(graph, stem)
    tensor = ir.tensor(np.ascontiguousarray(array), name=name)
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value


# -- shape tensors --------------------------------------------------------------------------


@dataclass(frozen=True)
class Dim:
    """Axis `axis` of tensor `value` (a symbolic shape entry)."""

    value: ir.Value
    axis: int

    def same_as(self, other: object) -> bool:
        """The same axis of the same tensor, or the same named symbolic dim."""
        if not isinstance(other, Dim):
            return False
        if self.value is other.value and self.axis == other.axis:
            return True
        a, b = _symbol(self), _symbol(other)
        return a is not None and a == b


def _symbol(d: Dim) -> str | int | None:
    shape = d.value.shape
    if shape is None or not -len(shape) <= d.axis < len(shape):
        return None
    x = shape[d.axis]
    if isinstance(x, int):
        return x
    return getattr(x, "value", None)


def entry_equals(entry, expected) -> bool:
    """Does a shape_expr entry equal `expected` (an int, a Dim, or a static dim of a Dim)?"""
    if isinstance(entry, Dim) and isinstance(expected, Dim):
        return entry.same_as(expected)
    if isinstance(entry, Dim):
        entry = _symbol(entry)
    if isinstance(expected, Dim):
        expected = _symbol(expected)
    return entry is not None and entry == expected


def shape_expr(value: ir.Value | None, depth: int = 0) -> list | None:
    """Entries of a 1-D shape tensor as ints / `Dim`s; None if it cannot be read."""
    if value is None or depth > 12:
        return None
    arr = const_array(value)
    if arr is not None:
        return [int(x) for x in arr.reshape(-1)] if arr.dtype.kind in "iu" else None
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op == "Shape":
        src = node.inputs[0]
        r = rank(src)
        if r is None:
            return None
        start = attr(node, "start", 0)
        end = attr(node, "end", r)
        start, end = (max(0, min(r, x + r if x < 0 else x)) for x in (start, end))
        return [Dim(src, a) for a in range(start, end)]
    if op == "Concat":
        out = []
        for x in node.inputs:
            part = shape_expr(x, depth + 1)
            if part is None:
                return None
            out += part
        return out
    if op in ("Squeeze", "Unsqueeze", "Reshape", "Identity"):
        part = shape_expr(node.inputs[0], depth + 1)
        return part if part is not None and len(part) == 1 else None
    if op == "Slice":
        part = shape_expr(node.inputs[0], depth + 1)
        starts, ends = const_ints(node.inputs[1]), const_ints(node.inputs[2])
        axes = const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else [0]
        steps = const_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else [1]
        if part is None or not starts or not ends or axes != [0] or steps != [1]:
            return None
        n = len(part)
        s, e = starts[0], ends[0]
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(0, min(n, e + n if e < 0 else e))
        return part[s:e]
    if op == "Gather":
        part = shape_expr(node.inputs[0], depth + 1)
        idx = const_ints(node.inputs[1])
        if part is None or idx is None or attr(node, "axis", 0) != 0:
            return None
        try:
            return [part[i] for i in idx]
        except IndexError:
            return None
    return None

"""Where a per-channel 1/s for an activation can be folded, exactly, so the graph gains no op.

SmoothQuant and AWQ rewrite X W as (X / s)(diag(s) W). diag(s) goes into the weight rows of the
linear layers reading X; 1/s must go into whatever produces X. `find_fold(X)` walks back from X
to a per-channel constant it can divide:

- a norm's gamma: `Mul(gamma, normed)` (exported RMSNorm) or `RMSNormalization(x, scale)`
  (the fused form, opset 23), gamma a single-use 1-D initializer;
- the output columns of a linear layer: `MatMul(x, W)` (+ bias), W a single-use 2-D
  initializer: W[:, c] /= s, bias[c] /= s.

Between the two, only ops that move channels or scale each one independently are crossed, and
the channel map is tracked through them: Reshape / Transpose / Unsqueeze / Squeeze / Expand /
Cast / Identity, Split and Slice (a channel subset: the fused gate_up GEMM's up half, MLA's
value half of kv_b_proj), Concat with a KV-cache graph input along a non-channel axis,
`MatMul(P, V)` on V's non-contracted axes (attention: P does not depend on V), and
`Mul(v, y)` / `Div(v, y)` with y independent of v (the SwiGLU product SiLU(g) * up). So:

    q/k/v, gate/up, q_b/kv_b (MLA) ← norm gamma     down_proj ← up_proj columns
    o_proj ← v_proj columns, per (head, dim); GQA: o channel (h, d) ← v channel (h // G, d)
    o_proj (MLA) ← kv_b_proj's value columns (the cache holds compressed_kv, untouched)

Every value on the way must be read only by the next op on the way (Shape readers aside), or be
the KV cache output of a Concat with the cache input (`cache`: the cache then holds the scaled
values, which the same graph reads back); Split/Slice siblings must take other columns. Where
several activation channels come from one column (GQA) the scales must be equal across them:
`Fold.tie` pools a statistic over such channels before the scale is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from dsc.node_meta import module_path
from dsc.passes._ir import attr, const_array, const_ints, derive_in_place

_MOVE = (
    "Reshape",
    "Transpose",
    "Unsqueeze",
    "Squeeze",
    "Expand",
    "Cast",
    "Identity",
    "Split",
    "Slice",
    "Concat",
)
MAX_DEPTH = 24


@dataclass
class Fold:
    """1/s goes into entries `cols` (one per activation channel) of `tensor`'s last axis."""

    tensor: ir.Value  # 1-D gamma or 2-D [in, out] weight
    cols: np.ndarray
    bias: ir.Value | None = None
    kind: str = "norm"  # norm | linear
    where: str = ""
    via: tuple[str, ...] = ()
    cache: bool = False
    extra: list = field(default_factory=list)  # untouched sibling columns (checked disjoint)
    nodes: list = field(default_factory=list)  # producer of the scaled value and the path after

    @property
    def gated(self) -> bool:
        """The activation is a product of two projections (SwiGLU's SiLU(gate) * up)."""
        return self.kind == "linear" and "Mul" in self.via

    @property
    def tied(self) -> bool:
        return np.unique(self.cols).size < self.cols.size

    def tie(self, v: np.ndarray, how: str = "max") -> np.ndarray:
        """`v` (per activation channel) pooled over channels that share a column."""
        if not self.tied:
            return v
        uniq, inv = np.unique(self.cols, return_inverse=True)
        pooled = np.zeros(uniq.size, dtype=np.float64)
        if how == "max":
            pooled[:] = -np.inf
            np.maximum.at(pooled, inv, v.astype(np.float64))
        else:
            np.add.at(pooled, inv, v.astype(np.float64))
            pooled /= np.bincount(inv, minlength=uniq.size)
        return pooled[inv].astype(v.dtype)

    def apply(self, s: np.ndarray) -> None:
        """tensor[..., cols] /= s (in float32, stored back in the tensor's dtype)."""
        uniq, first = np.unique(self.cols, return_index=True)
        sc = s[first].astype(np.float32)
        if not np.allclose(s, sc[np.searchsorted(uniq, self.cols)], rtol=1e-6, atol=0):
            raise ValueError(
                f"scales differ across channels folded into one column of {self.where}"
            )

        def scaled(a: np.ndarray) -> np.ndarray:
            f = a.astype(np.float32)
            f[..., uniq] /= sc
            return f.astype(a.dtype)

        for v in (self.tensor, self.bias):
            if v is not None:  # computed when read (a weight is not held; see derive_in_place)
                derive_in_place(v, scaled)
        # Their outputs now differ from the float graph's by design: the validation locator
        # (dsc.validate.locate) does not compare them.
        from dsc.node_meta import RESCALED_KEY

        for node in self.nodes:
            node.metadata_props[RESCALED_KEY] = "1"

    def describe(self) -> dict:
        out = {"into": self.where, "kind": self.kind, "via": list(self.via)}
        if self.tied:
            out["tied_channels"] = int(self.cols.size - np.unique(self.cols).size)
        if self.cache:
            out["kv_cache"] = "the KV cache holds the scaled values (read back by this graph)"
        return out


@dataclass
class _Layout:
    """Which axes of a tensor carry the tracked channels, and their column index per position."""

    axes: tuple[int, ...]
    idx: np.ndarray
    rank: int


def _dims(v: ir.Value):
    return None if v is None or v.shape is None else list(v.shape)


def _rank(v: ir.Value | None) -> int | None:
    return None if v is None or v.shape is None else len(v.shape)


def _same(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    va, vb = getattr(a, "value", None), getattr(b, "value", None)
    return va is not None and va == vb


def _align(a: list, b: list) -> list[tuple[list[int], list[int]]] | None:
    """Segments (input axes, output axes) of a Reshape with equal element counts, or None."""
    segs, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        if i < len(a) and j < len(b) and not isinstance(a[i], int) and _same(a[i], b[j]):
            segs.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        ia, jb, pa, pb = [], [], 1, 1
        while not (pa == pb and (ia or jb)):
            if pa <= pb and i < len(a) and isinstance(a[i], int):
                pa, i = pa * a[i], i + 1
                ia.append(i - 1)
            elif j < len(b) and isinstance(b[j], int):
                pb, j = pb * b[j], j + 1
                jb.append(j - 1)
            elif i < len(a) and isinstance(a[i], int):
                pa, i = pa * a[i], i + 1
                ia.append(i - 1)
            else:
                return None
        segs.append((ia, jb))
    return segs


def _materialize(lay: _Layout, axes: list[int], dims: list) -> np.ndarray:
    shape = [dims[k] if k in lay.axes else 1 for k in axes]
    return np.broadcast_to(lay.idx.reshape(shape), [dims[k] for k in axes])


def _norm_axes(axes, r: int) -> list[int]:
    return sorted(a + r if a < 0 else a for a in axes)


def _transfer(node: ir.Node, i: int, out: ir.Value, lay: _Layout, fold: Fold) -> _Layout | str:
    """The layout of `out` given the layout of `node.inputs[i]`, or a reason it is not exact.

    Ranks come from the layout; dims from the values' shapes where an op needs them (values a
    rewrite created may have none)."""
    op, x = node.op_type, node.inputs[i]
    din, dout = _dims(x), _dims(out)
    r = lay.rank
    if din is not None and (
        len(din) != r or any(din[a] != n for a, n in zip(lay.axes, lay.idx.shape, strict=False))
    ):
        return f"{op} {out.name}: channel dims not static"

    def moved(ro: int | None) -> _Layout | str:
        if ro is None:
            return f"{op} {out.name}: unknown rank"
        return _Layout(tuple(a + ro - r for a in lay.axes), lay.idx, ro)

    if op in ("Cast", "Identity"):
        return lay
    if op == "Reshape":
        if din is None or dout is None:
            return f"Reshape {out.name}: unknown shapes"
        segs = _align(din, dout)
        if segs is None:
            return f"Reshape {out.name}: {din} -> {dout} not traceable"
        ia, oa = [], []
        for s_in, s_out in segs:
            if set(s_in) & set(lay.axes):
                ia += s_in
                oa += s_out
        if any(not isinstance(dout[k], int) for k in oa):
            return f"Reshape {out.name}: channel axes become dynamic"
        full = _materialize(lay, ia, din).reshape([dout[k] for k in oa])
        return _Layout(tuple(oa), full, len(dout))
    if op == "Transpose":
        perm = list(attr(node, "perm", None) or range(r)[::-1])
        new = [perm.index(a) for a in lay.axes]
        order = np.argsort(new)
        return _Layout(tuple(sorted(new)), lay.idx.transpose(order), r)
    if op in ("Unsqueeze", "Squeeze"):
        axes = const_ints(node.inputs[1]) if len(node.inputs) > 1 else attr(node, "axes", None)
        if axes is None:
            return f"{op} {out.name}: axes not constant"
        if op == "Unsqueeze":
            ro = r + len(axes)
            ins = _norm_axes(axes, ro)
            keep = [p for p in range(ro) if p not in ins]
            return _Layout(tuple(keep[a] for a in lay.axes), lay.idx, ro)
        rm = _norm_axes(axes, r)
        if set(rm) & set(lay.axes):
            return f"Squeeze {out.name}: squeezes a channel axis"
        return _Layout(tuple(a - sum(k < a for k in rm) for a in lay.axes), lay.idx, r - len(rm))
    if op == "Expand":
        if din is None or dout is None:
            return f"Expand {out.name}: unknown shapes"
        sh = len(dout) - r
        if any(dout[a + sh] != din[a] for a in lay.axes):
            return f"Expand {out.name}: expands a channel axis"
        return moved(len(dout))
    if op in ("Split", "Slice"):
        return _select(node, out, lay, fold)
    if op == "Concat":
        ax = _norm_axes([attr(node, "axis", 0)], r)[0]
        if ax in lay.axes:
            return f"Concat {out.name}: concatenates along a channel axis"
        others = [v for k, v in enumerate(node.inputs) if k != i]
        if not all(v is not None and v.is_graph_input() for v in others):
            return f"Concat {out.name}: joins values other than a KV-cache input"
        # The cache input then holds scaled values too: nothing else may read its contents.
        if any(u is not node and u.op_type != "Shape" for v in others for u, _ in v.uses()):
            return f"Concat {out.name}: the KV-cache input is read elsewhere"
        fold.cache = True
        return lay
    other = node.inputs[1 - i] if len(node.inputs) == 2 else None
    ro = (
        len(dout)
        if dout is not None
        else (max(r, _rank(other)) if _rank(other) is not None else None)
    )
    if op == "MatMul":
        if i != 1 or r < 2 or (r - 2) in lay.axes:
            return f"MatMul {out.name}: contracts a channel axis"
        return moved(ro)
    if op in ("Mul", "Div"):
        if op == "Div" and i != 0:
            return f"Div {out.name}: the channel value is the divisor"
        return moved(ro)
    return f"{op} {out.name}: not a per-channel map"


def _selection(node: ir.Node, out_index: int, lay: _Layout):
    """(axis, index array) the Split output / Slice selects on a channel axis; (None, None) when
    it selects along other axes only; a reason string when not constant."""
    r = lay.rank
    if node.op_type == "Split":
        ax = _norm_axes([attr(node, "axis", 0)], r)[0]
        if ax not in lay.axes:
            return None, None
        n = lay.idx.shape[lay.axes.index(ax)]
        sizes = (
            const_ints(node.inputs[1])
            if len(node.inputs) > 1 and node.inputs[1] is not None
            else attr(node, "split", None)
        )
        if sizes is None:
            k = len(node.outputs)
            sizes = [-(-n // k)] * (k - 1) + [n - (-(-n // k)) * (k - 1)]
        start = int(sum(sizes[:out_index]))
        return ax, np.arange(start, start + int(sizes[out_index]))
    starts, ends = const_ints(node.inputs[1]), const_ints(node.inputs[2])
    axes = (
        const_ints(node.inputs[3])
        if len(node.inputs) > 3 and node.inputs[3] is not None
        else list(range(len(starts or [])))
    )
    steps = (
        const_ints(node.inputs[4])
        if len(node.inputs) > 4 and node.inputs[4] is not None
        else [1] * len(starts or [])
    )
    if starts is None or ends is None or axes is None or steps is None:
        return "Slice parameters not constant", None
    sel = None
    for st, en, ax, sp in zip(
        starts, ends, [a + r if a < 0 else a for a in axes], steps, strict=False
    ):
        if ax in lay.axes:
            if sel is not None:
                return "Slice on two channel axes", None
            n = lay.idx.shape[lay.axes.index(ax)]
            sel = (ax, np.arange(n)[slice(st, en, sp)])
    return sel if sel is not None else (None, None)


def _select(node: ir.Node, out: ir.Value, lay: _Layout, fold: Fold) -> _Layout | str:
    k = list(node.outputs).index(out)
    ax, sel = _selection(node, k, lay)
    if isinstance(ax, str):
        return f"{node.op_type} {out.name}: {ax}"
    if node.op_type == "Split":
        for j, o in enumerate(node.outputs):
            if j == k or not o.uses() and not o.is_graph_output():
                continue
            if ax is None:
                return f"Split {out.name}: a sibling output carries the same channels"
            _, other = _selection(node, j, lay)
            fold.extra.append(np.take(lay.idx, other, axis=lay.axes.index(ax)))
    if ax is None:
        return lay
    return _Layout(lay.axes, np.take(lay.idx, sel, axis=lay.axes.index(ax)), lay.rank)


def _const_1d(v: ir.Value | None, n) -> bool:
    t = v.const_value if v is not None else None
    return (
        t is not None
        and tuple(t.shape) == (n,)
        and n != 1
        and len(v.uses()) == 1
        and t.dtype.is_floating_point()
    )


def _zeros_1d(v: ir.Value | None, n) -> bool:
    arr = const_array(v)
    return arr is not None and arr.ndim == 1 and arr.shape[0] == n and not np.any(arr)


def _root(v: ir.Value) -> tuple[Fold, int] | None:
    """(fold, rank of v) when `v` is a per-channel-scalable producer output."""
    node = v.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    last = v.shape[-1] if v.shape is not None else None

    def ok(c, like: ir.Value | None) -> int | None:  # rank of v if c channels fit
        r = _rank(v) if v.shape is not None else _rank(like)
        return r if r and (last is None or last == c) else None

    if node.op_type == "RMSNormalization" and v is node.outputs[0]:
        g = node.inputs[1]
        c = g.const_value.shape[0] if g is not None and g.const_value is not None else None
        r = ok(c, node.inputs[0])
        if c and r and attr(node, "axis", -1) in (-1, r - 1) and _const_1d(g, c):
            return Fold(g, np.arange(c), where=g.name), r
        return None
    if node.op_type == "Mul":
        for a, b in (node.inputs, node.inputs[::-1]):
            c = (
                a.const_value.shape[0]
                if a is not None and a.const_value is not None and len(a.const_value.shape) == 1
                else None
            )
            r = ok(c, b) if c else None
            if (
                r
                and _const_1d(a, c)
                and b is not None
                and b.const_value is None
                and (b.shape is None or b.shape[-1] == c)
            ):
                return Fold(a, np.arange(c), where=a.name), r
    mm, bias = node, None
    if node.op_type == "Add":
        for a, b in (node.inputs, node.inputs[::-1]):
            if (
                b is None
                or b.producer() is None
                or b.producer().op_type != "MatMul"
                or len(b.uses()) != 1
                or a is None
                or a.const_value is None
            ):
                continue
            c = a.const_value.shape[0] if len(a.const_value.shape) == 1 else None
            if _const_1d(a, c):
                mm, bias = b.producer(), a
            elif _zeros_1d(a, c):  # an all-zero bias (the exporter may share it): nothing to scale
                mm = b.producer()
    if mm.op_type != "MatMul":
        return None
    w = mm.inputs[1]
    t = w.const_value if w is not None else None
    if t is None or len(t.shape) != 2 or len(w.uses()) != 1 or not t.dtype.is_floating_point():
        return None
    c = t.shape[1]
    x_rank = _rank(mm.inputs[0])
    r = ok(c, None) if v.shape is not None else (max(x_rank, 2) if x_rank else None)
    if not r or (bias is not None and bias.const_value.shape[0] != c):
        return None
    return Fold(w, np.arange(c), bias=bias, kind="linear", where=module_path(mm) or w.name), r


def _paths(v: ir.Value, depth: int, stops: list):
    """Candidate (root value, [(node, input index, output)] from the root to `v`); where the
    walk ends without a root, the op it stopped at goes to `stops`."""
    if _root(v) is not None:
        yield v, []
        return
    node = v.producer()
    if depth == 0 or node is None or node.domain not in ("", "ai.onnx"):
        stops.append(f"{node.op_type} {v.name}" if node is not None else f"input {v.name}")
        return
    op = node.op_type
    if op in _MOVE and op != "Concat":
        cand = [0]
    elif op == "Concat":
        cand = [k for k, x in enumerate(node.inputs) if x is not None and not x.is_graph_input()]
        cand = cand if len(cand) == 1 else []
    elif op == "MatMul":
        cand = [1]
    elif op == "Mul":
        cand = [k for k, x in enumerate(node.inputs) if x is not None and x.const_value is None]
    elif op == "Div":
        cand = [0]
    else:
        stops.append(f"{op} {v.name}")
        return
    for k in cand:
        for root, path in _paths(node.inputs[k], depth - 1, stops):
            yield root, [*path, (node, k, v)]


def _check_uses(
    v: ir.Value, nxt: ir.Node | None, k: int, lay: _Layout, fold: Fold, cache_ok: bool
) -> str | None:
    if v.is_graph_output() and not cache_ok:
        return f"{v.name} is a graph output"
    for u, idx in v.uses():
        if u is nxt and idx == k or u.op_type == "Shape":
            continue
        if u.op_type == "Slice" and idx == 0 and nxt is not None:
            ax, sel = _selection(u, 0, lay)
            if ax is not None and not isinstance(ax, str):
                fold.extra.append(np.take(lay.idx, sel, axis=lay.axes.index(ax)))
                continue
        return f"{v.name} is also read by {u.op_type} {u.name}"
    return None


def _trace(root_v: ir.Value, path, act: ir.Value) -> Fold | str:
    fold, rank = _root(root_v)
    lay = _Layout((rank - 1,), fold.cols, rank)
    v = root_v
    for node, k, out in path:
        why = _check_uses(v, node, k, lay, fold, v.producer().op_type == "Concat" and fold.cache)
        if why:
            return why
        lay = _transfer(node, k, out, lay, fold)
        if isinstance(lay, str):
            return lay
        v = out
    if v.is_graph_output() and not (fold.cache and v.producer().op_type == "Concat"):
        return f"{v.name} is a graph output"
    r = _rank(act) or lay.rank
    if lay.rank != r or lay.axes != (r - 1,) or lay.idx.ndim != 1:
        return "channels do not end on the activation's last axis"
    fold.cols = lay.idx.astype(np.int64)
    taken = set(fold.cols.tolist())
    if any(taken & set(np.asarray(e).reshape(-1).tolist()) for e in fold.extra):
        return "a sibling slice reads the same columns"
    fold.via = tuple(n.op_type for n, _, _ in path)
    fold.nodes = [n for n in [root_v.producer(), *(n for n, _, _ in path)] if n is not None]
    return fold


def find_fold(act: ir.Value) -> tuple[Fold | None, str]:
    """(fold, "") where 1/s for `act` can be folded exactly; (None, reason) otherwise."""
    reasons, stops = [], []
    for root_v, path in _paths(act, MAX_DEPTH, stops):
        got = _trace(root_v, path, act)
        if isinstance(got, Fold):
            return got, ""
        reasons.append(got)
    if not reasons:
        return None, (
            "no norm gamma or linear producer to fold 1/s into: the channel-wise path "
            "back from the activation ends at " + ", ".join(dict.fromkeys(stops[:4]))
        )
    return None, "1/s cannot be folded exactly: " + reasons[0]

"""Write `model.onnx.data` in a second process while the exporter traces.

A streaming export (`dsc.export.streaming`) traced first and wrote the weights after, when
onnx_ir's writer reached each initializer: one phase after the other, the trace on one core,
then the write (read, check, cast, transpose, write: about 1.1 cores). But which checkpoint
tensors the graph holds, in which dtype and layout, is known before the trace: every state-dict
tensor of the model in the export dtype, a tied group once (the graph may name it by any of its
keys), and the weights of `nn.Linear` modules transposed (the exporter's MatMul takes `W^T`,
which `onnx_export._fold_weight_transposes` writes as such). So:

1. **Plan** (`plan`): the large tensors (more than `PLANNED_MIN_ELEMENTS` elements), each with
   its permutation, dtype, shape as written, and offset in the file: packed densely in
   state-dict order, as onnx_ir packs them (`onnx_ir.save`'s default `alignment=None`).
2. **Write** (`PreWrite.launch`, `PreWrite.begin`): a child process (`python -m
   dsc.export.prewrite`) reads, checks, casts and permutes each planned tensor from the
   checkpoint (the same `CheckpointSources.materialize` as onnx_ir's writer calls, so the same
   bytes and the same `CheckpointError`s) and writes and hashes it, while the parent traces. A
   process and not a thread: the trace holds the GIL, and the writer's many short torch calls
   each waited for it (tracing beside the write on a thread was slower than one after the other;
   docs/BENCHMARKS.md, session 15).
3. **Finish** (`PreWrite.prepare`, `PreWrite.complete`), after the trace: the graph's large
   checkpoint initializers must be exactly the planned (key, permutation) pairs. If they are,
   the parent sends the other initializers of more than `INLINE_BYTES` (small weights, which the
   optimizer may merge when equal, and buffers), the child appends them, and every external
   initializer becomes an `onnx_ir.ExternalTensor` into the file; `onnx_ir.save` without
   `external_data` then writes `model.onnx` with those references as they stand. If they are not
   (a graph that uses a weight in another layout), the child is stopped, its file removed, and
   `prepare` returns None: the export writes through onnx_ir as before. The fp16 range check
   (`streaming.WrittenWeights`) reads each weight from the file as soon as the child has written
   it (`PreWrite.wait_for`), so it runs beside the rest of the write.

**Direct I/O** (`direct_io`, `$DSC_DIRECT_IO`, default on where the OS has O_DIRECT): the child
writes the planned tensors with O_DIRECT (`_DirectFile`), each placed in its buffer at its file
offset modulo `DIRECT_ALIGN` so that whole aligned blocks go from that memory to the device, and
the parent's range check then reads the weights written permuted (W^T, read whole) from the
checkpoint (which the child has just read, so in the page cache) rather than the file, and the
others (the embedding, of which it gathers a few rows) from the file
(`WrittenWeights(permuted_from_fallback=True)`). On this project's 2-core Firecracker VM (ext4
on virtio-block) 2 GiB took 1.3-1.6 s with O_DIRECT and 2.3-7.2 s through the page cache, and the
1.5B's export went from 16-18 s to 11 s warm (docs/BENCHMARKS.md, session 17); it also leaves the
page cache to the checkpoint when the two do not both fit (7B: 15.2 GB each on a 24 GB host). The
cost: the next stage reads `model.onnx.data` from the device, not from the page cache.

The file holds the same tensors with the same values as onnx_ir's writer would write (tests
compare them tensor by tensor, and the two exports' outputs in ONNX Runtime), in state-dict
order rather than the graph's. Memory: the child holds at most `BUFFERS` parts of at most
`PART_BYTES` each or one tensor larger than `BUFFER_BYTES` that cannot be cut into parts (a
transposed lm_head), and its own torch (about 0.3 GB). A tensor written with its axis 0 first
(the embedding, MoE experts fused into one [E, 2I, D] tensor) is written in parts of whole
rows of that axis (`parts`): V2-Lite's fused experts (738 MB per layer) were read whole, and
the writer's 1.3 GB peak coincided with the parent's range check of an MoE layer, 3.09 GB for
the two processes (docs/BENCHMARKS.md, session 20).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import pickle
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dsc.errors import BackendError, CheckpointError

# The optimizer merges equal initializers of at most 1,024 elements
# (`onnx_ir.passes.common.DeduplicateInitializersPass`, run by `by_kind.instantiate`), so which
# of those the graph keeps is known only after it: they are sent at the end.
PLANNED_MIN_ELEMENTS = 1025
# onnx_ir.save's `size_threshold_bytes`: a tensor of at most this many bytes stays in model.onnx.
INLINE_BYTES = 256
# The child's reused buffers: a tensor of at most BUFFER_BYTES is read into one while the
# others' tensors are read, written and hashed; a larger one (the embedding, lm_head) gets its
# own memory, alone. Peak: BUFFERS times the largest tensor below BUFFER_BYTES, or the largest
# tensor, plus a read chunk per producer.
BUFFERS = 4
BUFFER_BYTES = 256 << 20
# A planned tensor of more bytes than this whose axis 0 is written first is read, written and
# hashed in parts of whole axis-0 rows of at most this many bytes (`parts`), each in a buffer.
PART_BYTES = 64 << 20
# How often `PreWrite` samples the two processes' resident sets, in seconds.
RSS_SAMPLE_SECONDS = 0.05
# Direct I/O: the child writes the planned tensors with O_DIRECT in blocks of this many bytes
# at aligned offsets from page-aligned memory (a multiple of every logical block size Linux
# supports), and the partial block at the end of each tensor through a small staging block.
DIRECT_ALIGN = 4096
# Threads of the child that read, check and cast tensors at once (onnx_ir's writer used two:
# `onnx_export.WRITE_WORKERS`), each with one torch intra-op thread.
PRODUCERS = 2


@dataclass(frozen=True)
class Item:
    """One planned tensor: state-dict `key`, written permuted by `perm` (None: as stored) in
    torch dtype `dtype` with `shape` (as written), at byte `offset` of the file."""

    key: str
    perm: tuple[int, ...] | None
    shape: tuple[int, ...]
    dtype: object
    offset: int
    nbytes: int
    aliases: tuple[str, ...] = ()  # the other keys of a tied group (the same tensor)


@dataclass(frozen=True)
class _Part:
    """Rows `rows` (None: all) of axis 0 of planned tensor `items[item]`, at byte `offset`."""

    item: int
    rows: tuple[int, int] | None
    offset: int
    nbytes: int


def parts(items: list[Item], part_bytes: int) -> list[_Part]:
    """The child's units of work, in file order: each planned tensor whole, or, when it has 2
    or more axes, its axis 0 is written first (`perm` None or starting with 0) and it is
    larger than `part_bytes`, in runs of whole axis-0 rows of at most `part_bytes` (one row at
    least), each contiguous in the file."""
    out = []
    for i, item in enumerate(items):
        splittable = len(item.shape) >= 2 and (item.perm is None or item.perm[0] == 0)
        if not splittable or item.nbytes <= part_bytes or item.shape[0] < 2:
            out.append(_Part(i, None, item.offset, item.nbytes))
            continue
        row_bytes = item.nbytes // item.shape[0]
        step = max(1, part_bytes // row_bytes)
        for a in range(0, item.shape[0], step):
            b = min(a + step, item.shape[0])
            out.append(_Part(i, (a, b), item.offset + a * row_bytes, (b - a) * row_bytes))
    return out


def enabled() -> bool:
    """`$DSC_PREWRITE` (default on): whether a streaming export writes its external data in a
    second process beside the trace."""
    return os.environ.get("DSC_PREWRITE", "1").strip().lower() not in ("0", "false", "no", "off")


def direct_io() -> bool:
    """`$DSC_DIRECT_IO` (default on where the OS has O_DIRECT): whether the child writes the
    planned tensors with direct I/O, past the page cache (`_DirectFile`). Where the file system
    refuses O_DIRECT (tmpfs, some network and FUSE file systems), it writes through the page
    cache whatever this says."""
    if not hasattr(os, "O_DIRECT"):
        return False
    return os.environ.get("DSC_DIRECT_IO", "1").strip().lower() not in ("0", "false", "no", "off")


def plan(model, sources) -> list[Item]:
    """The large checkpoint tensors of the fake `model` (`streaming.fake_model`) as the trace
    will hold them (module docstring, 1), with offsets from 0. `sources`: its
    `CheckpointSources`."""
    import torch

    linear = {
        f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    groups: dict[int, list[str]] = {}
    for key in sources.names:
        groups.setdefault(id(sources.fake(key)), []).append(key)
    items: list[Item] = []
    offset = 0
    for key, *aliases in groups.values():  # a tied group once, under its first key
        fake = sources.fake(key)
        if fake.numel() < PLANNED_MIN_ELEMENTS:
            continue
        shape = tuple(fake.shape)
        perm = (1, 0) if key in linear and len(shape) == 2 and not aliases else None
        written = tuple(shape[p] for p in perm) if perm else shape
        nbytes = fake.numel() * fake.element_size()
        items.append(Item(key, perm, written, fake.dtype, offset, nbytes, tuple(aliases)))
        offset += nbytes
    return items


class PreWrite:
    """The child process writing `data_path` (module docstring, 2 and 3).

    `launch` starts it, `begin` gives it the plan; `prepare(model)` checks the traced graph
    against it (None: the caller writes through onnx_ir), `wait_for(key)` waits for a key's
    bytes, and `complete(model, ...)` finishes the file and saves the graph pointing at it;
    `close()` stops the child if it still runs and removes its file unless `complete` succeeded.
    Use it as a context manager."""

    def __init__(self, data_path: Path, proc: subprocess.Popen, *, errors=None):
        self.items: list[Item] = []
        self.direct = False  # the child writes with direct I/O (`direct_io`, set by `begin`)
        self._errors = errors  # the child's stderr (a file)
        self.data_path = data_path
        self._proc = proc
        self._cond = threading.Condition()
        self._count = 0  # tensors written so far
        self._result: tuple | None = None  # ("done", sha256) or ("error", kind, message)
        self._kept = False
        self._closed = False
        # the largest sum of this process's and the child's RSS, sampled (`_sample_rss`)
        self.peak_rss_bytes: int | None = None
        self._sampler = threading.Thread(target=self._sample_rss, name="dsc-prewrite-rss")
        self._sampler.daemon = True
        self._sampler.start()
        self._reader = threading.Thread(target=self._listen, name="dsc-prewrite", daemon=True)
        self._reader.start()

    @classmethod
    def launch(cls, data_path: Path) -> PreWrite:
        """Start the child, which imports torch (about 2 s) and waits for `begin`; launched
        before the parent builds its fake model, so that both happen at once."""
        import tempfile

        errors = tempfile.TemporaryFile()  # noqa: SIM115 (closed in `close`)
        # `-P`: no current directory on sys.path (a `dsc` package there would be imported
        # instead); the directory holding this process's `dsc` goes first, so the child runs
        # the same code.
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "dsc.export.prewrite"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            env=env,
        )
        return cls(data_path, proc, errors=errors)

    def begin(self, items: list[Item], sources, reader, *, hash_data: bool) -> None:
        """Have the child write `items` (`plan`), reading through `reader`'s checkpoint and
        `sources`' recipes (sha256 when `hash_data`)."""
        self.items = items
        self.direct = direct_io()
        job = {
            "reader": reader.spec(),
            "recipes": sources.recipes([item.key for item in items]),
            "items": items,
            "part_bytes": PART_BYTES,
            "path": str(self.data_path),
            "hash": hash_data,
            "direct": self.direct,
        }
        try:
            pickle.dump(job, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child has died: `complete` reports its exit code

    def _sample_rss(self) -> None:
        """Every `RSS_SAMPLE_SECONDS` while the child runs: this process's and the child's
        resident sets (VmRSS of /proc/<pid>/status, Linux), keeping the largest sum in
        `peak_rss_bytes`, the two processes' peak at once (the sum of their separate peaks
        over-counts: the child's largest tensor is freed before this process reads it back).
        Growth between samples is missed; filling 1 GB of new pages takes longer than a
        sample. Without /proc, the sum of the two peaks (getrusage)."""
        from dsc.pipeline.progress import peak_rss_bytes, rusage_peak_bytes, status_bytes

        own, child = Path("/proc/self/status"), Path(f"/proc/{self._proc.pid}/status")
        peak = 0
        while self._proc.poll() is None:
            a, b = status_bytes(own, "VmRSS"), status_bytes(child, "VmRSS")
            if a is None:  # no /proc
                break
            peak = max(peak, a + (b or 0))
            time.sleep(RSS_SAMPLE_SECONDS)
        self._proc.wait()
        if peak:
            self.peak_rss_bytes = peak
        else:
            own_peak, child_peak = peak_rss_bytes(), rusage_peak_bytes("children")
            if own_peak is not None and child_peak is not None:
                self.peak_rss_bytes = own_peak + child_peak

    def _listen(self) -> None:
        try:
            while True:
                msg = pickle.load(self._proc.stdout)
                with self._cond:
                    if msg[0] == "wrote":
                        self._count = msg[1]
                    else:
                        self._result = msg
                    self._cond.notify_all()
                if msg[0] != "wrote":
                    return
        except (EOFError, OSError, pickle.UnpicklingError):
            with self._cond:
                if self._result is None:
                    self._result = ("exited",)
                self._cond.notify_all()

    def needed(self, model) -> tuple[dict, list]:
        """(the graph's planned initializers {value: Item}, the others it writes externally
        [value]), or raises `_Mismatch` when the graph's large checkpoint initializers are not
        the plan."""
        by_source = {
            (key, item.perm): item for item in self.items for key in (item.key, *item.aliases)
        }
        planned, others = {}, []
        used = set()
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            key = getattr(tensor, "source_key", None)
            if key is not None and tensor.size >= PLANNED_MIN_ELEMENTS:
                perm = tensor.source_perm
                if perm is not None and perm == tuple(range(len(perm))):
                    perm = None  # Transpose(perm=identity): the same bytes
                item = by_source.get((key, perm))
                if item is None:
                    raise _Mismatch(f"{key} is used with permutation {tensor.source_perm}")
                planned[value] = item
                used.add(item)
            elif tensor.nbytes > INLINE_BYTES:
                others.append(value)
        if unused := [item for item in self.items if item not in used]:
            raise _Mismatch(
                f"{len(unused)} planned tensors are not in the graph ({unused[0].key}, "
                f"{unused[0].perm})"
            )
        return planned, others

    def prepare(self, model, *, say) -> dict | None:
        """Check the traced `model` against the plan and send the child the rest of its
        initializers (module docstring, 3); `wait_for` then says when a key's bytes are in the
        file, and `complete` finishes.

        Returns where each planned checkpoint weight goes, {state-dict key: (byte offset,
        shape as written, torch dtype, permutation or None)} (as `onnx_export._save_external`
        does, a key written unpermuted preferred; the small ones sent last are left out, so
        that a reader waiting for them does not wait for the whole file), or None when the
        graph does not match the plan (said through `say`; the child is stopped and its file
        removed)."""
        with self._cond:
            failed = self._result if self._result and self._result[0] != "done" else None
        if failed is not None:  # the child stopped early (a bad tensor, a crash): say it now
            self._proc.wait()
            self._raise_for(failed)
        try:
            planned, others = self.needed(model)
        except _Mismatch as e:
            say(f"the traced graph's weights are not laid out as planned ({e}); writing them again")
            self.close()
            return None
        end = self.items[-1].offset + self.items[-1].nbytes if self.items else 0
        tail, offsets = [], {}
        for value in others:
            data = value.const_value.tobytes()
            offsets[value] = (end, len(data))
            tail.append(data)
            end += len(data)
        self._send(("tail", tail))
        self._planned, self._offsets, self._total = planned, offsets, len(self.items) + len(tail)
        written: dict = {}
        self._done_at: dict[str, int] = {}  # key -> count of tensors done once it is
        index = {item: i for i, item in enumerate(self.items)}
        for item in planned.values():
            if item.key not in written or item.perm is None:
                written[item.key] = (item.offset, item.shape, item.dtype, item.perm)
                self._done_at[item.key] = index[item] + 1
        return written

    def wait_for(self, key: str) -> None:
        """Block until `key`'s bytes (`prepare`'s entry) are written; raise what the child
        raised if it fails first (see `complete`)."""
        need = self._done_at.get(key, 0)
        with self._cond:
            while self._count < need and self._result is None:
                self._cond.wait(0.2)
            result = self._result
            if self._count >= need:
                return
        self._proc.wait()
        self._raise_for(result)

    def complete(self, model, onnx_path: Path, *, quiet: bool) -> str | None:
        """Wait for the child (a progress bar over the tensors written), point `model`'s
        initializers at the file (`onnx_ir.ExternalTensor`) and save it to `onnx_path`.
        Returns the file's sha256 (None unless the plan was begun with `hash_data`). Raises
        what the child raised: `CheckpointError` (a bad checkpoint tensor), `OSError` (a
        write), `BackendError` (anything else, or the child dying)."""
        import onnx_ir as ir

        from dsc.pipeline.progress import counted

        total = self._total
        with counted("writing weights", total, quiet=quiet) as advance:
            shown = 0
            with self._cond:
                while True:
                    if self._count > shown:
                        advance(self._count - shown)
                        shown = self._count
                    if self._result is not None:
                        break
                    self._cond.wait(0.2)
            result = self._result
            self._proc.wait()
            self._sampler.join()
            if result[0] == "done":
                advance(total - shown)
        self._raise_for(result)
        location = self.data_path.name
        base_dir = self.data_path.parent

        def external(value, offset, length):
            tensor = value.const_value
            return ir.ExternalTensor(
                location,
                offset,
                length,
                tensor.dtype,
                shape=tensor.shape,
                name=value.name,
                base_dir=base_dir,
            )

        for value, item in self._planned.items():
            value.const_value = external(value, item.offset, item.nbytes)
        for value, (offset, length) in self._offsets.items():
            value.const_value = external(value, offset, length)
        ir.save(model, onnx_path)
        self._kept = True
        return result[1]

    def _send(self, msg) -> None:
        try:
            pickle.dump(msg, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # the child has exited; its result says why

    def _raise_for(self, result) -> None:
        if result[0] == "done":
            return
        if result[0] == "error":
            _, kind, message, errno = result
            if kind == "CheckpointError":
                raise CheckpointError(message)
            if kind == "OSError":
                raise OSError(errno, message)
            if kind == "SafetensorError":  # a shard that changed or broke while it was read
                raise CheckpointError(f"cannot read the checkpoint: {message}")
            raise BackendError(f"writing {self.data_path.name} failed: {kind}: {message}")
        code = self._proc.returncode
        last = self._last_error_line()
        raise BackendError(
            f"the process writing {self.data_path.name} exited with code {code} before "
            "finishing" + (f": {last}" if last else "")
        )

    def _last_error_line(self) -> str:
        """The last line the child wrote to stderr (a crash's exception), or ''."""
        errors = self._errors
        if errors is None:
            return ""
        try:
            errors.seek(0)
            lines = errors.read()[-4096:].decode(errors="replace").strip().splitlines()
        except (OSError, ValueError):
            return ""
        return lines[-1] if lines else ""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._errors):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if not self._kept:
            self.data_path.unlink(missing_ok=True)

    def __enter__(self) -> PreWrite:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Mismatch(Exception):
    pass


# --- the child ----------------------------------------------------------------------------------


def _as_bytes(t) -> memoryview:
    """`t`'s bytes (contiguous CPU tensor), no copy."""
    import torch

    flat = t.reshape(-1)
    if flat.dtype.is_floating_point and flat.element_size() == 2:
        flat = flat.view(torch.int16)
    return memoryview(flat.numpy()).cast("B")


class _Buffer:
    """Reused page-aligned memory (an anonymous mmap of `BUFFER_BYTES` + `DIRECT_ALIGN`, made
    on first use; pages become resident as they are touched)."""

    def __init__(self):
        self._map = None

    def tensor(self, dtype, shape, shift: int):
        """A tensor of `shape` and `dtype` at byte `shift` of this memory."""
        import mmap

        import torch

        if self._map is None:
            self._map = mmap.mmap(-1, BUFFER_BYTES + DIRECT_ALIGN)
        count = math.prod(shape)
        return torch.frombuffer(self._map, dtype=dtype, count=count, offset=shift).view(shape)

    def release(self) -> None:
        """Give the pages back (madvise MADV_DONTNEED), keeping the mapping."""
        import mmap

        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED)


class _DirectFile:
    """A file written front to back with direct I/O (O_DIRECT, open(2)): every write is of
    whole `DIRECT_ALIGN` blocks at aligned offsets from aligned memory, so the bytes go to the
    device without filling the page cache. Data that is not placed so (a tensor in memory of its
    own, not congruent to its offset) goes through an aligned bounce buffer; the partial block at
    the end of each write waits in a staging block for the next write. `finish()` writes the last
    partial block with O_DIRECT cleared (fcntl F_SETFL), after which the file takes ordinary
    writes. Raises OSError where the file system refuses O_DIRECT (EINVAL from fcntl(2)); a
    write it refuses (EINVAL: a device whose logical block is larger than `DIRECT_ALIGN`)
    clears O_DIRECT and the rest goes through the page cache (`self.buffered`)."""

    BOUNCE_BYTES = 16 << 20

    def __init__(self, fd: int):
        import fcntl
        import mmap

        self.fd = fd
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        self._edge = mmap.mmap(-1, DIRECT_ALIGN)
        self._edge_len = 0  # bytes waiting in the staging block
        self._offset = 0  # the file offset of the staging block (aligned)
        self._bounce = None
        self.buffered = False

    def _pwrite(self, data, offset: int) -> None:
        try:
            _pwrite_all(self.fd, data, offset)
        except OSError as e:
            import errno
            import fcntl

            if e.errno != errno.EINVAL or self.buffered:
                raise
            self.buffered = True  # writing again what a partial write wrote is harmless
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            _pwrite_all(self.fd, data, offset)

    def write(self, data: memoryview, address: int) -> None:
        """Append `data` (bytes, in memory at `address`) to the file."""
        a, n, pos = DIRECT_ALIGN, len(data), 0
        if self._edge_len:  # complete the block the previous write left partial
            pos = min(a - self._edge_len, n)
            self._edge[self._edge_len : self._edge_len + pos] = data[:pos]
            self._edge_len += pos
            if self._edge_len == a:
                self._pwrite(self._edge, self._offset)
                self._offset, self._edge_len = self._offset + a, 0
        whole = (n - pos) // a * a
        if whole and (address + pos) % a == 0:
            self._pwrite(data[pos : pos + whole], self._offset)
        elif whole:
            import mmap

            if self._bounce is None:
                self._bounce = mmap.mmap(-1, self.BOUNCE_BYTES)
            for start in range(0, whole, self.BOUNCE_BYTES):
                chunk = data[pos + start : pos + min(whole, start + self.BOUNCE_BYTES)]
                self._bounce[: len(chunk)] = chunk
                self._pwrite(memoryview(self._bounce)[: len(chunk)], self._offset + start)
        self._offset += whole
        pos += whole
        if pos < n:
            self._edge[: n - pos] = data[pos:]
            self._edge_len = n - pos

    @property
    def durable(self) -> int:
        """How many bytes at the front of the file are written (the rest waits in the staging
        block)."""
        return self._offset

    def finish(self) -> int:
        """Write the partial last block through the page cache and clear O_DIRECT. Returns the
        file's length."""
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        if self._edge_len:
            _pwrite_all(self.fd, memoryview(self._edge)[: self._edge_len], self._offset)
        return self._offset + self._edge_len


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _child(stdin, stdout) -> int:
    """The child's work (module docstring, 2), a pipeline of threads: `PRODUCERS` take the
    planned tensors, or their parts (`parts`, with the job's `part_bytes`), in order and each
    reads, checks and casts one (`materialize`) into one of `BUFFERS` reused buffers when it
    fits `BUFFER_BYTES` (a larger one is read alone, once all before it are done, into its own
    memory); a writer writes them in order (`os.pwrite` at their offsets); a hasher hashes them
    in order from memory and frees their buffers. Reads and casts overlap writes and hashing,
    and the reused buffers spare the kernel a page fault per 4 KiB of every tensor. Then the
    parent's tail is appended.
    Messages to the parent (pickled on `stdout`): ("wrote", count of tensors done), then
    ("done", sha256 or None) or ("error", exception type name, message, errno or None).
    Returns the exit code."""

    from dsc.export.streaming import CheckpointSources
    from dsc.models.weights import WeightReader

    lock = threading.Lock()

    def send(msg) -> None:
        with lock:
            pickle.dump(msg, stdout, protocol=pickle.HIGHEST_PROTOCOL)
            stdout.flush()

    job = pickle.load(stdin)
    items: list[Item] = job["items"]
    units = parts(items, job["part_bytes"])
    h = hashlib.sha256() if job["hash"] else None
    cond = threading.Condition()
    # indices below are into `units` (a planned tensor or a part of one)
    ready: dict = {}  # index -> (tensor, buffer or None), read, to write in index order
    hashq: list = []  # (index, tensor, buffer or None), written, to hash
    # claimed: the next index to read; written, hashed: how many are; large: a unit without
    # a buffer is being read or written (nothing else is claimed meanwhile)
    # durable: how many bytes at the front of the file are written (with direct I/O, the
    # partial block at the end of the last tensor written waits for the next one); reported:
    # how many tensors the parent has been told are in the file (written, whole, and hashed)
    state = {"claimed": 0, "written": 0, "hashed": 0, "large": False, "durable": 0}
    reported = 0
    free = [_Buffer() for _ in range(BUFFERS)]
    failure: list[BaseException] = []
    fd = os.open(job["path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    direct = None
    if job.get("direct"):
        with contextlib.suppress(OSError):  # EINVAL: this file system has no direct I/O
            direct = _DirectFile(fd)

    def fail(e: BaseException) -> None:
        with cond:
            failure.append(e)
            cond.notify_all()

    def write(data, offset: int) -> None:
        _pwrite_all(fd, data, offset)
        if h is not None:
            h.update(data)

    def writer() -> None:  # in file order: write, then hand over to the hash
        try:
            for _ in range(len(units)):
                with cond:
                    while state["written"] not in ready and not failure:
                        cond.wait()
                    if failure:
                        return
                    i = state["written"]
                    t, buf = ready.pop(i)
                    state["written"] += 1
                if direct is not None:
                    direct.write(_as_bytes(t), t.data_ptr())
                else:
                    _pwrite_all(fd, _as_bytes(t), units[i].offset)
                with cond:
                    state["durable"] = (
                        direct.durable if direct is not None else units[i].offset + units[i].nbytes
                    )
                    hashq.append((i, t, buf))
                    cond.notify_all()
                del t
        except BaseException as e:
            fail(e)

    def producer(sources) -> None:
        # The next index and its buffer are taken together, so the lowest index not yet
        # written always has one (no deadlock over buffers held by later indices).
        try:
            while True:
                with cond:
                    while not failure and state["claimed"] < len(units):
                        if state["large"]:
                            pass
                        elif units[state["claimed"]].nbytes > BUFFER_BYTES:
                            if state["hashed"] == state["claimed"]:  # all before it are done
                                break
                        elif free:
                            break
                        cond.wait()
                    if failure or state["claimed"] >= len(units):
                        return
                    i = state["claimed"]
                    state["claimed"] += 1
                    unit = units[i]
                    item = items[unit.item]
                    shape = item.shape
                    if unit.rows is not None:
                        shape = (unit.rows[1] - unit.rows[0], *shape[1:])
                    if unit.nbytes > BUFFER_BYTES:
                        state["large"], buf, out = True, None, None
                        for b in free:  # all are free: give their memory to this tensor
                            b.release()
                    else:
                        buf = free.pop()
                if buf is not None:  # placed as in the file, for direct I/O (`_DirectFile`)
                    out = buf.tensor(item.dtype, shape, unit.offset % DIRECT_ALIGN)
                t = sources.materialize(item.key, perm=item.perm, out=out, rows=unit.rows)
                if t.dtype != item.dtype or t.numel() * t.element_size() != unit.nbytes:
                    raise BackendError(f"{item.key}: planned {item.dtype}, read {t.dtype}")
                with cond:
                    ready[i] = (t, buf)
                    cond.notify_all()
                del t, out
        except BaseException as e:
            fail(e)

    def hasher() -> None:  # then hash, free the buffer, and tell the parent
        nonlocal reported
        try:
            for _ in range(len(units)):
                with cond:
                    while not hashq and not failure:
                        cond.wait()
                    if failure:
                        return
                    i, t, buf = hashq.pop(0)
                if h is not None:
                    h.update(_as_bytes(t))
                del t
                with cond:
                    if buf is not None:
                        free.append(buf)
                    else:
                        state["large"] = False
                    state["hashed"] = i + 1
                    cond.notify_all()
                    done = reported  # planned tensors whole in the file (parts: the last one)
                    last = units[i].item
                    while (
                        done <= last and items[done].offset + items[done].nbytes <= state["durable"]
                    ):
                        done += 1
                if done > reported:
                    reported = done
                    send(("wrote", done))
        except BaseException as e:
            fail(e)

    try:
        with WeightReader(**job["reader"]) as reader:
            sources = CheckpointSources.from_recipes(reader, job["recipes"])
            threads = [
                threading.Thread(target=writer, name="dsc-prewrite-writer"),
                threading.Thread(target=hasher, name="dsc-prewrite-hash"),
            ]
            for thread in threads:
                thread.start()
            try:
                producers = [
                    threading.Thread(target=producer, args=(sources,), name=f"dsc-prewrite-{n}")
                    for n in range(PRODUCERS)
                ]
                for thread in producers:
                    thread.start()
                for thread in producers:
                    thread.join()
            except BaseException as e:
                fail(e)
            for thread in threads:
                thread.join()
        if failure:
            raise failure[0]
        msg = pickle.load(stdin)
        if msg[0] != "tail":
            return 1
        offset = items[-1].offset + items[-1].nbytes if items else 0
        if direct is not None and (length := direct.finish()) != offset:
            raise BackendError(f"{job['path']}: wrote {length} bytes, planned {offset}")
        if reported < len(items):
            send(("wrote", len(items)))
        for i, data in enumerate(msg[1]):
            write(data, offset)
            offset += len(data)
            send(("wrote", len(items) + i + 1))
    except EOFError:  # the parent went away or stopped us
        return 1
    except BaseException as e:
        errno = getattr(e, "errno", None)
        kind = "OSError" if isinstance(e, OSError) else type(e).__name__
        message = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if isinstance(e, OSError):  # pwrite's errors name no file: the data file's
            message = f"{message}: {e.filename or job['path']}"
        with contextlib.suppress(OSError):
            send(("error", kind, message, errno))
        return 1
    finally:
        os.close(fd)
    send(("done", h.hexdigest() if h is not None else None))
    return 0


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent exits (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)


def main() -> int:
    import signal

    _die_with_parent()
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and stops us
    # One intra-op thread: the reads and writes overlap on this process's two threads, and the
    # trace holds a core. With torch's default (one thread per core) the 1.5B's tensors took
    # 14.0 s alone instead of 7.2 s (oversubscribed, 11 s of system time).
    torch.set_num_threads(1)
    return _child(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)

"""Device memory, one stream and CUDA graphs for the engine runner, on Polygraphy's CUDA wrapper.

`CudaDevice` is the GPU: buffers are `polygraphy.cuda.DeviceArray`s, the stream a
`polygraphy.cuda.Stream`, copies go through `polygraphy.cuda.wrapper().memcpy`, and the few
CUDA runtime calls Polygraphy does not wrap (stream capture into a CUDA graph, graph launch,
the device's compute capability) are made on the same libcudart handle Polygraphy loaded
(`wrapper().handle`, ctypes), with the CUDA 12 signatures:

    cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal)
    cudaStreamEndCapture(stream, &graph); cudaGraphInstantiate(&exec, graph, 0)
    cudaGraphLaunch(exec, stream); cudaGraphExecDestroy(exec); cudaGraphDestroy(graph)

The stand-in runtime (`dsc.runtime.standin`) has a `HostDevice` with the same methods; the
runner only ever talks to one of the two through this interface:

    alloc(nbytes) -> Buffer(ptr, nbytes)    upload(buffer, array)    download(buffer, shape, dtype)
    copy(dst_ptr, src_ptr, nbytes)              synchronize()           stream_ptr
    begin_capture() / end_capture() -> graph    launch(graph)           destroy(graph)
    compute_capability() -> int (e.g. 89)       name

Every copy is asynchronous on the one stream; `download` synchronizes.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass

import numpy as np

from dsc.errors import Unsupported

_CAPTURE_THREAD_LOCAL = 1
_ATTR_CC_MAJOR, _ATTR_CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor / Minor


class _Owner:
    """Lifetime token of one allocation (freed by a finalizer when the last reference goes)."""


@dataclass
class Buffer:
    """`nbytes` of device memory at `ptr`; `owner` keeps the allocation alive."""

    ptr: int
    nbytes: int
    owner: object = None


class CudaDevice:
    """The current CUDA device through Polygraphy. Raises `Unsupported` (exit 4) without one."""

    def __init__(self):
        try:
            from polygraphy import cuda

            self._cuda = cuda
            self._w = cuda.wrapper()
            count = ctypes.c_int(0)
            status = self._w.handle.cudaGetDeviceCount(ctypes.byref(count))
        except Exception as e:  # noqa: BLE001  no libcudart or driver: Polygraphy raises its own
            raise Unsupported(f"no CUDA runtime: {' '.join(str(e).split())[:200]}") from None
        if status != 0 or count.value < 1:
            raise Unsupported(
                f"no CUDA GPU visible (cudaGetDeviceCount status {status}, {count.value} devices)"
            )
        self.stream = cuda.Stream()
        self.stream_ptr = self.stream.ptr
        weakref.finalize(self, self.stream.free)
        self.name = "cuda"

    def alloc(self, nbytes: int) -> Buffer:
        arr = self._cuda.DeviceArray.raw((max(1, int(nbytes)),))
        # Polygraphy's DeviceArray has no finalizer: free it when the Buffer's owner goes
        owner = _Owner()
        weakref.finalize(owner, arr.free)
        return Buffer(arr.ptr, int(nbytes), owner)

    def upload(self, buf: Buffer, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        assert a.nbytes <= buf.nbytes, (a.nbytes, buf.nbytes)
        self._w.memcpy(
            buf.ptr, a.ctypes.data, a.nbytes, self._cuda.MemcpyKind.HostToDevice, self.stream_ptr
        )
        self.stream.synchronize()  # `a` may be a temporary: the copy must finish before it goes

    def download(self, buf: Buffer, shape: tuple[int, ...], dtype) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        self._w.memcpy(
            out.ctypes.data,
            buf.ptr,
            out.nbytes,
            self._cuda.MemcpyKind.DeviceToHost,
            self.stream_ptr,
        )
        self.stream.synchronize()
        return out

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        self._w.memcpy(dst, src, nbytes, self._cuda.MemcpyKind.DeviceToDevice, self.stream_ptr)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def compute_capability(self) -> int:
        h = self._w.handle
        dev, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
        self._w.check(h.cudaGetDevice(ctypes.byref(dev)))
        self._w.check(h.cudaDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, dev))
        self._w.check(h.cudaDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, dev))
        return major.value * 10 + minor.value

    # -- CUDA graphs ---------------------------------------------------------------------------

    def begin_capture(self) -> None:
        self._w.check(
            self._w.handle.cudaStreamBeginCapture(
                ctypes.c_void_p(self.stream_ptr), _CAPTURE_THREAD_LOCAL
            )
        )

    def end_capture(self) -> tuple[int, int]:
        h = self._w.handle
        graph, exe = ctypes.c_void_p(), ctypes.c_void_p()
        self._w.check(h.cudaStreamEndCapture(ctypes.c_void_p(self.stream_ptr), ctypes.byref(graph)))
        self._w.check(h.cudaGraphInstantiate(ctypes.byref(exe), graph, ctypes.c_ulonglong(0)))
        return (graph.value, exe.value)

    def launch(self, graph: tuple[int, int]) -> None:
        self._w.check(
            self._w.handle.cudaGraphLaunch(
                ctypes.c_void_p(graph[1]), ctypes.c_void_p(self.stream_ptr)
            )
        )

    def destroy(self, graph: tuple[int, int]) -> None:
        self._w.handle.cudaGraphExecDestroy(ctypes.c_void_p(graph[1]))
        self._w.handle.cudaGraphDestroy(ctypes.c_void_p(graph[0]))
